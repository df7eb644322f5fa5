"""The o200k_harmony tokenizer (tiktoken), with a vocabulary found offline or online and always verified.

The BPE ranks are o200k_base's (SPEC section 5). They are looked for, in order: an explicit path
(argument or `GPTOSS_JAX_VOCAB`), a folder named by `TIKTOKEN_ENCODINGS_BASE`, tiktoken's download
cache, the copy shipped in the `bpe-openai` wheel, and finally the public download. Every source is
checked against the published sha256, and the verified file is kept in one folder that both tiktoken
and openai-harmony (through `TIKTOKEN_ENCODINGS_BASE`) read.
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import importlib.resources
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import tiktoken
import tiktoken.load

VOCAB_FILE = "o200k_base.tiktoken"
VOCAB_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
VOCAB_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
SPECIAL_TOKENS = {
    "<|startoftext|>": 199998,
    "<|endoftext|>": 199999,
    "<|reserved_200000|>": 200000,
    "<|reserved_200001|>": 200001,
    "<|return|>": 200002,
    "<|constrain|>": 200003,
    "<|reserved_200004|>": 200004,
    "<|channel|>": 200005,
    "<|start|>": 200006,
    "<|end|>": 200007,
    "<|message|>": 200008,
    "<|reserved_200009|>": 200009,
    "<|reserved_200010|>": 200010,
    "<|reserved_200011|>": 200011,
    "<|call|>": 200012,
} | {f"<|reserved_{i}|>": i for i in range(200013, 201088)}
RETURN, CALL = 200002, 200012  # <|return|> and <|call|> end an assistant turn
ENDOFTEXT = 199999  # ends a plain-text completion


class VocabError(RuntimeError):
    """No verified o200k_base vocabulary could be found; the message says how to provide one."""


def _verified(data: bytes, source: str) -> bytes:
    digest = hashlib.sha256(data).hexdigest()
    if digest != VOCAB_SHA256:
        raise VocabError(
            f"{source}: sha256 {digest} is not o200k_base's {VOCAB_SHA256}; the file is corrupt or another "
            "vocabulary. Delete or replace it (see gptoss_jax.tokenizer for where vocabularies are looked for)."
        )
    return data


def _cache_folder() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gptoss_jax" / "encodings"


def _candidates(explicit: str | None) -> list[tuple[str, Callable[[], bytes], bool]]:
    """(description, reader, is_explicit): explicit sources must be right; implicit ones are skipped if wrong."""
    sources = []
    if explicit or os.environ.get("GPTOSS_JAX_VOCAB"):
        path = Path(explicit or os.environ["GPTOSS_JAX_VOCAB"])
        sources.append((str(path), path.read_bytes, True))
    if os.environ.get("TIKTOKEN_ENCODINGS_BASE"):  # a file there must be right; a folder without one is skipped
        path = Path(os.environ["TIKTOKEN_ENCODINGS_BASE"]) / VOCAB_FILE
        sources.append((str(path), path.read_bytes, path.exists()))
    sources.append((str(_cache_folder() / VOCAB_FILE), (_cache_folder() / VOCAB_FILE).read_bytes, False))
    tiktoken_cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "data-gym-cache")
    cached = Path(tiktoken_cache) / hashlib.sha1(VOCAB_URL.encode()).hexdigest()
    sources.append((str(cached), cached.read_bytes, False))
    wheel = importlib.resources.files("bpe_openai") / "data" / f"{VOCAB_FILE}.gz" if _has_bpe_openai() else None
    if wheel is not None:
        sources.append((f"bpe-openai wheel ({wheel})", lambda: gzip.decompress(wheel.read_bytes()), False))
    sources.append((VOCAB_URL, lambda: tiktoken.load.read_file(VOCAB_URL), False))
    return sources


def _has_bpe_openai() -> bool:
    try:
        return importlib.resources.files("bpe_openai").is_dir()
    except ModuleNotFoundError:
        return False


@functools.cache
def vocab_folder(explicit: str | None = None) -> Path:
    """A folder holding a verified `o200k_base.tiktoken` (what openai-harmony wants in TIKTOKEN_ENCODINGS_BASE)."""
    tried = []
    for source, read, is_explicit in _candidates(explicit):
        try:
            data = _verified(read(), source)
        except VocabError:
            if is_explicit:
                raise
            tried.append(f"{source} (wrong sha256)")
            continue
        except Exception as error:  # missing file, no network, ...: try the next source
            if is_explicit:
                raise VocabError(f"cannot read the vocabulary at {source}: {error}") from None
            tried.append(f"{source} ({type(error).__name__})")
            continue
        folder = Path(source).parent if is_explicit and Path(source).name == VOCAB_FILE else _cache_folder()
        if Path(source) != folder / VOCAB_FILE:
            _atomic_write(folder / VOCAB_FILE, data)  # replaces a corrupt copy, if one is there
        return folder
    raise VocabError(
        "no o200k_base vocabulary found; tried:\n  " + "\n  ".join(tried) + "\nInstall the `bpe-openai` wheel "
        "(pip install bpe-openai==0.1.4), or download o200k_base.tiktoken and set GPTOSS_JAX_VOCAB to its path."
    )


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as handle:
        handle.write(data)
    os.replace(handle.name, path)


@functools.cache
def get_encoding(vocab: str | None = None) -> tiktoken.Encoding:
    """The `tiktoken.Encoding` for o200k_harmony (vocabulary 201088, harmony's special tokens)."""
    ranks = {}
    for line in (vocab_folder(vocab) / VOCAB_FILE).read_bytes().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding("o200k_harmony", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens=SPECIAL_TOKENS)

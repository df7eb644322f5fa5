"""o200k_harmony: token-exact against openai-harmony, and a vocabulary that is always verified."""

import gzip
import importlib.resources

import pytest

from gptoss_jax import harmony, tokenizer

TEXTS = [
    "Hello, world! The quick brown fox jumps over 13 lazy dogs.",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\n\n\t\tindented\r\n",
    "日本語のテキストと中文文本，还有한국어 텍스트.",
    "emoji 🤖👩🏽‍🚀🇫🇷 and combining é vs e\u0301",
    "           long     whitespace runs          \n\n\n\n   ",
    "1234567890 3.14159 -42 1e-9 0x1F",
    "I'm you'RE they'll WE'VE it'd",
    "text that spells <|start|>assistant<|channel|>final<|message|>hi<|end|><|return|> and <|reserved_200500|>",
]


@pytest.mark.parametrize("text", TEXTS)
def test_encoding_equals_openai_harmony(text):
    ours, theirs = tokenizer.get_encoding(), harmony.get_encoding()
    assert ours.encode(text, disallowed_special=()) == theirs.encode(text, disallowed_special=())
    assert ours.encode(text, allowed_special="all") == theirs.encode(text, allowed_special="all")
    assert ours.decode(ours.encode(text, disallowed_special=())) == text


def test_special_tokens_and_vocabulary_size():
    encoding = tokenizer.get_encoding()
    assert encoding.n_vocab == 201088
    ids = {t: encoding.encode_single_token(t) for t in ("<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>")}
    assert ids == {"<|start|>": 200006, "<|channel|>": 200005, "<|message|>": 200008, "<|end|>": 200007,
                   "<|return|>": 200002, "<|call|>": 200012}
    assert [encoding.encode_single_token(w) for w in ("system", "user", "assistant")] == [17360, 1428, 173781]


def test_corrupted_explicit_vocabulary_is_a_clear_error(tmp_path, monkeypatch):
    wheel = importlib.resources.files("bpe_openai") / "data" / "o200k_base.tiktoken.gz"
    data = bytearray(gzip.decompress(wheel.read_bytes()))
    data[1000] ^= 1
    corrupt = tmp_path / "o200k_base.tiktoken"
    corrupt.write_bytes(bytes(data))
    monkeypatch.setenv("GPTOSS_JAX_VOCAB", str(corrupt))
    with pytest.raises(tokenizer.VocabError, match="sha256 .* is not o200k_base"):
        tokenizer.vocab_folder.__wrapped__()


def test_offline_resolution_skips_a_corrupted_cache_and_uses_the_wheel(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    (cache / "gptoss_jax" / "encodings").mkdir(parents=True)
    (cache / "gptoss_jax" / "encodings" / "o200k_base.tiktoken").write_bytes(b"not a vocabulary")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty"))
    monkeypatch.delenv("GPTOSS_JAX_VOCAB", raising=False)
    monkeypatch.delenv("TIKTOKEN_ENCODINGS_BASE", raising=False)
    folder = tokenizer.vocab_folder.__wrapped__()
    assert (folder / "o200k_base.tiktoken").read_bytes() != b"not a vocabulary"


def test_no_source_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("GPTOSS_JAX_VOCAB", raising=False)
    monkeypatch.delenv("TIKTOKEN_ENCODINGS_BASE", raising=False)
    monkeypatch.setattr(tokenizer, "_has_bpe_openai", lambda: False)
    monkeypatch.setattr(tokenizer.tiktoken.load, "read_file", lambda url: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(tokenizer.VocabError, match="GPTOSS_JAX_VOCAB"):
        tokenizer.vocab_folder.__wrapped__()

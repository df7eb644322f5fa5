"""Hostile and careless input: the converter, the loader and the sampler CLI refuse it in one clear line,
exit 2, and lose or half-write nothing. Everything here fails before a model is compiled, so it is fast.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import CONFIGS

import gptoss_jax
from convert import converter
from convert.__main__ import main as convert_main
from convert.safetensors_io import read_header
from convert.synthetic import write_checkpoint
from gptoss_jax import checkpoint, sample

CONFIG = CONFIGS["odd"]
SHARD = "model-00000-of-00000.safetensors"  # the HF name of a single shard
INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    """A repo as downloaded: the HF layout at the root and the original layout in original/."""
    repo = tmp_path_factory.mktemp("repo")
    write_checkpoint(repo, CONFIG, layout="hf", seed=3, progress=False)
    write_checkpoint(repo / "original", CONFIG, layout="original", seed=3, progress=False)
    return repo


@pytest.fixture(scope="module")
def converted(published, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("converted") / "ckpt"
    assert convert_main([str(published), str(dst)]) == 0
    return dst


@pytest.fixture
def src(published, tmp_path) -> Path:
    """A private copy of the published HF layout to damage."""
    copy = tmp_path / "src"
    shutil.copytree(published, copy, ignore=shutil.ignore_patterns("original"))
    return copy


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused(capfd, argv: list[str], fragment: str, main=convert_main) -> str:
    """Runs a CLI in-process; it must exit 2 with one line naming `fragment` (on the file descriptor, so
    logs written by libraries' own handlers count too)."""
    assert main(argv) == 2
    err = capfd.readouterr().err.strip()
    lines = [line for line in err.splitlines() if not line.startswith("notice:")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err
    return lines[0]


# Data loss --------------------------------------------------------------------------------------


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_destination_overlapping_the_source_is_refused(published, capfd, overwrite):
    before = _digest(published)
    _refused(capfd, [str(published), str(published), *overwrite], "is the source")
    _refused(capfd, [str(published / "original"), str(published), *overwrite], "inside the destination")
    _refused(capfd, [str(published), str(published / "converted"), *overwrite], "inside the source")
    assert _digest(published) == before


def test_overwrite_onto_a_file_keeps_the_file(src, tmp_path, capfd):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    _refused(capfd, [str(src), str(target), "--overwrite"], "is a file")
    assert target.read_text() == "mine" and not list(tmp_path.glob(".notes*"))


def _header_file(path: Path, header: object, data: bytes) -> None:
    encoded = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def _single_shard(src: Path, header: object, data: bytes) -> None:
    """Replaces the HF checkpoint's shard with hand-made bytes (and drops the index)."""
    (src / INDEX).unlink()
    _header_file(src / SHARD, header, data)


NORM = [CONFIG.hidden_size]
HOSTILE_HEADERS = {
    "overlapping": ({"a": {"dtype": "BF16", "shape": NORM, "data_offsets": [0, 192]},
                     "b": {"dtype": "BF16", "shape": NORM, "data_offsets": [0, 192]}}, 192),
    "duplicate key": (b'{"a":{"dtype":"BF16","shape":[96],"data_offsets":[0,192]},'
                      b'"a":{"dtype":"BF16","shape":[96],"data_offsets":[192,384]}}', 384),
    "header a list": ([1, 2, 3], 0),
    "offsets as strings": ({"a": {"dtype": "BF16", "shape": NORM, "data_offsets": ["0", "192"]}}, 192),
    "dtype a list": ({"a": {"dtype": ["BF16"], "shape": NORM, "data_offsets": [0, 192]}}, 192),
    "shape a string": ({"a": {"dtype": "BF16", "shape": "96", "data_offsets": [0, 192]}}, 192),
    "range past the data": ({"a": {"dtype": "BF16", "shape": NORM, "data_offsets": [0, 192]}}, 100),
    "range not its shape": ({"a": {"dtype": "BF16", "shape": NORM, "data_offsets": [0, 190]}}, 190),
}


@pytest.mark.parametrize("case", HOSTILE_HEADERS)
def test_malformed_safetensors_headers_are_refused(src, tmp_path, capfd, case):
    header, size = HOSTILE_HEADERS[case]
    _single_shard(src, header, bytes(size))
    _refused(capfd, [str(src), str(tmp_path / "dst")], f"{SHARD}: not a valid safetensors file")
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize(
    "weight_map, fragment",
    [
        ({"model.norm.weight": "../../etc/passwd"}, "'../../etc/passwd' is not a file name inside"),
        ({"model.norm.weight": "/etc/passwd"}, "'/etc/passwd' is not a file name inside"),
        ({"model.norm.weight": "/proc/self/mem"}, "'/proc/self/mem' is not a file name inside"),
        ({"model.norm.weight": 7}, "7 is not a file name inside"),
        (7, "weight_map must map tensor names to file names"),
        (["model.norm.weight"], "weight_map must map tensor names to file names"),
    ],
)
def test_index_may_only_name_files_inside_the_checkpoint(src, tmp_path, capfd, weight_map, fragment):
    index = json.loads((src / INDEX).read_text())
    index["weight_map"] = weight_map if not isinstance(weight_map, dict) else {**index["weight_map"], **weight_map}
    (src / INDEX).write_text(json.dumps(index))
    _refused(capfd, [str(src), str(tmp_path / "dst")], fragment)


def test_symlinked_shards_still_convert(src, tmp_path):
    """The Hugging Face cache links each shard to a blob elsewhere."""
    blob = tmp_path / "blobs" / "0123abcd"
    blob.parent.mkdir()
    shutil.move(src / SHARD, blob)
    (src / SHARD).symlink_to(blob)
    assert convert_main([str(src), str(tmp_path / "dst")]) == 0


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda c: c["rope_scaling"].update(factor=float("nan")), "rope_scaling_factor must be a finite positive number, got nan"),
        (lambda c: c.update(rope_theta=float("inf")), "rope_theta must be a finite positive number, got inf"),
        (lambda c: c.update(swiglu_limit=-7.0), "swiglu_limit must be a finite positive number, got -7.0"),
        (lambda c: c.update(hidden_size=0), "hidden_size must be a positive integer, got 0"),
        (lambda c: c.update(num_local_experts=-5), "num_experts must be a positive integer, got -5"),
        (lambda c: c.update(num_hidden_layers=200000, layer_types=None), "num_hidden_layers=200000 exceeds"),
        (lambda c: c.update(head_dim="64"), "head_dim must be a positive integer, got '64'"),
    ],
)
def test_bad_config_values_are_refused_at_once(src, tmp_path, capfd, edit, fragment):
    config = json.loads((src / "config.json").read_text())
    edit(config)
    (src / "config.json").write_text(json.dumps(config))
    started = time.perf_counter()
    _refused(capfd, [str(src), str(tmp_path / "dst")], fragment)
    assert time.perf_counter() - started < 5


@pytest.mark.parametrize("content", ["[1, 2]", "7", '"gpt-oss"'])
def test_config_that_is_not_an_object_is_refused(src, tmp_path, capfd, content):
    (src / "config.json").write_text(content)
    _refused(capfd, [str(src), str(tmp_path / "dst")], "config.json must hold a JSON object")


def test_unreadable_shard_is_one_line(src, tmp_path, capfd):
    (src / SHARD).unlink()
    (src / SHARD).mkdir()  # unreadable as a file, even for root
    (src / INDEX).unlink()
    _refused(capfd, [str(src), str(tmp_path / "dst")], SHARD)


def test_unwritable_destination_is_one_line(src, tmp_path, capfd):
    (tmp_path / "file").write_text("")
    _refused(capfd, [str(src), str(tmp_path / "file" / "dst")], "cannot write")


@pytest.mark.parametrize("when", ["up front", "mid-write"])
def test_disk_full_is_one_line_and_leaves_nothing(src, tmp_path, capfd, monkeypatch, when):
    """A 200 KiB tmpfs (mounting needs root). The free space is checked before writing; if the disk fills
    anyway (another writer), Orbax's threads must not print their hundreds of lines of tracebacks."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    if when == "mid-write":
        monkeypatch.setattr(converter, "_check_space", lambda dst, needed: None)
    try:
        assert convert_main([str(src), str(disk / "dst")]) == 2
        time.sleep(1)  # let Orbax's threads finish failing
        lines = capfd.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: cannot write {disk / 'dst'}: "), lines
        assert ("it needs" if when == "up front" else "No space left on device") in lines[0]
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_second_conversion_to_one_destination_names_the_first(src, tmp_path, capfd):
    dst = tmp_path / "dst"
    with converter.destination_lock(dst):
        _refused(capfd, [str(src), str(dst)], f"another conversion (pid {os.getpid()}) is writing {dst}")
    assert not dst.exists()


def test_sigterm_during_conversion_leaves_nothing(tmp_path, capfd):
    """SIGTERM (what `kill` and schedulers send) once the staging folder exists: the CLI unwinds, says
    so, and leaves nothing beside the source. In-process, with this test's own SIGTERM handler behind
    the CLI's, so a signal that lands after the conversion cannot end the test worker."""
    src, dst, staging = tmp_path / "src", tmp_path / "dst", tmp_path / ".dst.incomplete"
    write_checkpoint(src, CONFIG, layout="original", progress=False)  # seconds to convert
    late = []

    def terminate_once_writing() -> None:
        deadline = time.monotonic() + 120
        while not staging.exists() and time.monotonic() < deadline:
            time.sleep(0.002)
        os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, lambda *_: late.append(True))
    killer = threading.Thread(target=terminate_once_writing)
    try:
        killer.start()
        code = convert_main([str(src), str(dst)])
        killer.join()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not late, "the conversion ended before it could be stopped"
    assert code == 130 and "interrupted; nothing was written" in capfd.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# The loader -------------------------------------------------------------------------------------


def _copy(converted: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "ckpt"
    shutil.copytree(converted, copy)
    return copy


def test_corrupted_array_bytes_are_named_on_load(published, converted, tmp_path):
    """4 KiB overwritten inside stored expert blocks. Random MXFP4 bytes do not compress, so zstd keeps them
    raw and decodes the damage without complaint: only the digest from conversion can catch it."""
    ckpt = _copy(converted, tmp_path)
    stored = read_header(published / SHARD)["model.layers.1.mlp.experts.gate_up_proj_blocks"].read()  # loaded early
    needle = stored.tobytes()[8192 : 8192 + 64]
    hits = [(f, f.read_bytes().find(needle)) for f in (ckpt / "params").rglob("*") if f.is_file()]
    data, offset = next((f, at) for f, at in hits if at >= 0)
    with open(data, "r+b") as handle:
        handle.seek(offset)
        handle.write(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match="mlp1_blocks/0 .* fails its checksum") as error:
        gptoss_jax.load(ckpt)
    assert str(ckpt) in str(error.value)


def test_config_edited_after_conversion_is_refused(converted, tmp_path):
    ckpt = _copy(converted, tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    config["num_hidden_layers"] = 2
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="num_hidden_layers"):
        gptoss_jax.load(ckpt)


@pytest.mark.parametrize("dtype", ["int8", "float64", "uint8", "nonsense"])
def test_unsupported_dtype_is_refused(converted, dtype):
    with pytest.raises(ValueError, match=f"dtype {dtype!r}"):
        gptoss_jax.load(converted, dtype=dtype)


def _break(ckpt: Path, how: str) -> str:
    match how:
        case "marker not JSON":
            (ckpt / checkpoint.MARKER).write_text("{not json")
            return checkpoint.MARKER
        case "missing manifest":
            for manifest in (ckpt / "params").rglob("manifest.ocdbt"):
                manifest.unlink()
            return "params"
        case "missing data file":
            for data in (ckpt / "params").rglob("d/*"):
                data.unlink()
            return "params"
        case "garbage metadata":
            for metadata in (ckpt / "params").rglob("_METADATA"):
                metadata.write_text("garbage")
            return "params"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["marker not JSON", "missing manifest", "missing data file", "garbage metadata"])
def test_damaged_checkpoint_is_one_line_from_the_cli(converted, tmp_path, capfd, how):
    ckpt = _copy(converted, tmp_path)
    fragment = _break(ckpt, how)
    line = _refused(capfd, ["--checkpoint", str(ckpt), "--max-new-tokens", "1"], fragment, main=sample.main)
    assert str(ckpt) in line


# The sampler CLI --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--temperature", "nan"], "--temperature must be a finite number >= 0, got nan"),
        (["--temperature", "inf"], "--temperature must be a finite number >= 0, got inf"),
        (["--temperature", "-1"], "--temperature must be a finite number >= 0, got -1.0"),
        (["--top-p", "nan"], "--top-p must be in (0, 1], got nan"),
        (["--seed", str(2**70)], "--seed must be in [0, 2**32)"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
        (["--coordinator", "localhost:1234"], "--coordinator needs --num-processes"),
        (["--mesh", "data=2,expert"], "--mesh"),
    ],
)
def test_sampler_refuses_bad_flags_before_loading(capfd, flags, fragment):
    _refused(capfd, flags, fragment, main=sample.main)


def test_sampler_checks_the_vocabulary_before_loading(tmp_path, capfd, monkeypatch):
    from gptoss_jax import tokenizer

    bad = tmp_path / "vocab.tiktoken"
    bad.write_text("not a vocabulary")
    monkeypatch.setenv("GPTOSS_JAX_VOCAB", str(bad))
    monkeypatch.setattr(sample.checkpoint, "load", lambda *a, **k: pytest.fail("loaded the model before checking the vocabulary"))
    tokenizer.vocab_folder.cache_clear()
    tokenizer.get_encoding.cache_clear()
    try:
        _refused(capfd, ["--max-new-tokens", "1"], f"{bad}: sha256", main=sample.main)
    finally:
        tokenizer.vocab_folder.cache_clear()
        tokenizer.get_encoding.cache_clear()


def test_an_encodings_folder_without_the_file_falls_back(tmp_path, monkeypatch):
    from gptoss_jax import tokenizer

    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", str(tmp_path))  # an empty folder
    monkeypatch.delenv("GPTOSS_JAX_VOCAB", raising=False)
    tokenizer.vocab_folder.cache_clear()
    try:
        assert (tokenizer.vocab_folder() / tokenizer.VOCAB_FILE).is_file()
    finally:
        tokenizer.vocab_folder.cache_clear()


def test_truncated_checkpoint_is_one_line(converted, tmp_path, capfd):
    ckpt = _copy(converted, tmp_path)
    for data in (ckpt / "params").rglob("d/*"):
        with open(data, "r+b") as handle:
            handle.truncate(data.stat().st_size // 2)
    _refused(capfd, ["--checkpoint", str(ckpt), "--max-new-tokens", "1"], str(ckpt), main=sample.main)


@pytest.mark.parametrize(
    "text, sizes",
    [("data=2,expert=4", {"data": 2, "expert": 4, "model": 1}), (" model = 2 ", {"data": 1, "expert": 1, "model": 2}),
     ("", {"data": 1, "expert": 1, "model": 1}), ("data=0", None), ("data=-1", None), ("experts=8", None), ("data=two", None)],
)
def test_mesh_flag_parsing(text, sizes):
    from gptoss_jax import sharding

    if sizes is None:
        with pytest.raises(ValueError, match=f"bad --mesh {text!r}"):
            sharding.parse_mesh(text)
    else:
        assert sharding.parse_mesh(text) == sizes

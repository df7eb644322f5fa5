"""The converter: byte-exact, layout-independent, loads into transformers too, and all-or-nothing."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import tqdm
import safetensors.torch
import torch
import transformers
from conftest import CONFIGS, forward

import oracle
import gptoss_jax
from convert import layouts
from convert.__main__ import main as convert_main
from convert.safetensors_io import PlannedTensor, read_header, write
from convert.synthetic import write_checkpoint
from gptoss_jax import GptOssConfig

CONFIG = CONFIGS["odd"]


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> dict[str, Path]:
    """The same random weights in both published layouts, and as a dense-expert fine-tune."""
    root = tmp_path_factory.mktemp("published")
    write_checkpoint(root / "hf", CONFIG, layout="hf", seed=7)
    write_checkpoint(root / "original", CONFIG, layout="original", seed=7)
    write_checkpoint(root / "dense", CONFIG, layout="hf", seed=7, dense_experts=True)
    return {name: root / name for name in ("hf", "original", "dense")}


@pytest.fixture(scope="module")
def converted(published, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("converted")
    for name in ("hf", "original"):
        assert convert_main([str(published[name]), str(root / name)]) == 0
    assert convert_main([str(published["dense"]), str(root / "dense"), "--quantize", "mxfp4"]) == 0
    assert convert_main([str(published["dense"]), str(root / "dense-bf16")]) == 0
    return {name: root / name for name in ("hf", "original", "dense", "dense-bf16")}


def _leaves(model) -> list[np.ndarray]:
    return [np.asarray(a) for a in jax.tree.leaves(gptoss_jax.model.nnx.state(model))]


def test_both_layouts_convert_to_identical_arrays(converted):
    hf, original = gptoss_jax.load(converted["hf"]), gptoss_jax.load(converted["original"])
    for a, b in zip(_leaves(hf), _leaves(original), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_every_tensor_is_byte_identical_to_the_source(published, converted, layout):
    """Against the files' bytes as torch reads them, a reader independent of the converter's."""
    source = {}
    for file in published[layout].glob("*.safetensors"):
        source.update(safetensors.torch.load_file(file))
    params = oracle.flat_params(gptoss_jax.load(converted[layout]))
    exported = dict(layouts.export(params, layouts.checkpoint_tensors(CONFIG, layout)))
    assert exported.keys() == source.keys()
    for name, stored in source.items():
        assert hashlib.sha256(np.ascontiguousarray(exported[name]).tobytes()).hexdigest() == hashlib.sha256(
            stored.contiguous().view(torch.uint8).numpy().tobytes()
        ).hexdigest(), name


def test_reads_keep_every_stored_bit(tmp_path):
    """Row ranges read back with the exact bits written: all 65536 bf16 patterns (NaN payloads, -0, inf) and bytes."""
    bits = np.arange(2**16, dtype=np.uint16).reshape(256, 256)
    tensors = {"bf16": bits.view(ml_dtypes.bfloat16), "u8": bits.view(np.uint8)[:, ::3].copy()}
    plan = [PlannedTensor("bf16", "BF16", (256, 256)), PlannedTensor("u8", "U8", tensors["u8"].shape)]
    write(tmp_path / "bits.safetensors", plan, lambda t: iter([tensors[t.name]]))
    stored = read_header(tmp_path / "bits.safetensors")
    for name, want in tensors.items():
        got = np.concatenate([stored[name].read(0, 100), stored[name].read(100, 200), stored[name].read(200)])
        assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), name


def test_load_shows_the_bytes_it_reads(converted, capsys):
    model = gptoss_jax.load(converted["hf"], progress=True)
    stored = sum(a.nbytes for a in _leaves(model))
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    size = tqdm.tqdm.format_sizeof(stored)  # as the bar writes it, e.g. 703k
    assert last.startswith("loading: 100%") and f" {size}/{size} " in last, last


@pytest.mark.slow
def test_dense_experts_pack_back_to_the_same_values(converted):
    """The dense fine-tune holds decoded MXFP4 values, so packing them again gives the same weights."""
    packed, repacked = gptoss_jax.load(converted["hf"], dtype="float32"), gptoss_jax.load(converted["dense"], dtype="float32")
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CONFIG.vocab_size, (1, 20)))
    np.testing.assert_array_equal(np.asarray(forward(packed, tokens)), np.asarray(forward(repacked, tokens)))


@pytest.mark.slow
def test_dense_experts_kept_in_bf16_give_the_same_logits(converted):
    """Without --quantize the fine-tune's dense experts are kept and run as they are."""
    packed, dense = gptoss_jax.load(converted["hf"], dtype="float32"), gptoss_jax.load(converted["dense-bf16"], dtype="float32")
    assert dense.expert_format == "bf16" and dense.full_blocks.mlp.mlp1_weight[...].shape[1:] == (
        CONFIG.num_experts, 2 * CONFIG.intermediate_size, CONFIG.hidden_size
    )
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CONFIG.vocab_size, (1, 20)))
    # Same weight values on both sides; only the matmul operand layout differs (summation order).
    np.testing.assert_allclose(np.asarray(forward(dense, tokens)), np.asarray(forward(packed, tokens)), atol=1e-5, rtol=0)


def test_quantize_refuses_already_packed_experts(published, tmp_path, capsys):
    assert convert_main([str(published["hf"]), str(tmp_path / "dst"), "--quantize", "mxfp4"]) == 2
    assert "already holds MXFP4 experts" in capsys.readouterr().err and not (tmp_path / "dst").exists()


def test_transformers_reads_the_same_checkpoint_and_agrees(published, converted):
    """Closing the loop: transformers decodes the packed HF files itself; logits match ours (1e-4, float32,
    the core parity bound)."""
    dequantize = transformers.Mxfp4Config(dequantize=True)  # their own MXFP4 decode, on the CPU
    theirs = transformers.GptOssForCausalLM.from_pretrained(
        published["hf"], dtype="float32", quantization_config=dequantize
    ).eval()
    ours = gptoss_jax.load(converted["hf"], dtype="float32")
    tokens = np.random.default_rng(1).integers(0, CONFIG.vocab_size, (2, 30))
    np.testing.assert_allclose(
        np.asarray(forward(ours, jnp.asarray(tokens))), oracle.hf_logits(theirs, tokens), atol=1e-4, rtol=0
    )


def _corrupt(directory: Path, how: str) -> str:
    """Damages a copy of a published checkpoint; returns a fragment the error message must contain."""
    shard = next(directory.glob("model-*.safetensors"))
    index = directory / "model.safetensors.index.json"
    match how:
        case "truncated":
            with open(shard, "r+b") as handle:
                handle.truncate(shard.stat().st_size - 100)
            return f"{shard}: not a valid safetensors file (truncated or corrupt)"
        case "corrupt header":
            with open(shard, "r+b") as handle:
                handle.seek(8)
                handle.write(b"#garbage#")
            return f"{shard}: not a valid safetensors file (truncated or corrupt)"
        case "missing shard":
            data = json.loads(index.read_text())
            data["weight_map"]["model.norm.weight"] = "model-00009-of-00009.safetensors"
            index.write_text(json.dumps(data))
            return "names shard model-00009-of-00009.safetensors, which is missing"
        case "config contradicts tensors":
            config = json.loads((directory / "config.json").read_text())
            config["num_local_experts"] += 1
            (directory / "config.json").write_text(json.dumps(config))
            return "model.layers.0.mlp.router.weight"
        case "unknown layout":
            (directory / "config.json").unlink()
            return "unknown layout"
    raise AssertionError(how)


def _rewrite(directory: Path, edit) -> None:
    """Rewrites the single shard with `edit(tensors)` applied (a dict name -> array)."""
    shard = next(directory.glob("model-*.safetensors"))
    tensors = {name: np.array(t.read()) for name, t in read_header(shard).items()}
    edit(tensors)
    dtypes = {np.dtype(np.uint8): "U8", np.dtype(np.float32): "F32"}
    plan = [PlannedTensor(name, dtypes.get(a.dtype, "BF16"), a.shape) for name, a in tensors.items()]
    write(shard, plan, lambda t: iter([tensors[t.name]]))
    index = directory / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = {name: shard.name for name in tensors}
    index.write_text(json.dumps(data))


def _edit_case(how: str):
    blocks = "model.layers.1.mlp.experts.gate_up_proj_blocks"
    match how:
        case "missing tensor":
            return lambda t: t.pop("model.layers.2.self_attn.sinks"), "missing tensor model.layers.2.self_attn.sinks"
        case "extra tensor":
            return lambda t: t.update(extra=np.zeros(3, np.uint8)), "unexpected tensor extra"
        case "wrong shape":
            return lambda t: t.update({blocks: t[blocks][:, :-1]}), f"tensor {blocks} in"
        case "wrong dtype":
            name = "model.layers.0.self_attn.q_proj.bias"
            return lambda t: t.update({name: np.asarray(t[name], np.float32)}), f"tensor {name} in"
        case "nan scale":
            name = "model.layers.2.mlp.experts.down_proj_scales"
            return lambda t: t[name].reshape(-1).__setitem__(5, 255), f"{name} in"
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    ["truncated", "corrupt header", "missing shard", "config contradicts tensors", "unknown layout",
     "missing tensor", "extra tensor", "wrong shape", "wrong dtype", "nan scale"],
)
def test_bad_input_is_a_clear_error_and_writes_nothing(published, tmp_path, capsys, how):
    src = tmp_path / "src"
    subprocess.run(["cp", "-r", str(published["hf"]), str(src)], check=True)
    if how in ("missing tensor", "extra tensor", "wrong shape", "wrong dtype", "nan scale"):
        edit, fragment = _edit_case(how)
        _rewrite(src, edit)
    else:
        fragment = _corrupt(src, how)
    dst = tmp_path / "dst"
    assert convert_main([str(src), str(dst)]) == 2
    message = capsys.readouterr().err
    assert message.startswith("error: ") and fragment in message, message
    assert not dst.exists() and not list(tmp_path.glob(".dst*"))


def test_existing_destination_needs_overwrite(published, tmp_path, capsys):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep").write_text("mine")
    assert convert_main([str(published["hf"]), str(dst)]) == 2
    assert "already exists" in capsys.readouterr().err and (dst / "keep").exists()
    assert convert_main([str(published["hf"]), str(dst), "--overwrite"]) == 0
    assert not (dst / "keep").exists() and (dst / "gptoss_jax.json").exists()


def test_killed_conversion_leaves_nothing_and_reruns(tmp_path):
    src = tmp_path / "src"  # the tiny preset: its real-vocabulary embeddings take seconds to write
    write_checkpoint(src, GptOssConfig.tiny(), layout="original", progress=False)
    dst = tmp_path / "dst"
    process = subprocess.Popen([sys.executable, "-m", "convert", str(src), str(dst)], stderr=subprocess.DEVNULL)
    staging = tmp_path / ".dst.incomplete"  # created once validation passed, right before the first write
    deadline = time.monotonic() + 120
    while not staging.exists():
        assert process.poll() is None and time.monotonic() < deadline, "conversion ended before it could be killed"
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not dst.exists()
    assert convert_main([str(src), str(dst)]) == 0
    assert (dst / "gptoss_jax.json").exists() and not staging.exists()


def test_load_rejects_a_folder_that_is_not_a_converted_checkpoint(published):
    with pytest.raises(ValueError, match="not a converted gptoss-jax checkpoint"):
        gptoss_jax.load(published["hf"])

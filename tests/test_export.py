"""A fine-tuned model exported in the published layouts, checked by readers no one here wrote:
transformers' `GptOssForCausalLM` loads the Hugging Face export, and `python -m convert` reads either
layout back to the very bytes that were exported."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from conftest import forward
from flax import nnx
from test_training import TOKENS, lora_model

import gptoss_jax
import oracle
from convert import published
from convert.__main__ import main as convert_main
from gptoss_jax import merge_lora


def _as_stored(model) -> None:
    """Rounds every floating weight to bf16, the published dtype: what the exported files hold."""
    for _, variable in nnx.to_flat_state(nnx.state(model)):
        value = variable.get_value()
        if jnp.issubdtype(value.dtype, jnp.floating):
            variable.set_value(value.astype(jnp.bfloat16).astype(value.dtype))


def _flat(model) -> dict[tuple[str, ...], np.ndarray]:
    return {tuple(map(str, path)): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model))}


@pytest.mark.parametrize("experts", ["mxfp4", "bf16"])
def test_transformers_loads_the_hf_export_and_agrees(tmp_path, experts):
    """Float32 on both sides over the same bf16 weights: 1e-4 on logits of ~5, the core parity bound."""
    model = merge_lora(lora_model(), experts=experts)
    published.save(model, tmp_path / "hf", progress=False)
    quantization = transformers.Mxfp4Config(dequantize=True) if experts == "mxfp4" else None  # their MXFP4 decode
    theirs = transformers.GptOssForCausalLM.from_pretrained(
        tmp_path / "hf", dtype="float32", quantization_config=quantization
    ).eval()
    _as_stored(model)
    np.testing.assert_allclose(np.asarray(forward(model, TOKENS)), oracle.hf_logits(theirs, np.asarray(TOKENS)), rtol=0, atol=1e-4)


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_the_converter_reads_the_export_back_exactly(tmp_path, layout):
    """Re-quantized experts come back byte for byte, every other weight as its bf16 rounding."""
    model = merge_lora(lora_model(), experts="mxfp4")
    published.save(model, tmp_path / "published", layout=layout, progress=False)
    assert convert_main([str(tmp_path / "published"), str(tmp_path / "ckpt")]) == 0
    back = _flat(gptoss_jax.load(tmp_path / "ckpt", dtype="float32"))
    _as_stored(model)
    ours = _flat(model)
    assert back.keys() == ours.keys()
    for path, value in ours.items():
        np.testing.assert_array_equal(back[path], value, err_msg=".".join(path))


def test_export_refuses_unmerged_adapters_and_existing_folders(tmp_path):
    with pytest.raises(ValueError, match="still has LoRA adapters .*merge them first"):
        published.save(lora_model(), tmp_path / "new")
    merged = merge_lora(lora_model(), experts="bf16")
    with pytest.raises(ValueError, match="dense bf16 experts exist only in the hf layout"):
        published.save(merged, tmp_path / "new", layout="original")
    (tmp_path / "taken").mkdir()
    with pytest.raises(ValueError, match="exists; choose a new destination"):
        published.save(merged, tmp_path / "taken")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_rounding_report_shows_what_mxfp4_keeps_of_the_update():
    """Eval losses of the base and of both merges: dense experts keep the adapted model's loss exactly
    (float32 folding, measured ~1e-7), re-quantized ones land near it (one rounding per weight)."""
    from conftest import build
    from test_training import CONFIG

    from gptoss_jax.finetune import data
    from gptoss_jax.finetune.export import mean_loss, rounding_report

    rng = np.random.default_rng(0)
    examples = [data.Example(rng.integers(0, CONFIG.vocab_size, n).astype(np.int32), rng.random(n) < 0.7, "test") for n in (9, 30, 17)]
    report = rounding_report(build(CONFIG, 0), lambda: lora_model(0), examples)
    adapted = mean_loss(lora_model(0), examples)
    assert report["base"] == pytest.approx(mean_loss(build(CONFIG, 0), examples), abs=1e-6)
    assert abs(report["base"] - adapted) > 1e-3  # the adapters moved the loss
    assert report["merged, bf16 experts"] == pytest.approx(adapted, abs=1e-5)
    assert report["merged, mxfp4 experts"] == pytest.approx(adapted, abs=0.1)

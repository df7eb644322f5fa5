"""Parity with Hugging Face transformers' GptOssForCausalLM (float32, random weights), and what it catches."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CONFIGS, SEQ_LEN, build, forward
from flax import nnx

import oracle
from gptoss_jax import GptOss, GptOssConfig
from gptoss_jax import model as model_lib

# float32 on both sides: the logits differ only by summation order (about 1e-6 relative per
# matmul, a few 1e-6 absolute after all layers on logits of size ~5). 1e-4 leaves a 10x margin
# and is still 100x below what any of the seeded bugs below produce.
ATOL = 1e-4


def _tokens(config: GptOssConfig, batch: int = 2, length: int = SEQ_LEN, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, config.vocab_size, (batch, length))


def _max_error(config: GptOssConfig, ours: GptOss, theirs_from: GptOss | None = None, run=forward) -> float:
    """Max |logit difference| between our model and the HF oracle built from `theirs_from` (default: ours)."""
    tokens = _tokens(config)
    reference = oracle.hf_logits(oracle.hf_model(config, theirs_from or ours), tokens)
    return float(np.abs(np.asarray(run(ours, jnp.asarray(tokens))) - reference).max())


def test_matches_transformers(config):
    model = build(config)
    assert _max_error(config, model) < ATOL


@pytest.mark.parametrize("moe_impl", ["gather", "grouped"])
def test_each_moe_implementation_matches_transformers(moe_impl):
    config = CONFIGS["wide"]
    assert _max_error(config, build(config, moe_impl=moe_impl)) < ATOL


@pytest.mark.slow
def test_matches_transformers_with_published_rope_past_initial_context():
    """The real rotary settings (cut points 8.09 / 17.40) at positions past 4096."""
    config = dataclasses.replace(
        GptOssConfig.gpt_oss_20b(), num_hidden_layers=2, num_experts=3, experts_per_token=2, vocab_size=257,
        hidden_size=32, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
    )
    model = build(config)
    tokens = _tokens(config, batch=1, length=4200)
    reference = oracle.hf_logits(oracle.hf_model(config, model), tokens)
    ours = np.asarray(forward(model, jnp.asarray(tokens)))
    assert np.abs(ours[:, 4000:] - reference[:, 4000:]).max() < ATOL


def _swap_gate_and_linear(model: GptOss) -> None:
    for blocks in (model.sliding_blocks, model.full_blocks):
        for name in ("mlp1_blocks", "mlp1_scales", "mlp1_bias"):
            variable = getattr(blocks.mlp, name)
            value = variable[...]
            swapped = jnp.stack([value[:, :, 1::2], value[:, :, 0::2]], axis=3).reshape(value.shape)
            variable[...] = swapped


def _scale_sinks(model: GptOss) -> None:
    for blocks in (model.sliding_blocks, model.full_blocks):
        blocks.attn.sinks[...] = blocks.attn.sinks[...] * model.config.head_dim**-0.5


def _rounded_yarn(monkeypatch) -> None:
    exact = model_lib.yarn_cut_points
    monkeypatch.setattr(model_lib, "yarn_cut_points", lambda c: (math.floor(exact(c)[0]), math.ceil(exact(c)[1])))


@pytest.mark.parametrize("bug", ["window off by one", *(pytest.param(b, marks=pytest.mark.slow) for b in ["swapped gate/linear", "sink times scale", "rounded yarn"])])
def test_parity_catches_seeded_bugs(bug, monkeypatch):
    """Each classic mistake, planted in our model only, must break parity by far more than ATOL."""
    config = CONFIGS["wide"]
    reference = build(config)
    if bug == "window off by one":
        planted = build(dataclasses.replace(config, sliding_window=config.sliding_window + 1))
    else:
        planted = build(config)
    if bug == "swapped gate/linear":
        _swap_gate_and_linear(planted)
    elif bug == "sink times scale":
        _scale_sinks(planted)
    elif bug == "rounded yarn":
        _rounded_yarn(monkeypatch)
    fresh_trace = nnx.jit(lambda model, tokens: model(tokens))  # the shared jit would reuse the unpatched trace
    assert _max_error(config, planted, theirs_from=reference, run=fresh_trace) > 100 * ATOL


@pytest.mark.slow
def test_bfloat16_stays_close_to_float32():
    config = CONFIGS["odd"]
    f32 = build(config)
    bf16 = GptOss(config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    nnx.update(bf16, jax.tree.map(lambda a: a.astype(jnp.bfloat16) if a.dtype == jnp.float32 else a, nnx.state(f32)))
    tokens = jnp.asarray(_tokens(config))
    reference, low = np.asarray(forward(f32, tokens)), np.asarray(forward(bf16, tokens))
    assert np.isfinite(low).all()
    # bf16 keeps 8 mantissa bits (relative rounding 2^-9 = 0.2%) in every activation and weight;
    # after 3 layers the logits' relative RMS error measures about 1-2%. 5% fails on any real bug
    # (those give errors of order 100%), and top-1 agreement shows the ranking survives.
    relative = np.linalg.norm(low - reference) / np.linalg.norm(reference)
    assert relative < 0.05
    assert (low.argmax(-1) == reference.argmax(-1)).mean() > 0.85  # measured 0.93-0.98


def test_parameter_bytes_of_published_presets():
    """Held bytes with packed experts, from shapes alone (nothing allocated): SPEC 1.1's on-disk sizes."""
    for config, expected in ((GptOssConfig.gpt_oss_20b(), 13_761_264_768), (GptOssConfig.gpt_oss_120b(), 65_248_815_744)):
        abstract = nnx.eval_shape(lambda c=config: GptOss(c, rngs=nnx.Rngs(0)))
        held = sum(v.size * v.dtype.itemsize for v in jax.tree.leaves(nnx.state(abstract)))
        assert held == expected



def test_program_size_does_not_grow_with_depth():
    """Layers run under a scan: 2 and 12 layers lower to programs of the same size (so compile time is flat)."""

    def program_size(layers: int) -> int:
        config = dataclasses.replace(CONFIGS["wide"], num_hidden_layers=layers)
        graphdef, state = nnx.split(nnx.eval_shape(lambda: GptOss(config, rngs=nnx.Rngs(0))))
        tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
        lowered = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)).lower(state, tokens)
        return len(lowered.as_text())

    small, deep = program_size(2), program_size(12)
    assert abs(deep - small) < 0.02 * small  # only the stacked shapes' digits differ

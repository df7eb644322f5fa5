"""The trainable model: gradients through every MoE and attention implementation, LoRA, merge, remat, loss.

An odd config (6 experts choose 3, 3 q heads per kv head, window 7, head_dim 24) and 20-token
sequences that cross the window twice. float32 throughout, so implementations differ only by
summation order.
"""

import dataclasses
import functools
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import build
from flax import nnx

import gptoss_jax
from gptoss_jax import GptOss, GptOssConfig, LoraSpec, merge_lora
from gptoss_jax.loss import cross_entropy
from gptoss_jax.mxfp4 import dequantize

CONFIG = dataclasses.replace(
    GptOssConfig.tiny(), num_hidden_layers=2, num_experts=6, experts_per_token=3, num_attention_heads=6,
    num_key_value_heads=2, head_dim=24, sliding_window=7, vocab_size=311,
)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, CONFIG.vocab_size, (2, 21)))
MASK = jnp.asarray(np.random.default_rng(1).random((2, 20)) < 0.8)  # some positions left out of the loss
LORA = LoraSpec(rank=3, alpha=6.0)


def loss(model: GptOss, tokens: jax.Array = TOKENS) -> jax.Array:
    mask = jnp.resize(MASK, (tokens.shape[0], MASK.shape[1]))
    return cross_entropy(model.hidden(tokens[:, :-1]), model.unembedding[...], tokens[:, 1:], mask, chunk=16)


def gradients(model: GptOss, wrt=nnx.Param, tokens: jax.Array = TOKENS):
    """Gradients of `loss` w.r.t. the `wrt` variables, as a flat {path: array}."""
    grads = nnx.jit(lambda m, t: nnx.grad(loss, argnums=nnx.DiffState(0, wrt))(m, t))(model, tokens)
    return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(grads)}


def lora_model(seed: int = 0, **options) -> GptOss:
    """The LoRA model over `build`'s base weights, with B randomized (at B = 0 the A gradients are 0)."""
    model = GptOss(CONFIG, rngs=nnx.Rngs(seed), dtype=jnp.float32, lora=LORA, **options)
    nnx.update(model, nnx.state(build(CONFIG, seed, expert_format=options.get("expert_format", "mxfp4"))))
    rng = np.random.default_rng(seed + 1)
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        if path[-1] == "b":
            variable.set_value(jnp.asarray(rng.standard_normal(variable.shape), jnp.float32) * 0.05)
    return model


def assert_gradients_close(got: dict, expected: dict, rtol: float) -> None:
    assert got.keys() == expected.keys() and got
    for path, reference in expected.items():
        scale = np.abs(reference).max()
        np.testing.assert_allclose(got[path], reference, rtol=0, atol=rtol * scale + 1e-12, err_msg=str(path))


# float32, the same math in another order (sorted rows, tiles, a kernel's blocks): measured <= 3e-7 of
# each gradient's largest element. 1e-5 of it is far below what a wrong row, expert or transpose moves.
RTOL = 1e-5
IMPLS = [
    pytest.param(dict(moe_impl="grouped"), marks=pytest.mark.slow),  # `auto` below runs grouped too
    dict(moe_impl="auto"),  # grouped at 120 pairs over 6 experts
    dict(moe_impl="gather", attention_impl="pallas"),  # flash attention (interpreted) and its backward kernels
]


@functools.cache
def reference_gradients(kind: str) -> dict:
    """`gather` + XLA attention: LoRA gradients (`kind="lora"`) or every nnx.Param's (`"full"`)."""
    if kind == "lora":
        return gradients(lora_model(moe_impl="gather"), nnx.LoRAParam)
    return gradients(build(CONFIG, moe_impl="gather"))


@pytest.mark.parametrize("impl", IMPLS, ids=lambda i: "-".join(i.values()))
def test_lora_gradients_match_gather_and_xla(impl):
    assert_gradients_close(gradients(lora_model(**impl), nnx.LoRAParam), reference_gradients("lora"), RTOL)


@pytest.mark.slow
@pytest.mark.parametrize("impl", [*IMPLS, dict(moe_impl="pallas")], ids=lambda i: "-".join(i.values()))
def test_full_gradients_match_gather_and_xla(impl):
    """Every nnx.Param (packed experts are frozen `Packed` variables, not parameters)."""
    assert_gradients_close(gradients(build(CONFIG, **impl)), reference_gradients("full"), RTOL)


@pytest.mark.slow
def test_dense_experts_train_through_grouped():
    dense = dict(expert_format="bf16")
    got, expected = gradients(build(CONFIG, moe_impl="grouped", **dense)), gradients(build(CONFIG, moe_impl="gather", **dense))
    assert any("mlp1_weight" in path for path in got)
    assert_gradients_close(got, expected, RTOL)


def test_new_adapters_change_nothing():
    base = build(CONFIG)
    adapted = GptOss(CONFIG, rngs=nnx.Rngs(0), dtype=jnp.float32, lora=LORA)
    nnx.update(adapted, nnx.state(base))
    np.testing.assert_array_equal(np.asarray(nnx.jit(GptOss.__call__)(adapted, TOKENS)), np.asarray(nnx.jit(GptOss.__call__)(base, TOKENS)))


def test_load_builds_adapters_over_a_converted_base(tmp_path):
    """`gptoss_jax.save` then `gptoss_jax.load(path, lora=...)`: every stored weight back bit for bit, and
    new adapters as `GptOss(lora=...)` makes them (B = 0, which test_new_adapters_change_nothing shows
    leaves the logits alone; A with std 1/sqrt(inputs))."""
    saved = build(CONFIG)
    gptoss_jax.save(saved, tmp_path / "base")
    adapted = gptoss_jax.load(tmp_path / "base", dtype="float32", lora=LORA, remat="layer")
    loaded = dict(nnx.to_flat_state(nnx.state(adapted)))
    for path, variable in nnx.to_flat_state(nnx.state(saved)):
        assert np.asarray(loaded[path].get_value()).tobytes() == np.asarray(variable.get_value()).tobytes(), path
    adapters = dict(nnx.to_flat_state(nnx.state(adapted, nnx.LoRAParam)))
    assert adapters and {path[-1] for path in adapters} == {"a", "b"}
    for path, variable in adapters.items():
        value = np.asarray(variable.get_value())
        if path[-1] == "b":
            assert not value.any(), path
        else:
            axes = list(variable.get_metadata()["out_sharding"])  # A is [..., lora, *inputs]
            inputs = int(np.prod(value.shape[axes.index("lora") + 1 :]))
            assert abs(value.std() * inputs**0.5 - 1) < 0.3, path  # hundreds of draws or more: std within 30%


def test_expert_adapters_learn_exactly_where_tokens_went():
    """Experts 1 and 4 can never be chosen (router bias -1e9): after one step their B is still 0 and got
    no gradient; every other expert (each token skips one of the 4 left) got tokens and a gradient."""
    model = GptOss(CONFIG, rngs=nnx.Rngs(0), dtype=jnp.float32, lora=LORA, moe_impl="grouped")
    for blocks in (model.sliding_blocks, model.full_blocks):
        blocks.mlp.router_bias.set_value(blocks.mlp.router_bias[...].at[:, [1, 4]].set(-1e9))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)

    @nnx.jit
    def train_step(model, optimizer):
        grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        return grads

    grads = train_step(model, optimizer)
    for blocks, block_grads in ((model.sliding_blocks, grads["sliding_blocks"]), (model.full_blocks, grads["full_blocks"])):
        for name in ("mlp1_lora", "mlp2_lora"):
            moved = np.abs(np.asarray(block_grads["mlp"][name]["b"].get_value())).max(axis=(2, 3)) > 0  # [layers, experts]
            assert (moved[:, [0, 2, 3, 5]]).all() and not moved[:, [1, 4]].any(), name
            assert not np.asarray(getattr(blocks.mlp, name).b[...])[:, [1, 4]].any()


@pytest.mark.parametrize("expert_format", [pytest.param("bf16", marks=pytest.mark.slow), "mxfp4"])
def test_merge_lora_gives_the_adapted_logits(expert_format):
    model = lora_model(expert_format=expert_format)
    adapted = np.asarray(nnx.jit(GptOss.__call__)(model, TOKENS))
    exact = {  # W + scale * B A, per layer stack and expert matrix, before re-quantizing
        name: np.asarray(
            (dequantize(getattr(blocks.mlp, f"{name}_blocks")[...], getattr(blocks.mlp, f"{name}_scales")[...], jnp.float32)
             if expert_format == "mxfp4" else getattr(blocks.mlp, f"{name}_weight")[...])
            + LORA.scale * getattr(blocks.mlp, f"{name}_lora").b[...] @ getattr(blocks.mlp, f"{name}_lora").a[...]
        )
        for blocks in (model.sliding_blocks,) for name in ("mlp1", "mlp2")
    }
    merged = merge_lora(model, experts="mxfp4")
    assert not nnx.state(merged, nnx.LoRAParam) and merged.expert_format == expert_format
    logits = np.asarray(nnx.jit(GptOss.__call__)(merged, TOKENS))
    if expert_format == "bf16":
        # float32 both ways: W + BA folded first vs applied apart, measured ~1e-6 on logits of ~5.
        np.testing.assert_allclose(logits, adapted, rtol=0, atol=1e-5)
        return
    for name, weights in exact.items():  # each merged value is the nearest code of its block's scale
        mlp = merged.sliding_blocks.mlp
        scales = np.asarray(getattr(mlp, f"{name}_scales")[...], np.float32)
        step = 2.0 ** (scales - 127)[..., None].repeat(32, -1).reshape(weights.shape)  # 1/2 of the widest code gap (4 -> 6)
        error = np.abs(np.asarray(dequantize(getattr(mlp, f"{name}_blocks")[...], getattr(mlp, f"{name}_scales")[...], jnp.float32)) - weights)
        assert (error <= step + 1e-12).all(), name
    # One rounding of every expert weight (<= 1/2 code gap each) moves logits of ~5 by measured ~2e-2.
    assert np.abs(logits - adapted).max() < 0.1


@pytest.mark.parametrize("remat", ["layer", pytest.param("dots_saveable", marks=pytest.mark.slow)])
def test_remat_gives_the_same_gradients(remat):
    # The same float32 operations recomputed: measured bit-identical; 1e-6 allows XLA to fuse differently.
    assert_gradients_close(gradients(lora_model(moe_impl="gather", remat=remat), nnx.LoRAParam), reference_gradients("lora"), 1e-6)


def test_chunked_loss_equals_full_logits():
    model = build(CONFIG)
    h = model.hidden(TOKENS[:, :-1])
    w = model.unembedding[...]

    def full(h, w):
        logits = jnp.einsum("bth,vh->btv", h, w, preferred_element_type=jnp.float32)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), TOKENS[:, 1:, None], axis=-1)[..., 0]
        return jnp.where(MASK, nll, 0).sum() / MASK.sum()

    chunked = lambda h, w: cross_entropy(h, w, TOKENS[:, 1:], MASK, chunk=16)  # noqa: E731  (40 tokens: a ragged last chunk)
    (value, grads), (expected, expected_grads) = (jax.value_and_grad(f, argnums=(0, 1))(h, w) for f in (chunked, full))
    # float32 log-softmax two ways (logsumexp - picked vs log_softmax then pick): measured ~1e-7 relative.
    np.testing.assert_allclose(float(value), float(expected), rtol=1e-6)
    for got, reference in zip(grads, expected_grads):
        np.testing.assert_allclose(np.asarray(got), np.asarray(reference), rtol=0, atol=1e-6 * float(jnp.abs(reference).max()))


@pytest.mark.slow
def test_meshes_give_one_devices_gradients():
    """LoRA gradients on (data, expert, model) meshes (2,2,1), (1,2,2), (4,1,1) of 4 CPU devices:
    expert-parallel all-to-all, tensor-parallel heads and data-parallel rows against one device."""
    script = Path(__file__).with_name("sharded_training_check.py")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(errors) == 3
    for mesh, error in errors.items():
        assert error < RTOL, mesh  # float32; sharding reorders sums (all-reduce, all-to-all) only


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: LoraSpec(rank=0, alpha=1.0), "positive integer"),
        (lambda: LoraSpec(rank=2, alpha=1.0, targets=("q", "gate")), "unknown LoRA targets \\['gate'\\]"),
        (lambda: GptOss(CONFIG, rngs=nnx.Rngs(0), lora=LoraSpec(rank=49, alpha=1.0, targets=("k",))), "exceeds the smaller side of k"),
        (lambda: GptOss(CONFIG, rngs=nnx.Rngs(0), lora=LORA, moe_impl="pallas"), "cannot apply expert adapters"),
        (lambda: GptOss(CONFIG, rngs=nnx.Rngs(0), remat="everything"), "unknown remat 'everything'"),
    ],
)
def test_bad_training_settings_are_clear_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()

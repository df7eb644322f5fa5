"""`moe.grouped` (experts applied to their sorted rows only) equals `moe._gather`, the per-token XLA
reference (`gather` itself runs the C++ kernel on CPU; test_moe.py holds it to `_gather`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_jax import moe

E, K, H, I = 6, 2, 64, 96  # every width differs, so a swapped axis shows
B, T = 2, 37  # 148 (token, expert) copies: ragged over experts, not a multiple of any tile

# float32 on both sides, same products: only the summation order inside the H- and I-long dots
# differs (measured 3-6e-7 of the largest output). 1e-5 of it is far below any routing or
# orientation bug, which moves outputs by a sizeable fraction of their scale.
TOL = 1e-5


def _experts(expert_format: str, seed: int = 0) -> moe.Experts:
    rng = np.random.default_rng(seed)

    def matrices(out: int, inner: int) -> moe.Matrices:
        if expert_format == "mxfp4":  # [E, out, in] packed: every byte value, scales 2^-3..2^0
            blocks = rng.integers(0, 256, (E, out, inner // 32, 16), dtype=np.uint8)
            return moe.PackedMatrices(jnp.asarray(blocks), jnp.asarray(rng.integers(124, 128, (E, out, inner // 32), dtype=np.uint8)))
        return moe.DenseMatrices(jnp.asarray(rng.standard_normal((E, out, inner), np.float32) * inner**-0.5))

    bias = lambda width: jnp.asarray(rng.standard_normal((E, width), np.float32) * 0.1)  # noqa: E731
    return moe.Experts(matrices(2 * I, H), bias(2 * I), matrices(H, I), bias(H), alpha=1.702, limit=7.0)


def _routing(seed: int, used_experts: list[int]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Tokens, K distinct experts per token drawn only from `used_experts` (skewed), softmax weights."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((B, T, E)) + np.linspace(2, 0, E)  # low ids are picked more often
    logits[..., [e for e in range(E) if e not in used_experts]] = -np.inf
    experts_BTK = np.argsort(-logits, axis=-1)[..., :K]
    weights = jax.nn.softmax(jnp.asarray(rng.standard_normal((B, T, K)), jnp.float32), axis=-1)
    tokens = jnp.asarray(rng.standard_normal((B, T, H)), jnp.float32)
    return tokens, jnp.asarray(experts_BTK, jnp.int32), weights


@pytest.mark.parametrize("expert_format", ["mxfp4", "bf16"])
@pytest.mark.parametrize(
    "used_experts, rows_per_tile",
    [
        ([0, 1, 2, 3, 4, 5], None),  # every expert, the default tile
        ([0, 2, 3, 5], 8),  # experts 1 and 4 get no rows; several tiles per expert, ragged tails
        ([1, 4], 256),  # two experts take everything; one tile larger than all the rows
    ],
)
def test_grouped_matches_gather(expert_format, used_experts, rows_per_tile):
    experts = _experts(expert_format)
    tokens, experts_BTK, weights = _routing(seed=len(used_experts), used_experts=used_experts)
    counts = np.bincount(np.asarray(experts_BTK).ravel(), minlength=E)
    assert (counts[[e for e in range(E) if e not in used_experts]] == 0).all() and (counts[used_experts] > 0).all()
    grouped = jax.jit(moe.grouped, static_argnums=4)(experts, tokens, experts_BTK, weights, rows_per_tile)
    reference = jax.jit(moe._gather)(experts, tokens, experts_BTK, weights)
    scale = float(jnp.abs(reference).max())
    assert scale > 0.1
    np.testing.assert_allclose(np.asarray(grouped), np.asarray(reference), rtol=TOL, atol=TOL * scale)


@pytest.mark.parametrize("expert_format", ["mxfp4", "bf16"])
@pytest.mark.parametrize("rows_per_tile", [None, 8])  # one tile per expert, or several with ragged tails
def test_gradients_match_gather(expert_format, rows_per_tile):
    """The custom VJP (the same tile loop through each tile's VJP) against autodiff of `gather`: inputs,
    routing weights, biases and (dense) expert weights; packed bytes get no gradient."""
    experts = _experts(expert_format, seed=1)
    tokens, experts_BTK, weights = _routing(seed=6, used_experts=[0, 2, 3, 5])
    cotangent = jnp.asarray(np.random.default_rng(7).standard_normal(tokens.shape), jnp.float32)

    def loss(function):
        return lambda experts, tokens, weights: (function(experts, tokens, experts_BTK, weights) * cotangent).sum()

    grad = dict(argnums=(0, 1, 2), allow_int=True)
    ours = jax.jit(jax.grad(loss(lambda *a: moe.grouped(*a, rows_per_tile)), **grad))(experts, tokens, weights)
    reference = jax.jit(jax.grad(loss(moe._gather), **grad))(experts, tokens, weights)
    for got, expected in zip(jax.tree.leaves(ours), jax.tree.leaves(reference)):
        if expected.dtype == jax.dtypes.float0:
            assert got.dtype == jax.dtypes.float0
            continue
        scale = float(jnp.abs(expected).max())
        assert scale > 0 or expert_format == "bf16"  # unused experts' dense weights have zero gradient
        # float32 both ways, the same products summed in another order: measured ~1e-7 of the scale.
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=TOL, atol=TOL * scale)


def test_zero_weight_copies_are_dropped_not_computed():
    """The expert-parallel dispatch pads with weight-0 copies of expert 0: they must change nothing,
    even when their rows hold values that would overflow expert 0."""
    experts = _experts("bf16")
    tokens, experts_BTK, weights = _routing(seed=3, used_experts=list(range(E)))
    dropped = jnp.asarray(np.random.default_rng(4).random((B, T, K)) < 0.3)
    weights = jnp.where(dropped, 0.0, weights)
    reference = moe._gather(experts, tokens, experts_BTK, weights)
    poisoned = jnp.where(dropped.all(-1, keepdims=True), jnp.float32(jnp.inf), tokens)  # tokens with no live copy
    out = jax.jit(moe.grouped)(experts, poisoned, jnp.where(dropped, 0, experts_BTK), weights)
    live = ~np.asarray(dropped.all(-1))
    assert live.sum() < B * T and np.isfinite(np.asarray(out)).all()
    scale = float(jnp.abs(reference).max())
    np.testing.assert_allclose(np.asarray(out)[live], np.asarray(reference)[live], rtol=TOL, atol=TOL * scale)
    assert (np.asarray(out)[~live] == 0).all()


@pytest.mark.slow
def test_auto_picks_grouped_for_prefill_only(monkeypatch):
    calls = []
    monkeypatch.setitem(moe.ALGORITHMS, "grouped", lambda *a: calls.append(a[1].shape) or moe.gather(*a))
    experts = _experts("mxfp4")
    tokens, experts_BTK, weights = _routing(seed=5, used_experts=list(range(E)))
    moe.apply("auto", experts, tokens, experts_BTK, weights)
    moe.apply("auto", experts, tokens[:1, :1], experts_BTK[:1, :1], weights[:1, :1])
    assert calls == [tokens.shape]

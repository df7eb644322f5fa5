"""The CPU decode paths, `moe.matvec` (a loop of float32 matrix-vector products) and `moe.native_matvec`
(the C++ kernel), equal `moe.gather`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_jax import moe, native

E, K, H, I = 5, 3, 96, 160  # every width differs (and in/32 = 3, 5 blocks), so a swapped axis shows

# float32 on both sides with the same products (MXFP4 decodes exactly): only the summation order of
# the H- and I-long dot products differs; measured 2-4e-7 of the largest output (~2 dense, ~1e3
# packed). 1e-5 is far below any decode, orientation or routing bug, which moves outputs by O(1).
TOL = 1e-5


def _experts(expert_format: str, rng: np.random.Generator) -> moe.Experts:
    def matrices(out: int, inner: int) -> moe.Matrices:
        if expert_format == "mxfp4":  # [E, out, in] packed: every byte value (all 16 codes in both nibbles)
            blocks = rng.integers(0, 256, (E, out, inner // 32, 16), dtype=np.uint8)
            scales = rng.integers(122, 128, (E, out, inner // 32), dtype=np.uint8)  # 2^-5..2^0
            return moe.PackedMatrices(jnp.asarray(blocks), jnp.asarray(scales))
        return moe.DenseMatrices(jnp.asarray(rng.standard_normal((E, inner, out), np.float32) * inner**-0.5))

    bias = lambda width: jnp.asarray(rng.standard_normal((E, width), np.float32) * 0.1)  # noqa: E731
    return moe.Experts(matrices(2 * I, H), bias(2 * I), matrices(H, I), bias(H), alpha=1.702, limit=7.0)


def _routing(B: int, T: int, rng: np.random.Generator):
    """Tokens, K distinct experts per token, softmax weights."""
    experts_BTK = np.argsort(rng.random((B, T, E)), axis=-1)[..., :K]
    weights = jax.nn.softmax(jnp.asarray(rng.standard_normal((B, T, K)), jnp.float32), axis=-1)
    tokens = jnp.asarray(rng.standard_normal((B, T, H)), jnp.float32)
    return tokens, jnp.asarray(experts_BTK, jnp.int32), weights


def _close(actual, reference):
    scale = float(jnp.abs(reference).max())
    assert scale > 0.1
    np.testing.assert_allclose(np.asarray(actual), np.asarray(reference), rtol=TOL, atol=TOL * scale)


IMPLS = [("matvec", "mxfp4"), ("matvec", "bf16"), ("native", "mxfp4")]
CPU_DECODE = {"matvec": moe.matvec, "native": moe.native_matvec}


@pytest.mark.parametrize("impl, expert_format", IMPLS)
@pytest.mark.parametrize("B, T", [(1, 1), (2, 1), (1, 3)])  # decode, batched decode, a few tokens
def test_cpu_decode_matches_gather(impl, expert_format, B, T):
    rng = np.random.default_rng(B * 10 + T)
    experts = _experts(expert_format, rng)
    tokens, experts_BTK, weights = _routing(B, T, rng)
    out = jax.jit(CPU_DECODE[impl])(experts, tokens, experts_BTK, weights)
    _close(out, jax.jit(moe.gather)(experts, tokens, experts_BTK, weights))


@pytest.mark.parametrize("expert_format", ["mxfp4", "bf16"])
def test_matrix_matvec_matches_decoded_weights(expert_format):
    """Each stored matrix's `matvec` against its decoded `weights` (for MXFP4 the `mxfp4.dequantize`
    reference), every expert, so the float16 code trick and the block transpose are checked alone."""
    rng = np.random.default_rng(7)
    mlp1 = _experts(expert_format, rng).mlp1
    x = jnp.asarray(rng.standard_normal(H), jnp.float32)
    for e in range(E):
        reference = mlp1.weights(jnp.float32)[e] @ x
        _close(jax.jit(mlp1.matvec)(jnp.int32(e), x), reference)


@pytest.mark.parametrize("impl", CPU_DECODE)
def test_zero_weight_pairs_come_out_zero(impl):
    """Expert-parallel decode gives other shards' experts weight 0 (and id 0): a token whose every pair
    has weight 0 comes out 0 even when its values would overflow."""
    rng = np.random.default_rng(3)
    experts = _experts("mxfp4", rng)
    tokens, experts_BTK, weights = _routing(2, 1, rng)
    weights = weights.at[1].set(0.0)
    poisoned = tokens.at[1].set(jnp.inf)
    out = np.asarray(jax.jit(CPU_DECODE[impl])(experts, poisoned, experts_BTK, weights))
    assert (out[1] == 0).all()
    _close(out[:1], moe.gather(experts, tokens[:1], experts_BTK[:1], weights[:1]))


def test_auto_picks_the_native_kernel_for_decode_on_cpu():
    assert jax.default_backend() == "cpu" and native.available()  # CI has a C++ compiler
    rng = np.random.default_rng(5)
    experts = _experts("mxfp4", rng)
    args = (experts, *_routing(1, 1, rng))
    auto = jax.jit(lambda *a: moe.apply_experts("auto", *a))(*args)
    np.testing.assert_array_equal(np.asarray(auto), np.asarray(jax.jit(moe.native_matvec)(*args)))  # the same program

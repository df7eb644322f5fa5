"""`moe.gather`'s and `moe.grouped`'s CPU lowerings (the C++ kernels on packed experts) equal their XLA
formulations, in values and gradients, and `auto` picks the matvec kernel for decode on CPU."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_jax import kernels, moe, native

E, K, H, I = 5, 3, 96, 160  # every width differs (and in/32 = 3, 5 blocks), so a swapped axis shows

# float32 on both sides with the same products (MXFP4 decodes exactly): only the summation order of
# the H- and I-long dot products differs; measured 2-4e-7 of the largest output (~2 dense, ~1e3
# packed). 1e-5 is far below any decode, orientation or routing bug, which moves outputs by O(1).
# The x86 kernels round x to int16 per block of 32 (matvec.cc's `Activations`): through both matrices
# and SwiGLU, measured <= 8e-5 of the largest output (values and gradients alike).
TOL = 5e-4 if native.runnable_levels() and native.level() != "portable" else 1e-5  # the level the kernels run at


def _experts(expert_format: str, rng: np.random.Generator) -> moe.Experts:
    def matrices(out: int, inner: int) -> moe.Matrices:
        if expert_format == "mxfp4":  # [E, out, in] packed: every byte value (all 16 codes in both nibbles)
            blocks = rng.integers(0, 256, (E, out, inner // 32, 16), dtype=np.uint8)
            scales = rng.integers(122, 128, (E, out, inner // 32), dtype=np.uint8)  # 2^-5..2^0
            return moe.PackedMatrices(jnp.asarray(blocks), jnp.asarray(scales))
        return moe.DenseMatrices(jnp.asarray(rng.standard_normal((E, out, inner), np.float32) * inner**-0.5))

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


def _program(*args) -> str:
    return str(jax.make_jaxpr(moe.gather)(*args))


@pytest.mark.parametrize("B, T", [(1, 1), *(pytest.param(*bt, marks=pytest.mark.slow) for bt in [(2, 1), (1, 3)])])  # decode, batched decode, a few tokens
def test_cpu_kernel_matches_xla(B, T):
    assert kernels.cpu_kernels()  # CI installs with the C++ kernels built
    rng = np.random.default_rng(B * 10 + T)
    experts = _experts("mxfp4", rng)
    args = (experts, *_routing(B, T, rng))
    assert "gptoss_mxfp4_matvec" in _program(*args)
    _close(jax.jit(moe.gather)(*args), jax.jit(moe._gather)(*args))


def test_dense_experts_stay_on_xla():
    rng = np.random.default_rng(2)
    assert "gptoss_mxfp4_matvec" not in _program(_experts("bf16", rng), *_routing(1, 1, rng))


@pytest.mark.slow
def test_zero_weight_pairs_come_out_zero():
    """Expert-parallel decode gives other shards' experts weight 0 (and id 0): a token whose every pair
    has weight 0 comes out 0 even when its values would overflow."""
    rng = np.random.default_rng(3)
    experts = _experts("mxfp4", rng)
    tokens, experts_BTK, weights = _routing(2, 1, rng)
    weights = weights.at[1].set(0.0)
    poisoned = tokens.at[1].set(jnp.inf)
    out = np.asarray(jax.jit(moe.gather)(experts, poisoned, experts_BTK, weights))
    assert (out[1] == 0).all()
    _close(out[:1], moe._gather(experts, tokens[:1], experts_BTK[:1], weights[:1]))


def test_cpu_kernel_gradients_are_xlas():
    """The kernel has no VJP: `gather` differentiates as `_gather` (inputs, biases and routing weights)."""
    rng = np.random.default_rng(4)
    experts = _experts("mxfp4", rng)
    tokens, experts_BTK, weights = _routing(2, 1, rng)

    def loss(function):
        return lambda experts, tokens, weights: (function(experts, tokens, experts_BTK, weights) ** 2).sum()

    grads = jax.jit(jax.grad(loss(moe.gather), argnums=(0, 1, 2), allow_int=True))(experts, tokens, weights)
    expected = jax.jit(jax.grad(loss(moe._gather), argnums=(0, 1, 2), allow_int=True))(experts, tokens, weights)
    for got, want in zip(jax.tree.leaves(grads[0]) + list(grads[1:]), jax.tree.leaves(expected[0]) + list(expected[1:])):
        if got.dtype == jax.dtypes.float0:  # the packed bytes: integers, no gradient
            continue
        _close(got, want)


def test_auto_picks_the_cpu_kernel_for_decode():
    rng = np.random.default_rng(5)
    args = (_experts("mxfp4", rng), *_routing(1, 1, rng))
    assert "gptoss_mxfp4_matvec" in str(jax.make_jaxpr(lambda *a: moe.apply("auto", *a))(*args))


def _bf16(experts: moe.Experts) -> moe.Experts:
    """A bfloat16 model's experts: biases in bfloat16 too (the packed bytes are as they are)."""
    return dataclasses.replace(experts, mlp1_bias=experts.mlp1_bias.astype(jnp.bfloat16), mlp2_bias=experts.mlp2_bias.astype(jnp.bfloat16))


def _grouped_in_xla(*args):
    return moe._grouped(*args, rows_per_tile=None)


@pytest.fixture
def grouped_gemm_anywhere(monkeypatch):
    """`grouped` takes the C++ grouped GEMM only on AMX CPUs; forced here, it runs at this CPU's level (the
    same panels and tiles, multiplied by AMX or by scalar loops), so the lowering is tested on any CPU."""
    monkeypatch.setattr(kernels, "gemms_on_amx", lambda x: x.dtype == jnp.bfloat16)


@pytest.mark.parametrize("adapted", [False, True])  # with LoRA adapters on both matrices
def test_grouped_cpu_kernel_matches_xla(adapted, grouped_gemm_anywhere):
    """bfloat16 on both sides, float32 sums of the same exact products in another order: measured equal
    here; one bfloat16 rounding of u flipped the other way moves an output by ~2^-8 of its size. A wrong
    expert, row order, adapter or dropped-pair mask moves outputs by O(1)."""
    rng = np.random.default_rng(6)
    experts = _bf16(_experts("mxfp4", rng))
    if adapted:
        lora = lambda out, inner: moe.LowRank(  # noqa: E731
            jnp.asarray(rng.standard_normal((E, 4, inner)) * inner**-0.5, jnp.bfloat16),
            jnp.asarray(rng.standard_normal((E, out, 4)), jnp.bfloat16), scale=0.5)
        experts = dataclasses.replace(experts, mlp1_lora=lora(2 * I, H), mlp2_lora=lora(H, I))
    tokens, experts_BTK, weights = _routing(2, 37, rng)
    weights = weights.at[0, 3].set(0.0).at[1, 5, 0].set(0.0)  # dropped pairs: a whole token, and one of a token's
    args = (experts, tokens.astype(jnp.bfloat16), experts_BTK, weights)
    assert "gptoss_mxfp4_grouped_gemm" in str(jax.make_jaxpr(moe.grouped)(*args))
    got, want = (np.asarray(jax.jit(lambda *a, f=f: f(*a))(*args), np.float32) for f in (moe.grouped, _grouped_in_xla))  # fresh traces
    np.testing.assert_allclose(got, want, rtol=2**-6, atol=2**-6 * np.abs(want).max())
    assert (got[0, 3] == 0).all()


def test_grouped_cpu_kernel_gradients_are_xlas(grouped_gemm_anywhere):
    rng = np.random.default_rng(7)
    experts = _bf16(_experts("mxfp4", rng))
    tokens, experts_BTK, weights = _routing(1, 9, rng)

    def loss(function):
        return lambda experts, tokens, weights: (function(experts, tokens, experts_BTK, weights).astype(jnp.float32) ** 2).sum()

    args = (experts, tokens.astype(jnp.bfloat16), weights)
    grads = jax.jit(jax.grad(loss(lambda *a: moe.grouped(*a)), argnums=(0, 1, 2), allow_int=True))(*args)
    expected = jax.jit(jax.grad(loss(_grouped_in_xla), argnums=(0, 1, 2), allow_int=True))(*args)
    for got, want in zip(jax.tree.leaves(grads[0]) + list(grads[1:]), jax.tree.leaves(expected[0]) + list(expected[1:])):
        if got.dtype != jax.dtypes.float0:  # the packed bytes: integers, no gradient
            np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))  # both are `_grouped`'s VJP

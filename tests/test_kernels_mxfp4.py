"""MXFP4 Pallas kernels (pallas_kernels.mxfp4 / grouped_matmul / moe) against the XLA references.

Numerics run in interpret mode for both kernel flavours ("gpu" = Pallas Triton, "tpu" = Mosaic with
scalar prefetch). The generic interpreter fills never-written output elements with NaN, so "no NaN"
proves every element was stored (`test_interpreter_poisons_unwritten_outputs` shows the check can fail).
Lowering for H100 and TPU at real gpt-oss-20b shapes runs on abstract shapes (allocates nothing).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from gptoss_jax import moe
from gptoss_jax import mxfp4 as reference
from lowering import assert_lowers
from pallas_kernels import grouped_matmul as gm
from pallas_kernels import moe as pallas_moe
from pallas_kernels import mxfp4

BACKENDS = ("gpu", "tpu")
ALPHA, LIMIT = 1.702, 7.0
PLATFORM = {"gpu": "cuda", "tpu": "tpu"}


def _bits(a: jax.Array) -> np.ndarray:
    return np.asarray(jax.lax.bitcast_convert_type(a, {4: jnp.uint32, 2: jnp.uint16}[a.dtype.itemsize]))


def _packed(rng, *shape, scale_range=(116, 124)):
    """Random blocks and scales of a `[*shape]` weight (shape[-1] % 32 == 0); values up to 6 * 2^-4, as trained ones."""
    *lead, k = shape
    blocks = rng.integers(0, 256, (*lead, k // 32, 16), dtype=np.uint8)
    return blocks, rng.integers(*scale_range, (*lead, k // 32), dtype=np.uint8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dequantize_every_byte_and_scale_bit_exact(dtype, backend):
    # Every byte value under every scale 2..252, the range where both are exact (251 rows of 512 values),
    # plus a random weight with leading dims, K = 32 * 3 and a ragged row tail.
    scales = np.repeat(np.arange(2, 253, dtype=np.uint8)[:, None], 16, axis=1)
    blocks = np.broadcast_to(np.arange(256, dtype=np.uint8).reshape(1, 16, 16), (*scales.shape, 16))
    random_blocks, random_scales = _packed(np.random.default_rng(0), 3, 37, 96)
    for b, s in ((blocks, scales), (random_blocks, random_scales)):
        got = mxfp4.dequantize(b, s, dtype, backend=backend, interpret=True)
        want = reference.dequantize(b, s, dtype)
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_array_equal(_bits(got), _bits(want))  # exact: compare the bit patterns


def test_interpreter_poisons_unwritten_outputs():
    def write_first_half(o_ref):
        o_ref[:4] = jnp.ones((4, 8), jnp.float32)

    out = pl.pallas_call(write_first_half, out_shape=jax.ShapeDtypeStruct((8, 8), jnp.float32), interpret=True)()
    assert np.isnan(out[4:]).all() and (out[:4] == 1).all()


def test_k_steps_cover_k_in_power_of_two_steps():
    assert gm.k_steps(2880, 128) == [(0, 128, 22), (2816, 64, 1)]
    assert gm.k_steps(96, 128) == [(0, 64, 1), (64, 32, 1)]


# (group sizes, N, K, block sizes): empty experts, a group spanning 2+ row tiles, groups straddling
# tiles, rows past sum(group_sizes), odd E, N tails (96 = 64 + 32; 48 = 32 + 16), K = 32 * odd.
CASES = {
    "E5": ([7, 0, 19, 3, 6], 96, 160, gm.BlockSizes(m=16, n=64, k=64), 40),
    "E7": ([0, 2, 0, 17, 1, 0, 1], 48, 96, gm.BlockSizes(m=16, n=32, k=32), 21),
}


def _grouped_reference(x, group_sizes, blocks, scales, bias, epilogue, row_scale=None):
    """Per-row matmul with the row's expert, decoded by the XLA reference, in float64; zeros past the groups."""
    rows = int(np.sum(group_sizes))
    group_R = np.repeat(np.arange(len(group_sizes)), group_sizes)
    w_ENK = np.asarray(reference.dequantize(blocks, scales, jnp.float32), np.float64)
    u_RN = np.einsum("rk,rnk->rn", np.asarray(x[:rows], np.float64), w_ENK[group_R]) + bias[group_R]
    if epilogue == "swiglu":
        y_RN = np.asarray(moe.clamped_swiglu(u_RN, ALPHA, LIMIT))
    else:
        y_RN = u_RN * row_scale[:rows, None]
    return np.concatenate([y_RN, np.zeros((x.shape[0] - rows, y_RN.shape[1]))])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("epilogue", gm.EPILOGUES)
@pytest.mark.parametrize("case,dtype", [("E5", jnp.float32), *(pytest.param(*c, marks=pytest.mark.slow) for c in [("E5", jnp.bfloat16), ("E7", jnp.float32)])])
def test_grouped_matmul_matches_per_row_reference(case, dtype, epilogue, backend):
    sizes, n, k, block_sizes, m = CASES[case]
    rng = np.random.default_rng(1)
    blocks, scales = _packed(rng, len(sizes), n, k)
    bias = rng.standard_normal((len(sizes), n)).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    row_scale = rng.random(m).astype(np.float32) if epilogue == "scale" else None
    xd = jnp.asarray(x, dtype)
    got = gm.grouped_matmul(
        xd, jnp.asarray(sizes, jnp.int32), blocks, scales, bias, row_scale, epilogue=epilogue, alpha=ALPHA,
        limit=LIMIT, block_sizes=block_sizes, backend=backend, interpret=True,
    )
    want = _grouped_reference(np.asarray(xd.astype(jnp.float32)), sizes, blocks, scales, bias, epilogue, row_scale)
    got = np.asarray(got.astype(jnp.float32))
    assert got.shape == want.shape and not np.isnan(got).any()  # every element written
    assert (got[sum(sizes):] == 0).all()  # rows past the groups are zeros
    scale = np.abs(want).max()
    # float32: float32 accumulation over K <= 160 vs float64 (measured <= 2.2e-7 of the largest value).
    # bf16: the reference gets the same bf16 inputs and the weights are exact, so the error is the one
    # rounding of the output to bf16 (<= 2^-8 of each value, bf16's unit roundoff; measured 3.85e-3)
    # plus the float32 accumulation, covered by 1e-5 of the largest value.
    if dtype == jnp.float32:
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * scale)
    else:
        np.testing.assert_allclose(got, want, rtol=2**-8, atol=1e-5 * scale)


# The transposed product: the CASES plus N = 384 over blocks of 128 W rows on TPU (cap 8 x k), summed
# across the grid in the scratch.
TRANSPOSED_CASES = {**CASES, "E4-N384": ([9, 0, 5, 11], 384, 96, gm.BlockSizes(m=16, n=64, k=16), 27)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [pytest.param("E5", marks=pytest.mark.slow), "E7", "E4-N384"])
def test_grouped_matmul_transposed_matches_per_row_reference(case, backend):
    sizes, n, k, block_sizes, m = TRANSPOSED_CASES[case]
    rng = np.random.default_rng(2)
    blocks, scales = _packed(rng, len(sizes), n, k)
    dy = rng.standard_normal((m, n)).astype(np.float32)
    got = np.asarray(gm.grouped_matmul_transposed(
        jnp.asarray(dy), jnp.asarray(sizes, jnp.int32), blocks, scales, block_sizes=block_sizes, backend=backend,
        interpret=True,
    ))
    rows = sum(sizes)
    w_ENK = np.asarray(reference.dequantize(blocks, scales, jnp.float32), np.float64)
    want = np.einsum("rn,rnk->rk", dy[:rows], w_ENK[np.repeat(np.arange(len(sizes)), sizes)])
    assert got.shape == (m, k) and not np.isnan(got).any()  # every element written
    assert (got[rows:] == 0).all()
    # float32 accumulation over N <= 384 vs float64: measured <= 2.2e-7 of the largest value.
    np.testing.assert_allclose(got[:rows], want, rtol=0, atol=2e-6 * np.abs(want).max())


def _packed_experts(rng, num_experts, hidden, intermediate):
    mlp1 = moe.PackedMatrices(*map(jnp.asarray, _packed(rng, num_experts, 2 * intermediate, hidden)))
    mlp2 = moe.PackedMatrices(*map(jnp.asarray, _packed(rng, num_experts, hidden, intermediate)))
    bias1 = jnp.asarray(rng.standard_normal((num_experts, 2 * intermediate)), jnp.float32)
    bias2 = jnp.asarray(rng.standard_normal((num_experts, hidden)), jnp.float32)
    return moe.Experts(mlp1, bias1, mlp2, bias2, alpha=ALPHA, limit=LIMIT)


@pytest.mark.parametrize(
    "tokens,backend",
    [(1, "gpu"), pytest.param(3, "tpu", marks=pytest.mark.slow), (40, "gpu"), pytest.param(40, "tpu", marks=pytest.mark.slow)],
    ids=["decode1", "decode3-tpu", "prefill", "prefill-tpu"],
)
def test_experts_mlp_matches_gather(tokens, backend):
    # 7 experts choose 3 (a decode step leaves most experts empty), H=64, I=96 (mlp2's K = 32 * 3).
    num_experts, top_k, hidden, intermediate = 7, 3, 64, 96
    rng = np.random.default_rng(tokens)
    experts = _packed_experts(rng, num_experts, hidden, intermediate)
    x_MH = jnp.asarray(rng.standard_normal((tokens, hidden)), jnp.float32) * 0.3
    experts_MK = jnp.asarray(np.argsort(rng.random((tokens, num_experts)), axis=1)[:, :top_k], jnp.int32)
    weights_MK = jax.nn.softmax(jnp.asarray(rng.standard_normal((tokens, top_k)), jnp.float32))
    order_C, counts_E = moe.sort_by_expert(experts_MK.reshape(-1), num_experts)
    got = pallas_moe.experts_mlp(
        x_MH, weights_MK, order_C, counts_E, experts.mlp1.blocks, experts.mlp1.scales, experts.mlp1_bias,
        experts.mlp2.blocks, experts.mlp2.scales, experts.mlp2_bias, alpha=ALPHA, limit=LIMIT,
        backend=backend, interpret=True,
    )
    want = moe._gather(experts, x_MH[None], experts_MK[None], weights_MK[None])[0]
    # float32 both; only the summation order differs (K = 64 then 96, 3 experts): measured <= 1.7e-7
    # of the largest value, allowed 2e-6.
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())


@pytest.mark.parametrize("backend", ["tpu", pytest.param("gpu", marks=pytest.mark.slow)])  # gpu: 90 s interpreted
def test_experts_mlp_gradients_match_gather(backend):
    """The kernels' backward (recomputed pre-activations, transposed products) against reverse mode
    through `moe.gather`'s XLA decode: gradients of the tokens, routing weights and both biases."""
    num_experts, top_k, hidden, intermediate, tokens = 5, 2, 64, 96, 11
    rng = np.random.default_rng(7)
    experts = _packed_experts(rng, num_experts, hidden, intermediate)
    x_MH = jnp.asarray(rng.standard_normal((tokens, hidden)), jnp.float32) * 0.3
    experts_MK = jnp.asarray(np.argsort(rng.random((tokens, num_experts)), axis=1)[:, :top_k], jnp.int32)
    experts_MK = experts_MK.at[:, 0].set(jnp.where(experts_MK[:, 0] == 3, 4, experts_MK[:, 0]))  # expert 3: fewer rows
    weights_MK = jax.nn.softmax(jnp.asarray(rng.standard_normal((tokens, top_k)), jnp.float32))
    cotangent = jnp.asarray(rng.standard_normal((tokens, hidden)), jnp.float32)
    order_C, counts_E = moe.sort_by_expert(experts_MK.reshape(-1), num_experts)

    def by_kernels(x, w, b1, b2):
        return jnp.vdot(cotangent, pallas_moe.experts_mlp(
            x, w, order_C, counts_E, experts.mlp1.blocks, experts.mlp1.scales, b1, experts.mlp2.blocks,
            experts.mlp2.scales, b2, alpha=ALPHA, limit=LIMIT, backend=backend, interpret=True,
        ))

    def by_gather(x, w, b1, b2):
        changed = moe.Experts(experts.mlp1, b1, experts.mlp2, b2, alpha=ALPHA, limit=LIMIT)
        return jnp.vdot(cotangent, moe._gather(changed, x[None], experts_MK[None], w[None])[0])

    args = (x_MH, weights_MK, experts.mlp1_bias, experts.mlp2_bias)
    got = jax.grad(by_kernels, argnums=(0, 1, 2, 3))(*args)
    want = jax.grad(by_gather, argnums=(0, 1, 2, 3))(*args)
    # float32 both; only the summation order differs: measured 9.4e-7 (tokens), 1.4e-7 (routing weights) and 0
    # (biases) of each gradient's largest element, both kernel flavours.
    for name, g, w in zip(["x", "routing weights", "mlp1 bias", "mlp2 bias"], got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * np.abs(w).max(), err_msg=name)


# gpt-oss-20b: E = 32, H = I = 2880 (K = 90 blocks of 32), mlp1 N = 5760.
E20, H20 = 32, 2880
S = jax.ShapeDtypeStruct


def _weights(n, k):
    return S((E20, n, k // 32, 16), jnp.uint8), S((E20, n, k // 32), jnp.uint8), S((E20, n), jnp.bfloat16)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_dequantize_lowers(platform):
    blocks, scales, _ = _weights(2 * H20, H20)
    backend = {"cuda": "gpu", "tpu": "tpu"}[platform]
    assert_lowers(mxfp4.dequantize, blocks, scales, platform=platform, backend=backend)


@pytest.mark.parametrize("rows", [16, 4096], ids=["decode", "prefill"])  # the two block-size regimes
@pytest.mark.parametrize("epilogue", gm.EPILOGUES)
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_grouped_matmul_lowers(platform, epilogue, rows):
    n = 2 * H20 if epilogue == "swiglu" else H20
    row_scale = (S((rows,), jnp.float32),) if epilogue == "scale" else ()
    args = (S((rows, H20), jnp.bfloat16), S((E20,), jnp.int32), *_weights(n, H20), *row_scale)
    backend = {"cuda": "gpu", "tpu": "tpu"}[platform]
    assert_lowers(gm.grouped_matmul, *args, platform=platform, epilogue=epilogue, alpha=ALPHA, limit=LIMIT,
                  backend=backend)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_experts_mlp_lowers(platform):
    tokens, top_k = 8, 4
    args = (
        S((tokens, H20), jnp.bfloat16), S((tokens, top_k), jnp.bfloat16), S((tokens * top_k,), jnp.int32),
        S((E20,), jnp.int32), *_weights(2 * H20, H20), *_weights(H20, H20),
    )
    backend = {"cuda": "gpu", "tpu": "tpu"}[platform]
    assert_lowers(pallas_moe.experts_mlp, *args, platform=platform, alpha=ALPHA, limit=LIMIT, backend=backend)


@pytest.mark.parametrize("rows", [16, 4096], ids=["decode", "prefill"])
@pytest.mark.parametrize("n", [2 * H20, H20], ids=["mlp1", "mlp2"])
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_grouped_matmul_transposed_lowers(platform, n, rows):
    blocks, scales, _ = _weights(n, H20)
    backend = {"cuda": "gpu", "tpu": "tpu"}[platform]
    assert_lowers(gm.grouped_matmul_transposed, S((rows, n), jnp.bfloat16), S((E20,), jnp.int32), blocks, scales,
                  platform=platform, backend=backend)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_experts_mlp_backward_lowers(platform):
    tokens, top_k = 64, 4
    args = (
        S((tokens, H20), jnp.bfloat16), S((tokens, top_k), jnp.bfloat16), S((tokens * top_k,), jnp.int32),
        S((E20,), jnp.int32), *_weights(2 * H20, H20), *_weights(H20, H20),
    )
    backend = {"cuda": "gpu", "tpu": "tpu"}[platform]

    def loss(x, w, *rest):
        out = pallas_moe.experts_mlp(x, w, *rest, alpha=ALPHA, limit=LIMIT, backend=backend)
        return jnp.sum(out.astype(jnp.float32))

    assert_lowers(jax.grad(loss, argnums=(0, 1)), *args, platform=platform)

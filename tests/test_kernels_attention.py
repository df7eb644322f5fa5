"""Flash attention with sinks (Pallas Triton) and the splash wrapper (TPU) against `attention.attend`.

Numerics run in interpret mode, where Pallas fills outputs and out-of-bounds block padding with NaN, so
an unwritten output element or an unmasked padded read shows as NaN. Shapes are odd on purpose: T = 45
and S = 50 leave ragged tails for 8-query and 16-key tiles, G = 3 and D = 24 are padded to powers of two
inside the kernel. GPU and TPU code generation is checked by lowering at gpt-oss shapes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lowering import assert_lowers, lower

from gptoss_jax.attention import attend
from pallas_kernels import flash_attention as fa
from pallas_kernels.splash import splash_attention

B, T, S, N, G, D = 4, 45, 50, 2, 3, 24
TILES = dict(block_q=8, block_k=16)  # 32 x 16 logit tiles: several per band, ragged at both tails
# Per batch row (q_start, k_start): prefill from 0 (keys past T are in the future); chunked prefill of
# positions 5..49 against 5 cached keys; the first 7 key slots absent (negative positions); queries
# 0..44 against keys 30..79, so rows 0..29 see no key at all.
Q_START, K_START = jnp.array([0, 5, 0, 0]), jnp.array([0, 0, -7, 30])
WINDOWS = [None, 1, 5, 7, 64]  # 64 >= T + S: a window that never cuts


def _inputs(seed: int, dtype=jnp.float32):
    kq, kk, kv, ks = jax.random.split(jax.random.key(seed), 4)
    return (jax.random.normal(kq, (B, T, N, G, D), dtype), jax.random.normal(kk, (B, S, N, D), dtype),
            jax.random.normal(kv, (B, S, N, D), dtype), jax.random.normal(ks, (N, G), jnp.float32) * 2)


@jax.jit(static_argnames="window")
def _reference(q, k, v, sinks, q_start, k_start, *, window):
    k_pos = k_start[:, None] + jnp.arange(k.shape[1])
    return attend(q, k, v, q_start[:, None] + jnp.arange(q.shape[1]), jnp.where(k_pos >= 0, k_pos, -1), sinks, window)


def _flash(q, k, v, sinks, *, window, q_start=Q_START, k_start=K_START):
    return fa.flash_attention(q, k, v, sinks, q_start, k_start, window=window, interpret=True, **TILES)


def _no_visible_key(window) -> np.ndarray:
    """[B, T] rows whose every key is masked, by brute force over positions."""
    q_pos, k_pos = (Q_START[:, None] + np.arange(T))[:, :, None], (K_START[:, None] + np.arange(S))[:, None]
    visible = (k_pos >= 0) & (k_pos <= q_pos) & (True if window is None else q_pos - k_pos < window)
    return ~visible.any(-1)


def _grad(attention, cotangent):
    """d/d(q, k, v, sinks) of sum(attention(q, k, v, sinks, ...) * cotangent)."""
    return jax.grad(lambda *a: jnp.sum(attention(*a).astype(jnp.float32) * cotangent), argnums=(0, 1, 2, 3))


def _assert_gradients_close(ours, want):
    for name, got, expected in zip(("dq", "dk", "dv", "dsinks"), ours, want):
        assert np.isfinite(got).all(), name  # interpret mode's NaN-filled outputs: every element written
        # f32 sums of up to 50 x 3 terms in another order; measured <= 6e-7 of the largest entry.
        np.testing.assert_allclose(got, expected, atol=4e-6 * float(jnp.abs(expected).max()), err_msg=name)


@pytest.mark.parametrize("window", [w if w in (None, 5) else pytest.param(w, marks=pytest.mark.slow) for w in WINDOWS])
def test_forward_matches_reference_f32(window):
    q, k, v, sinks = _inputs(0)
    out = _flash(q, k, v, sinks, window=window)
    # Same f32 math in another order (online softmax, exp2): a few ulps of O(1) outputs (measured <= 5e-7).
    np.testing.assert_allclose(out, _reference(q, k, v, sinks, Q_START, K_START, window=window), atol=2e-6)
    # Rows that see no key output exactly 0 (only the sink), and every element was written (not NaN).
    dead = _no_visible_key(window)
    assert dead[3, :30].all() and not dead[0].any()
    assert np.all(np.asarray(out)[dead] == 0) and np.isfinite(out).all()


@pytest.mark.slow
def test_other_tile_shapes_match_reference():
    q, k, v, sinks = _inputs(1)
    out = fa.flash_attention(q, k, v, sinks, Q_START, K_START, window=7, block_q=4, block_k=32, interpret=True)
    np.testing.assert_allclose(out, _reference(q, k, v, sinks, Q_START, K_START, window=7), atol=2e-6)  # as above


@pytest.mark.slow
def test_forward_bf16_within_the_references_own_rounding():
    q, k, v, sinks = _inputs(2, jnp.bfloat16)
    exact = _reference(*(x.astype(jnp.float32) for x in (q, k, v)), sinks, Q_START, K_START, window=5)
    kernel_error = jnp.abs(_flash(q, k, v, sinks, window=5).astype(jnp.float32) - exact).max()
    reference_error = jnp.abs(_reference(q, k, v, sinks, Q_START, K_START, window=5).astype(jnp.float32) - exact).max()
    # Both round probabilities to bf16 before the PV product and the output to bf16 (2^-9 relative);
    # the kernel keeps f32 logits where the reference rounds them to bf16, so it must not be worse.
    assert 0 < kernel_error <= max(reference_error, 2**-7), (kernel_error, reference_error)


@pytest.mark.slow
def test_extreme_sinks():
    q, k, v, _ = _inputs(3)
    # Head g = 0 has sink 30 (e^30 outweighs every key: output ~ 0); the others -30 (plain softmax).
    sinks = jnp.array([30.0, -30.0, -30.0])[None].repeat(N, 0)
    out = _flash(q, k, v, sinks, window=None)[:3]  # batch row 3 has rows with no key: plain softmax is NaN there
    plain = _reference(q, k, v, jnp.full((N, G), -jnp.inf), Q_START, K_START, window=None)[:3]
    # |o| <= 50 keys * e^(max logit ~ 4) * max|v| / e^30 ~ 1e-9.
    assert jnp.abs(out[..., 0, :]).max() < 1e-7
    np.testing.assert_allclose(out[..., 1:, :], plain[..., 1:, :], atol=2e-6)  # e^-30 is below f32 resolution


@pytest.mark.parametrize("window", [pytest.param(None, marks=pytest.mark.slow), 5])  # window 1 costs another 10 s; masks are shared with the forward
def test_gradients_match_reference(window):
    q, k, v, sinks = _inputs(4)
    cotangent = jax.random.normal(jax.random.key(5), q.shape)
    ours = _grad(lambda *a: _flash(*a, window=window), cotangent)(q, k, v, sinks)
    want = _grad(lambda *a: _reference(*a, Q_START, K_START, window=window), cotangent)(q, k, v, sinks)
    _assert_gradients_close(ours, want)


@pytest.mark.parametrize("window", [None, 1, 5, 7, 128])
def test_band_holds_exactly_the_tiles_with_visible_keys(window):
    """Band skipping: each loop range equals, by brute force, the set of tiles holding a visible pair."""
    geo = fa._Geometry(T=45, S=70, G=1, D=16, window=window, block_q=8, block_k=16)
    q_pos, k_pos = np.arange(geo.T)[:, None], np.arange(geo.S)[None]
    for q_start, k_start in [(0, 0), (20, 0), (3, -20), (0, 40), (60, 10)]:
        visible = (k_pos + k_start >= 0) & (k_pos + k_start <= q_pos + q_start)
        if window is not None:
            visible &= q_pos + q_start - (k_pos + k_start) < window
        tiles_qk = np.pad(visible, ((0, 3), (0, 10))).reshape(6, 8, 5, 16).any((1, 3))  # [q tile, k tile]
        for i in range(6):
            first, end = fa._key_tiles(geo, q_start, k_start, i * 8)
            assert list(range(first, end)) == list(np.flatnonzero(tiles_qk[i])), (q_start, k_start, i)
        for j in range(5):
            first, end = fa._query_tiles(geo, q_start, k_start, j * 16)
            assert list(range(first, end)) == list(np.flatnonzero(tiles_qk[:, j])), (q_start, k_start, j)


def test_rejects_tiles_triton_cannot_build():
    q, k, v, sinks = _inputs(0)
    with pytest.raises(ValueError, match="powers of two"):
        fa.flash_attention(q, k, v, sinks, Q_START, K_START, window=None, block_q=6, interpret=True)
    with pytest.raises(ValueError, match=">= 16 rows"):
        fa.flash_attention(q, k, v, sinks, Q_START, K_START, window=None, block_q=2, interpret=True)


@pytest.mark.slow
@pytest.mark.parametrize("window", [None, 5])
def test_splash_matches_reference_forward_and_backward(window):
    """Training / uncached prefill: S == T, positions from 0; T = 130 pads to two 128-blocks."""
    kq, kk, kv, ks, kc = jax.random.split(jax.random.key(6), 5)
    q, cotangent = jax.random.normal(kq, (1, 130, N, G, 16)), jax.random.normal(kc, (1, 130, N, G, 16))
    k, v = jax.random.normal(kk, (1, 130, N, 16)), jax.random.normal(kv, (1, 130, N, 16))
    sinks, start = jax.random.normal(ks, (N, G)), jnp.zeros(1, jnp.int32)

    ours = splash_attention(q, k, v, sinks, start, start, window=window, interpret=True)
    # Splash scales q before the product (one extra f32 rounding) and sums in another order.
    np.testing.assert_allclose(ours, _reference(q, k, v, sinks, start, start, window=window), atol=2e-6)
    got = _grad(lambda *a: splash_attention(*a, start, start, window=window, interpret=True), cotangent)
    want = _grad(lambda *a: _reference(*a, start, start, window=window), cotangent)
    _assert_gradients_close(got(q, k, v, sinks), want(q, k, v, sinks))


# gpt-oss-20b/120b attention: 8 kv heads x 8 q heads, head_dim 64, a 4096-token prefill, bf16.
_REAL = (jax.ShapeDtypeStruct((1, 4096, 8, 8, 64), jnp.bfloat16), jax.ShapeDtypeStruct((1, 4096, 8, 64), jnp.bfloat16),
         jax.ShapeDtypeStruct((1, 4096, 8, 64), jnp.bfloat16), jax.ShapeDtypeStruct((8, 8), jnp.bfloat16),
         jax.ShapeDtypeStruct((1,), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32))


@pytest.mark.parametrize("window", [128, None])
def test_flash_lowers_for_h100(window):
    assert_lowers(fa.flash_attention, *_REAL, platform="cuda", window=window)
    text = lower(_grad(functools.partial(fa.flash_attention, window=window), 1.0), *_REAL, platform="cuda")
    assert text.count("__gpu") == 3, "forward, dq and dk/dv kernels"


@pytest.mark.parametrize("window", [128, None])
def test_splash_lowers_for_tpu(window):
    assert_lowers(splash_attention, *_REAL, platform="tpu", window=window)
    assert_lowers(_grad(functools.partial(splash_attention, window=window), 1.0), *_REAL, platform="tpu")

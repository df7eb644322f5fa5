"""`attention.attend_long` (banded sliding windows, key chunks with an online softmax) against the
reference `attention.attend`, on odd sizes: windows and chunks that do not divide the lengths, key
positions out of order (a ring cache), empty slots, a -inf sink, and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_jax.attention import attend, attend_long

B, N, G, D = 2, 3, 2, 8


def _inputs(T: int, S: int, seed: int):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((B, T, N, G, D)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, S, N, D)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, S, N, D)), jnp.float32)
    sinks = jnp.asarray(rng.standard_normal((N, G)), jnp.float32)
    return q, k, v, sinks


# float32 both ways; only the order of the softmax's sums differs (measured <= 5e-7 here), while a
# key wrongly seen or missed moves outputs by O(1 / keys seen) >= 1e-2.
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T, window", [(23, 5), (40, 7), (11, 5), (64, 16)])
def test_banded_sliding_layer_without_cache(T, window):
    q, k, v, sinks = _inputs(T, T, T + window)
    k = k[:, :T]
    positions = jnp.array([[0], [9]]) + jnp.arange(T)  # the rows start at different positions
    got = attend_long(q, k, v, positions, positions, sinks, window, same_positions=True)
    np.testing.assert_allclose(got, attend(q, k, v, positions, positions, sinks, window), **TOLERANCE)


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("T, S, chunk", [(5, 37, 8), (1, 30, 7), (9, 16, 16)])
def test_key_chunks_with_a_cache(T, S, chunk, window):
    """Keys as a cache holds them: a ring's slots out of position order, empty slots (-1), and slots past
    the queries; the chunks do not divide S, and some chunks hold no key any query sees."""
    q, k, v, sinks = _inputs(T, S, S + T)
    rng = np.random.default_rng(S)
    k_pos = np.stack([rng.permutation(S) for _ in range(B)]) - 3  # -3..-1: empty slots (all < 0 read as empty)
    k_pos = jnp.asarray(np.where(k_pos < 0, -1, k_pos))
    q_pos = jnp.array([[S - 8], [S - 20]]) + jnp.arange(T)  # later keys are in the future of some queries
    got = attend_long(q, k, v, q_pos, k_pos, sinks, window, same_positions=False, key_chunk=chunk)
    np.testing.assert_allclose(got, attend(q, k, v, q_pos, k_pos, sinks, window), **TOLERANCE)


def test_a_minus_infinity_sink_and_a_chunk_with_nothing_seen_first():
    """Sinks of -inf (no sink) while the first chunks hold only empty slots: the running max stays -inf
    until a key is seen, which must not turn into NaN."""
    q, k, v, _ = _inputs(3, 20, 0)
    k_pos = jnp.broadcast_to(jnp.where(jnp.arange(20) < 12, -1, jnp.arange(20) - 12), (B, 20))
    q_pos = jnp.broadcast_to(jnp.arange(3) + 5, (B, 3))
    sinks = jnp.full((N, G), -jnp.inf)
    got = attend_long(q, k, v, q_pos, k_pos, sinks, None, same_positions=False, key_chunk=4)
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(got, attend(q, k, v, q_pos, k_pos, sinks, None), **TOLERANCE)


@pytest.mark.parametrize("window, same", [(5, True), (None, False)])
def test_gradients_match(window, same):
    T = 17
    q, k, v, sinks = _inputs(T, T, 7)
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))

    def loss(attention, q, k, v, sinks):
        return jnp.sum(jnp.sin(attention(q, k, v, positions, positions, sinks, window)))

    long = lambda *a: attend_long(*a, same_positions=same, key_chunk=4)  # noqa: E731
    ours = jax.grad(lambda *a: loss(long, *a), argnums=(0, 1, 2, 3))(q, k, v, sinks)
    reference = jax.grad(lambda *a: loss(attend, *a), argnums=(0, 1, 2, 3))(q, k, v, sinks)
    for got, expected in zip(ours, reference):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_no_long_logits_are_held():
    """A 1024-key full layer in chunks of 256: no array in the program has the whole [B, N, S, G, T]."""
    q, k, v, sinks = _inputs(64, 1024, 1)
    positions = jnp.broadcast_to(jnp.arange(1024), (B, 1024))
    program = jax.jit(lambda q, k, v: attend_long(q, k, v, positions[:, 960:], positions, sinks, None, same_positions=False,
                                                  key_chunk=256)).lower(q, k, v).compile().as_text()
    assert f"f32[{B},{N},1024,{G},64]" not in program and f"f32[{B},{N},256,{G},64]" in program


def test_a_cache_is_read_where_it_is():
    """Decoding against a long cache slices each chunk out of it: the step's scratch memory is a small
    part of the cache (padding or reordering it into chunks copied all of it every token)."""
    S = 4000  # not a multiple of the chunk: the last chunk is clamped, not padded
    q, k, v, sinks = _inputs(1, S, 2)
    positions = jnp.broadcast_to(jnp.arange(S), (B, S))
    step = jax.jit(lambda q, k, v: attend_long(q, k, v, positions[:, -1:], positions, sinks, None, same_positions=False,
                                               key_chunk=256))
    scratch = step.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
    assert scratch < (k.nbytes + v.nbytes) / 4, scratch
    np.testing.assert_allclose(step(q, k, v), attend(q, k, v, positions[:, -1:], positions, sinks, None), **TOLERANCE)

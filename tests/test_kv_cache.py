"""Cached generation equals one full forward; the ring and the masks match small literal tables."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CONFIGS, build, forward, step
from flax import nnx

from gptoss_jax.kv_cache import full_plan, ring_plan
from gptoss_jax.attention import attend

# Cached and uncached runs compute the same float32 function, summed in other orders: attention over
# differently shaped (masked, ring-ordered) key sets, and the MoE as one grouped pass over a long chunk
# but per token (the C++ kernel on CPU) for short ones. Each reordering moves a sum by about an ulp of
# its size and the layers compound that: measured max |error| 3.7e-6 (odd, ragged chunks: the default
# suite), 2.3e-6 (odd, one chunk), 3.9e-6 (wide, ragged), 2.9e-6 (wide, one chunk) and 2.4e-6 (rows of
# different lengths), on logits up to 5. 1e-5 is 2.5x the worst of them.
ATOL = 1e-5
step_last_only = nnx.jit(lambda model, tokens, cache, valid: model.step(tokens, cache, valid, last_only=True))


def _chunked(model, tokens: np.ndarray, chunks: list[int], max_len: int, valid: np.ndarray | None = None):
    cache = model.init_cache(tokens.shape[0], max_len)
    outputs, start = [], 0
    for size in chunks:
        lengths = np.full(tokens.shape[0], size) if valid is None or start else valid
        logits, cache = step(model, jnp.asarray(tokens[:, start : start + size]), cache, jnp.asarray(lengths, jnp.int32))
        outputs.append(np.asarray(logits))
        start += size
    return np.concatenate(outputs, axis=1), cache


@pytest.mark.parametrize("chunks", [[3, 1, 1, 12, 1, 1, 1, 20], pytest.param([45], marks=pytest.mark.slow)], ids=["ragged-chunks", "one-chunk"])
def test_prefill_and_decode_equal_full_forward(config, chunks):
    """Chunks shorter and longer than the window, single steps across ring wrap-arounds."""
    model = build(config)
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, (2, sum(chunks)))
    full = np.asarray(forward(model, jnp.asarray(tokens)))
    cached, cache = _chunked(model, tokens, chunks, max_len=64)
    np.testing.assert_allclose(cached, full, atol=ATOL, rtol=0)
    assert cache.lengths.tolist() == [sum(chunks)] * 2
    assert cache.sliding.k.shape[2] == config.sliding_window  # the ring holds exactly one window


@pytest.mark.slow
def test_rows_of_different_lengths_decode_independently():
    """A padded batch (prompts of 7 and 19 tokens) gives each row the logits it gets alone."""
    config = CONFIGS["odd"]
    model = build(config)
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, config.vocab_size, (2, 19 + 6))
    prompt_lengths = np.array([7, 19])
    cache = model.init_cache(2, 32)
    # A full forward of each row's own sequence gives, at position p, what that row alone yields.
    alone = [np.asarray(forward(model, jnp.asarray(tokens[row : row + 1])))[0] for row in range(2)]
    prompts = np.where(np.arange(19) < prompt_lengths[:, None], tokens[:, :19], 0)
    last, _ = step_last_only(model, jnp.asarray(prompts), model.init_cache(2, 32), jnp.asarray(prompt_lengths, jnp.int32))
    for row, length in enumerate(prompt_lengths):  # the logits of each row's last prompt token, as sampling uses
        np.testing.assert_allclose(np.asarray(last)[row, 0], alone[row][length - 1], atol=ATOL, rtol=0)
    _, cache = step(model, jnp.asarray(prompts), cache, jnp.asarray(prompt_lengths, jnp.int32))
    for i in range(6):  # row 0 continues at position 7 + i, row 1 at 19 + i
        nxt = np.stack([tokens[0, 7 + i], tokens[1, 19 + i]])[:, None]
        logits, cache = step(model, jnp.asarray(nxt), cache, jnp.ones(2, jnp.int32))
        for row, length in enumerate(prompt_lengths):
            np.testing.assert_allclose(np.asarray(logits)[row, 0], alone[row][length + i], atol=ATOL, rtol=0)


def test_ring_plan_literal():
    """Window 4, 6 tokens cached, 3 new (1 real in row 1): slots hold positions 4, 5, 2, 3."""
    plan = ring_plan(jnp.array([6, 6]), jnp.array([3, 1]), num_new=3, slots=4)
    assert plan.key_positions.tolist() == [[4, 5, 2, 3, 6, 7, 8]] * 2
    assert plan.write_slots.tolist() == [[2, 3, 0], [2, 4, 4]]  # 4 = out of range: not written
    plan = ring_plan(jnp.array([2]), jnp.array([6]), num_new=6, slots=4)
    assert plan.key_positions.tolist() == [[0, 1, -1, -1, 2, 3, 4, 5, 6, 7]]
    assert plan.write_slots.tolist() == [[4, 4, 0, 1, 2, 3]]  # only the last 4 survive


def test_full_plan_literal():
    plan = full_plan(jnp.array([3]), jnp.array([2]), num_new=3, max_len=6)
    assert plan.key_positions.tolist() == [[0, 1, 2, 3, 4, 5]]
    assert plan.write_slots.tolist() == [[3, 4, 6]]


@pytest.mark.slow
def test_attention_masks_literal():
    """With equal logits and a -inf sink, each output is the mean of the visible one-hot values."""
    T = 5
    q = jnp.zeros((1, T, 1, 1, T))
    v = jnp.eye(T)[None, :, None, :]
    pos = jnp.arange(T)[None]
    sliding = np.asarray(attend(q, q[:, :, :, 0], v, pos, pos, jnp.full((1, 1), -jnp.inf), window=3))[0, :, 0, 0]
    visible = np.array(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 1, 1, 1]], np.float32
    )
    np.testing.assert_allclose(sliding, visible / visible.sum(1, keepdims=True), atol=1e-7)
    full = np.asarray(attend(q, q[:, :, :, 0], v, pos, pos, jnp.full((1, 1), -jnp.inf), window=None))[0, :, 0, 0]
    causal = np.tril(np.ones((T, T), np.float32))
    np.testing.assert_allclose(full, causal / causal.sum(1, keepdims=True), atol=1e-7)


@pytest.mark.slow
def test_sink_takes_its_share_of_the_softmax():
    """A sink logit s beside n equal zero logits leaves each key e^0 / (e^s + n)."""
    q = jnp.zeros((1, 1, 1, 1, 4))
    v = jnp.ones((1, 3, 1, 4))
    out = attend(q, q[:, :1, :, 0].repeat(3, 1), v, jnp.array([[2]]), jnp.arange(3)[None], jnp.full((1, 1), 2.0), None)
    np.testing.assert_allclose(np.asarray(out), 3 / (np.exp(2.0) + 3), rtol=1e-6)
    huge_sink = attend(q, q[:, :1, :, 0].repeat(3, 1), v, jnp.array([[2]]), jnp.arange(3)[None], jnp.full((1, 1), 80.0), None)
    assert np.abs(np.asarray(huge_sink)).max() < 1e-30

"""The C++ one-token attention kernel (`native.decode_attention`) against `attention.attend` in float32,
on every instruction-set level this CPU runs: odd head counts and sizes, keys in ring order with empty
slots, windows, more keys than one part (512), parts and rows that see no key, and -inf sinks."""

import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_jax import native
from gptoss_jax.attention import attend

LEVELS_HERE = native.runnable_levels()


def _case(B, S, N, G, D, seed):
    rng = np.random.default_rng(seed)
    bf16 = lambda shape: jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)  # noqa: E731
    positions = np.stack([rng.permutation(S) - 3 for _ in range(B)])  # ring order; slots holding -3..-1 are empty
    sinks = rng.standard_normal((N, G)).astype(np.float32)
    sinks[0, 0] = -np.inf
    return bf16((B, 1, N, G, D)), bf16((B, S, N, D)), bf16((B, S, N, D)), jnp.asarray(positions, jnp.int32), jnp.asarray(sinks)


@pytest.mark.parametrize("at", LEVELS_HERE)
@pytest.mark.parametrize(
    "B, S, N, G, D, window, q_pos",
    [
        (2, 37, 3, 5, 24, None, (20, 33)),
        (2, 37, 3, 5, 24, 7, (20, 33)),
        (3, 1100, 2, 9, 22, 7, (600, 1096, -1)),  # 3 parts of keys, most unseen; a row that sees none
        (1, 1100, 1, 8, 64, None, (1096,)),
        (1, 129, 8, 8, 64, 128, (130,)),  # a gpt-oss-20b sliding ring
    ],
)
def test_matches_attend(B, S, N, G, D, window, q_pos, at):
    q, k, v, k_pos, sinks = _case(B, S, N, G, D, seed=S + G + D)
    q_pos = jnp.asarray(q_pos, jnp.int32)[:, None]
    got = np.asarray(native.decode_attention(q[:, 0], k, v, q_pos[:, 0], k_pos, sinks, window, at=at))
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    want = np.asarray(attend(f32(q), f32(k), f32(v), q_pos, k_pos, sinks, window))[:, 0]
    # float32 both ways, sums in another order and the kernel's exp within ~2 ulp: measured <= 4e-7 on
    # outputs of size ~1; a key wrongly seen or missed moves an output by ~1e-2 or more.
    np.testing.assert_allclose(got, want, rtol=0, atol=5e-6)
    # (NaN where attend gives it: a head with a -inf sink in a row that sees no key.)
    assert np.isnan(got).any() == bool((q_pos < 0).any())


def test_mismatched_shapes_are_an_error():
    q, k, v, k_pos, sinks = _case(1, 8, 2, 3, 4, seed=0)
    with pytest.raises(ValueError, match="need bfloat16 k, v"):
        native.decode_attention(q[:, 0], k.astype(jnp.float32), v, jnp.zeros(1, jnp.int32), k_pos, sinks, None)
    with pytest.raises(ValueError, match="need bfloat16 k, v"):
        native.decode_attention(q[:, 0, :1], k, v, jnp.zeros(1, jnp.int32), k_pos, sinks, None)

"""The KV cache: full layers keep every position, sliding layers a ring of `window` slots.

A sliding layer's query sees only the last `window` keys (itself included), so its cache needs exactly
`window` slots, written at `position % window`: for long contexts this halves the KV memory. Rows of a
batch advance independently (`lengths`), so prompts of different lengths share one cache.

Each call with `T` new tokens works from a `WritePlan`, computed once per call and shared by all
layers of one kind: the absolute position of every key the layer attends to, and the slot every new
token is written to (out of range = not written, for padding and for tokens a ring would overwrite).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class WritePlan:
    key_positions: jax.Array  # [B, S] absolute position of each key, -1 for an empty slot
    write_slots: jax.Array  # [B, T] slot of each new token; `slots` (out of range) = drop
    ring: bool = dataclasses.field(metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
    """Keys and values of one layer (or a stack of layers, with a leading layer axis)."""

    k: jax.Array  # [B, slots, N, D]
    v: jax.Array  # [B, slots, N, D]

    def attend_to(self, plan: WritePlan, k_new: jax.Array, v_new: jax.Array) -> tuple[jax.Array, jax.Array, LayerCache]:
        """Keys and values the new tokens attend to (positions in `plan.key_positions`), and the updated cache.

        A ring is read before it is written, since a chunk longer than the window overwrites keys its
        first tokens still need; a full cache is written first and read whole.
        """
        rows = jnp.arange(k_new.shape[0])[:, None]
        written = LayerCache(
            k=self.k.at[rows, plan.write_slots].set(k_new, mode="drop"),
            v=self.v.at[rows, plan.write_slots].set(v_new, mode="drop"),
        )
        if plan.ring:
            keys = jnp.concatenate([self.k, k_new], axis=1)
            values = jnp.concatenate([self.v, v_new], axis=1)
            return keys, values, written
        return written.k, written.v, written


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Caches of all layers: sliding layers stacked in `sliding`, full layers in `full`."""

    sliding: LayerCache  # [ceil(L/2), B, window, N, D]
    full: LayerCache  # [floor(L/2), B, max_len, N, D]
    lengths: jax.Array  # [B] int32, tokens cached so far in each row

    @property
    def max_len(self) -> int:
        return self.full.k.shape[2]

    def logical_axes(self) -> KVCache:
        """Each array's logical axis names, for `sharding.place_tree`: rows by batch, kv heads by heads."""
        layer = LayerCache(k=("layers", "batch", None, "kv_heads", "head_dim"), v=("layers", "batch", None, "kv_heads", "head_dim"))
        return KVCache(sliding=layer, full=layer, lengths=("batch",))

    @classmethod
    def create(
        cls, *, num_layers: int, batch: int, max_len: int, window: int, kv_heads: int, head_dim: int, dtype: jnp.dtype
    ) -> KVCache:
        def zeros(layers: int, slots: int) -> LayerCache:
            shape = (layers, batch, slots, kv_heads, head_dim)
            return LayerCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

        return cls(
            sliding=zeros((num_layers + 1) // 2, min(window, max_len)),
            full=zeros(num_layers // 2, max_len),
            lengths=jnp.zeros((batch,), jnp.int32),
        )

    def plans(self, num_new: int, valid_lengths: jax.Array) -> tuple[WritePlan, WritePlan]:
        """Write plans (sliding, full) for `num_new` tokens of which the first `valid_lengths[b]` are real."""
        return (
            ring_plan(self.lengths, valid_lengths, num_new, self.sliding.k.shape[2]),
            full_plan(self.lengths, valid_lengths, num_new, self.max_len),
        )


def query_positions(lengths: jax.Array, num_new: int) -> jax.Array:
    """[B, T] absolute positions of the new tokens."""
    return lengths[:, None] + jnp.arange(num_new, dtype=jnp.int32)[None, :]


def ring_plan(lengths: jax.Array, valid_lengths: jax.Array, num_new: int, slots: int) -> WritePlan:
    """Ring of `slots`: slot s holds the newest position p < length with p % slots == s."""
    slot = jnp.arange(slots, dtype=jnp.int32)[None, :]
    newest = lengths[:, None] - 1
    held = slot + slots * ((newest - slot) // slots)
    held = jnp.where(slot <= newest, held, -1)
    offset = jnp.arange(num_new, dtype=jnp.int32)[None, :]
    # Only the last `slots` real tokens survive in the ring; writing the others would collide with them.
    kept = (offset < valid_lengths[:, None]) & (offset >= valid_lengths[:, None] - slots)
    new_positions = query_positions(lengths, num_new)
    return WritePlan(
        key_positions=jnp.concatenate([held, new_positions], axis=1),
        write_slots=jnp.where(kept, new_positions % slots, slots),
        ring=True,
    )


def full_plan(lengths: jax.Array, valid_lengths: jax.Array, num_new: int, max_len: int) -> WritePlan:
    """Full cache: position p lives in slot p; slots past a row's length are masked by causality."""
    positions = query_positions(lengths, num_new)
    real = jnp.arange(num_new, dtype=jnp.int32)[None, :] < valid_lengths[:, None]
    return WritePlan(
        key_positions=jnp.broadcast_to(jnp.arange(max_len, dtype=jnp.int32), (lengths.shape[0], max_len)),
        write_slots=jnp.where(real & (positions < max_len), positions, max_len),
        ring=False,
    )

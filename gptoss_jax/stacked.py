"""One layer of a parameter stacked over layers, named but not sliced out: `LayerOf(stack, index)`.

Inside the layer scan, a layer's weights sliced out of the `[L, ...]` stacks and handed to a custom call
or a loop are copied by XLA into buffers of their own first: ~100 MB per gpt-oss-20b layer and decoded
token (a third of the token's ideal memory traffic), and a prefill step's 380 MB of a layer's packed
experts (0.75 GiB of its scratch memory). So for cached steps on CPU (`kernels.reads_stacks`) the model
runs its modules on `LayerOf` values: code that wants the array indexes it (`w[...]`, as with an
`nnx.Variable`, or `w[e]` for one expert) and gets the slice, while the C++ kernels take the stack and
the index (`parts`) and read the layer in place.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerOf:
    """Layer `index` (an int32 scalar, traced or not) of `stack [L, ...]`."""

    stack: jax.Array
    index: jax.Array | int

    @property
    def shape(self) -> tuple[int, ...]:
        return self.stack.shape[1:]

    @property
    def ndim(self) -> int:
        return self.stack.ndim - 1

    @property
    def dtype(self):
        return self.stack.dtype

    def __getitem__(self, key) -> jax.Array:
        """The layer indexed by `key`; integer keys index the stack with the layer in one slice
        (`layer[e]` reads expert e of the stack in place, not the whole layer first)."""
        key = key if isinstance(key, tuple) else (key,)
        return self.stack[(self.index, *key)]

    def reshape(self, *shape: int) -> LayerOf:
        """The layer reshaped (the stack's trailing axes, which XLA does without a copy)."""
        return LayerOf(self.stack.reshape(self.stack.shape[0], *shape), self.index)


def layer_of(tree, index):
    """Every array of a tree of stacks as its layer `index`."""
    index = jnp.asarray(index, jnp.int32)
    return jax.tree.map(lambda stack: LayerOf(stack, index), tree)


def resolve(tree):
    """A tree with every `LayerOf` in it sliced out (for code that wants plain arrays)."""
    return jax.tree.map(lambda leaf: leaf[...] if isinstance(leaf, LayerOf) else leaf, tree, is_leaf=lambda leaf: isinstance(leaf, LayerOf))


def parts(weight: LayerOf | jax.Array) -> tuple[jax.Array, jax.Array | int]:
    """`(stack [L, ...], index)` for a kernel that indexes stacks itself; an array is a stack of one."""
    if isinstance(weight, LayerOf):
        return weight.stack, weight.index
    return weight[None], 0

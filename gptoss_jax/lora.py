"""Low-rank adapters (LoRA): `W x + (alpha / rank) · B (A x)`, with B starting at zero.

`LoraSpec` names the adapted matrices; the model creates a `LoRA` module per target and layer, whose
`nnx.LoRAParam`s carry logical axes, so they stack with the layers and shard with what they adapt
(the experts' adapters with their experts). The base weights stay as they are: packed MXFP4 experts
are frozen and never dequantized into a trainable copy.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss_jax import mxfp4

ATTENTION_TARGETS = ("q", "k", "v", "out")
EXPERT_TARGETS = ("mlp1", "mlp2")
TARGETS = ATTENTION_TARGETS + EXPERT_TARGETS


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraSpec:
    """Which matrices get adapters (`TARGETS`: attention q, k, v, out; experts mlp1, mlp2), their rank
    and alpha (the update is scaled by alpha / rank)."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = TARGETS

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"unknown LoRA targets {unknown or '(none given)'}; choose among {TARGETS}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def check_rank(self, target: str, in_size: int, out_size: int) -> None:
        if self.rank > min(in_size, out_size):
            raise ValueError(
                f"LoRA rank {self.rank} exceeds the smaller side of {target} ({out_size} x {in_size}); use at most {min(in_size, out_size)}"
            )


class LoRA(nnx.Module):
    """The adapter of one weight `[*out, *in]` (or one per expert, with `experts`): A `[(E,) r, *in]`
    drawn with std 1/sqrt(in), B `[(E,) *out, r]` zero, so a new adapter changes nothing."""

    def __init__(
        self, spec: LoraSpec, target: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
        in_axes: tuple[str, ...], out_axes: tuple[str, ...], *, dtype, rngs: nnx.Rngs, experts: int | None = None,
    ):
        spec.check_rank(target, math.prod(in_shape), math.prod(out_shape))
        lead, lead_axes = ((experts,), ("experts",)) if experts else ((), ())
        a_shape = (*lead, spec.rank, *in_shape)
        a = jax.random.normal(rngs.params(), a_shape, jnp.float32) * math.prod(in_shape) ** -0.5
        self.a = nnx.LoRAParam(a.astype(dtype), out_sharding=(*lead_axes, "lora", *in_axes), eager_sharding=False)
        b = jnp.zeros((*lead, *out_shape, spec.rank), dtype)
        self.b = nnx.LoRAParam(b, out_sharding=(*lead_axes, *out_axes, "lora"), eager_sharding=False)
        self.scale = spec.scale

    def __call__(self, x: jax.Array) -> jax.Array:
        """The update for `x [..., *in]`: `[..., *out]`."""
        a, b = self.a[...], self.b[...]
        in_dims = a.ndim - 1
        z = jnp.tensordot(x, a, axes=(tuple(range(x.ndim - in_dims, x.ndim)), tuple(range(1, a.ndim))))
        return self.scale * jnp.tensordot(z.astype(b.dtype), b, axes=((z.ndim - 1,), (b.ndim - 1,)))


def adapter_for(
    spec: LoraSpec | None, target: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
    in_axes: tuple[str, ...], out_axes: tuple[str, ...], **options,
) -> LoRA | None:
    """The `LoRA` of `target` if `spec` adapts it, else None."""
    if spec is None or target not in spec.targets:
        return None
    return LoRA(spec, target, in_shape, out_shape, in_axes, out_axes, **options)


def plus_update(y: jax.Array, lora: LoRA | None, x: jax.Array) -> jax.Array:
    """`y + lora(x)` shaped like y, or y where there is no adapter."""
    return y if lora is None else y + lora(x).reshape(y.shape).astype(y.dtype)


def merge_lora(model, *, experts: str = "mxfp4"):
    """Folds every adapter into the weight it adapts and removes it, in place; returns the model.

    Attention weights become `W + scale · B A`. Packed experts are decoded, updated and packed again
    by the converter's round-to-nearest rule (`experts="mxfp4"`, what `python -m convert --quantize
    mxfp4` does to dense fine-tunes), or kept dense (`experts="bf16"`, exact, 4x the bytes). Works on
    arrays this process can address (one host).
    """
    if experts not in ("mxfp4", "bf16"):
        raise ValueError(f"unknown experts format {experts!r}; choose 'mxfp4' or 'bf16'")
    for blocks in (model.sliding_blocks, model.full_blocks):
        if blocks is None:
            continue
        for target in ATTENTION_TARGETS:
            _fold(blocks.attn, target, getattr(blocks.attn, target))
        _merge_experts(blocks.mlp, experts)
    model.expert_format = model.sliding_blocks.mlp.expert_format
    return model


def _update(adapter: LoRA, base_shape: tuple[int, ...]) -> jax.Array:
    """`scale · B A` of stacked adapters (B `[*lead, *out, r]`, A `[*lead, r, *in]`, lead = layers and
    experts), shaped like the base weight `[*lead, *out, *in]`, in float32."""
    a, b = adapter.a[...].astype(jnp.float32), adapter.b[...].astype(jnp.float32)
    lead = a.ndim + b.ndim - 2 - len(base_shape)
    rank = b.shape[-1]
    return adapter.scale * (b.reshape(*b.shape[:lead], -1, rank) @ a.reshape(*a.shape[:lead], rank, -1)).reshape(base_shape)


def _fold(module, target: str, weight: nnx.Variable) -> None:
    adapter = getattr(module, f"{target}_lora")
    if adapter is not None:
        weight.set_value((weight.get_value().astype(jnp.float32) + _update(adapter, weight.shape)).astype(weight.dtype))
        setattr(module, f"{target}_lora", None)


def _merge_experts(mlp, experts: str) -> None:
    for name in EXPERT_TARGETS:
        adapter = getattr(mlp, f"{name}_lora")
        if mlp.expert_format == "bf16":
            _fold(mlp, name, getattr(mlp, f"{name}_weight"))
            continue
        if adapter is None and experts == "mxfp4":
            continue
        blocks, scales = getattr(mlp, f"{name}_blocks"), getattr(mlp, f"{name}_scales")
        dense = mxfp4.dequantize(blocks.get_value(), scales.get_value(), jnp.float32)
        if adapter is not None:
            dense = dense + _update(adapter, dense.shape)
            setattr(mlp, f"{name}_lora", None)
        if experts == "mxfp4":
            packed = mxfp4.quantize(np.asarray(dense))
            blocks.set_value(jnp.asarray(packed[0])), scales.set_value(jnp.asarray(packed[1]))
        else:
            axes = scales.out_sharding
            delattr(mlp, f"{name}_blocks"), delattr(mlp, f"{name}_scales")
            setattr(mlp, f"{name}_weight", nnx.Param(dense.astype(mlp.mlp1_bias.dtype), out_sharding=axes, eager_sharding=False))
    if mlp.expert_format == "mxfp4":
        mlp.expert_format = experts

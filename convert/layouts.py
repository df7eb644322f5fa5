"""Where every tensor of the published checkpoints lives in our parameter tree (SPEC sections 3-4).

One table for both layouts (`hf`, `original`). Every mapping is "take rows [start, stop) of the
checkpoint tensor and reshape them to the parameter's per-layer shape", so the bytes are kept as they
are: converting is copying, and the inverse (writing a checkpoint from a model) is reshaping back.
The one exception is dense bf16 experts, stored `[E, in, out]` and held `[E, out, in]` like the packed
ones: their rows are transposed (`Target.transpose`), which moves values but changes no bits.
Block n is layer n // 2 of the `sliding_blocks` stack when n is even, of `full_blocks` when odd.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping

import numpy as np

from gptoss_jax.config import GptOssConfig
from gptoss_jax.mxfp4 import BLOCK, BYTES_PER_BLOCK

LAYOUTS = ("hf", "original")
ParamPath = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Target:
    """Rows [start, stop) of a checkpoint tensor, which become parameter `path` (layer `layer` of a stack)."""

    path: ParamPath
    layer: int | None
    start: int
    stop: int
    transpose: bool = False  # each row's last two axes are swapped between checkpoint and parameter


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One checkpoint tensor: its name, shape and safetensors dtype, and where its rows go."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # "BF16" or "U8"
    targets: tuple[Target, ...]


def checkpoint_tensors(config: GptOssConfig, layout: str, expert_format: str = "mxfp4") -> list[Tensor]:
    """Every tensor a checkpoint of `layout` holds for `config`, in file order.

    `expert_format="bf16"` is the Hugging Face layout with dense experts `[E, in, out]` (fine-tunes).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown checkpoint layout {layout!r}; choose one of {LAYOUTS}")
    if expert_format == "bf16" and layout != "hf":
        raise ValueError("dense bf16 experts exist only in the Hugging Face layout")
    globals_ = _GLOBALS[layout]
    tensors = [_whole(globals_[0], (config.vocab_size, config.hidden_size), "BF16", ("embedding",), None)]
    for n in range(config.num_hidden_layers):
        tensors.extend(_block(config, layout, n, expert_format))
    tensors.append(_whole(globals_[1], (config.hidden_size,), "BF16", ("norm", "scale"), None))
    tensors.append(_whole(globals_[2], (config.vocab_size, config.hidden_size), "BF16", ("unembedding",), None))
    return tensors


_GLOBALS = {
    "original": ("embedding.weight", "norm.scale", "unembedding.weight"),
    "hf": ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"),
}


def _whole(name: str, shape: tuple[int, ...], dtype: str, path: ParamPath, layer: int | None) -> Tensor:
    return Tensor(name, shape, dtype, (Target(path, layer, 0, shape[0]),))


def _block(config: GptOssConfig, layout: str, n: int, expert_format: str) -> Iterator[Tensor]:
    """The tensors of block n, in the order the published files list them."""
    E, H, I, D = config.num_experts, config.hidden_size, config.intermediate_size, config.head_dim
    Q, N = config.num_attention_heads * D, config.num_key_value_heads * D
    stack = "sliding_blocks" if config.is_sliding(n) else "full_blocks"
    layer = n // 2

    def tensor(name: str, shape: tuple[int, ...], dtype: str, *parts: tuple[str, int], transpose: bool = False) -> Tensor:
        """`parts` = (param path under the block, rows) in row order."""
        targets, start = [], 0
        for path, rows in parts:
            targets.append(Target((stack, *path.split(".")), layer, start, start + rows, transpose))
            start += rows
        return Tensor(name, shape, dtype, tuple(targets))

    if layout == "original":
        p = f"block.{n}."
        yield tensor(p + "attn.norm.scale", (H,), "BF16", ("attn.norm.scale", H))
        yield tensor(p + "attn.qkv.weight", (Q + 2 * N, H), "BF16", ("attn.q", Q), ("attn.k", N), ("attn.v", N))
        yield tensor(p + "attn.qkv.bias", (Q + 2 * N,), "BF16", ("attn.q_bias", Q), ("attn.k_bias", N), ("attn.v_bias", N))
        yield tensor(p + "attn.sinks", (config.num_attention_heads,), "BF16", ("attn.sinks", config.num_attention_heads))
        yield tensor(p + "attn.out.weight", (H, Q), "BF16", ("attn.out", H))
        yield tensor(p + "attn.out.bias", (H,), "BF16", ("attn.out_bias", H))
        yield tensor(p + "mlp.norm.scale", (H,), "BF16", ("mlp.norm.scale", H))
        yield tensor(p + "mlp.gate.weight", (E, H), "BF16", ("mlp.router", E))
        yield tensor(p + "mlp.gate.bias", (E,), "BF16", ("mlp.router_bias", E))
        experts = {ours: (f"{p}mlp.{ours}_weight.blocks", f"{p}mlp.{ours}_weight.scales", f"{p}mlp.{ours}_bias") for ours in ("mlp1", "mlp2")}
    else:
        p = f"model.layers.{n}."
        yield tensor(p + "input_layernorm.weight", (H,), "BF16", ("attn.norm.scale", H))
        for proj, rows in (("q", Q), ("k", N), ("v", N)):
            yield tensor(f"{p}self_attn.{proj}_proj.weight", (rows, H), "BF16", (f"attn.{proj}", rows))
            yield tensor(f"{p}self_attn.{proj}_proj.bias", (rows,), "BF16", (f"attn.{proj}_bias", rows))
        yield tensor(p + "self_attn.o_proj.weight", (H, Q), "BF16", ("attn.out", H))
        yield tensor(p + "self_attn.o_proj.bias", (H,), "BF16", ("attn.out_bias", H))
        yield tensor(p + "self_attn.sinks", (config.num_attention_heads,), "BF16", ("attn.sinks", config.num_attention_heads))
        yield tensor(p + "post_attention_layernorm.weight", (H,), "BF16", ("mlp.norm.scale", H))
        yield tensor(p + "mlp.router.weight", (E, H), "BF16", ("mlp.router", E))
        yield tensor(p + "mlp.router.bias", (E,), "BF16", ("mlp.router_bias", E))
        experts = {
            ours: tuple(f"{p}mlp.experts.{theirs}_{part}" for part in ("blocks", "scales", "bias"))
            for ours, theirs in (("mlp1", "gate_up_proj"), ("mlp2", "down_proj"))
        }
    for ours, out, inp in (("mlp1", 2 * I, H), ("mlp2", H, I)):
        blocks, scales, bias = experts[ours]
        if expert_format == "bf16":  # dense [E, in, out] under the packed name less its suffix; ours [E, out, in]
            yield tensor(blocks.removesuffix("_blocks"), (E, inp, out), "BF16", (f"mlp.{ours}_weight", E), transpose=True)
        else:  # MXFP4 [E, out, in], blocked along `in`
            yield tensor(blocks, (E, out, inp // BLOCK, BYTES_PER_BLOCK), "U8", (f"mlp.{ours}_blocks", E))
            yield tensor(scales, (E, out, inp // BLOCK), "U8", (f"mlp.{ours}_scales", E))
        yield tensor(bias, (E, out), "BF16", (f"mlp.{ours}_bias", E))


def export(params: Mapping[ParamPath, np.ndarray], tensors: list[Tensor]) -> Iterator[tuple[str, np.ndarray]]:
    """Checkpoint tensors assembled from our parameters (flat `{path: stacked array}`), one at a time."""
    for tensor in tensors:
        yield tensor.name, assemble(params, tensor)


def assemble(params: Mapping[ParamPath, np.ndarray], tensor: Tensor) -> np.ndarray:
    """One checkpoint tensor from our parameters: its targets' rows, reshaped back and concatenated."""
    parts = [_layer(params[t.path], t).reshape(t.stop - t.start, *tensor.shape[1:]) for t in tensor.targets]
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def _layer(array: np.ndarray, target: Target) -> np.ndarray:
    array = array if target.layer is None else array[target.layer]
    return np.swapaxes(array, -1, -2) if target.transpose else array

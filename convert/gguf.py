"""A model as the .gguf file llama.cpp's `convert_hf_to_gguf.py` writes for its Hugging Face export.

The file is the one llama.cpp would write from `published.save(model, ...)` plus the tokenizer files of
openai/gpt-oss-*: the same tensors (name, type, shape, bytes), the same metadata (only `general.name`,
a cosmetic key taken from the file name here and from the folder name there, differs) and, for an export
that fits one safetensors shard, the same order. So every tensor starts from its Hugging Face
form (`layouts.assemble`) and goes through what llama.cpp's `GptOssModel` does to it (vendored
llama.cpp 0c1e5709, `conversion/gpt_oss.py`): MXFP4 experts are repacked byte for byte, gate and up
rows (interleaved in one HF tensor) are split, dense experts are transposed back to `[E, out, in]`.
llama.cpp reads the export's bf16, so every float passes through bf16 even where GGUF stores F32.

The tokenizer is rebuilt from `gptoss_jax.tokenizer`'s verified o200k vocabulary without transformers:
tokens in GPT-2's byte-level text, merges in the order transformers' `TikTokenConverter` gives them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from pathlib import Path

import gguf
import ml_dtypes
import numpy as np
import tqdm

from convert import layouts, published
from gptoss_jax.config import GptOssConfig
from gptoss_jax.model import GptOss
from gptoss_jax.mxfp4 import BLOCK, BYTES_PER_BLOCK
from gptoss_jax.tokenizer import ENDOFTEXT, RETURN, SPECIAL_TOKENS, get_encoding

GGML = gguf.GGMLQuantizationType
VOCAB_SIZE = max(SPECIAL_TOKENS.values()) + 1  # 201088: o200k_harmony's ids, the published embedding's rows
# openai/gpt-oss-*'s tokenizer adds 21 tokens: harmony's up to 200017 and o200k_base's <|endofprompt|>. Ids
# above are not in it, so llama.cpp names them "[PAD{id}]" (type UNUSED).
ADDED_TOKENS = {i: text for text, i in SPECIAL_TOKENS.items() if i < 200018} | {200018: "<|endofprompt|>"}

# HF name (under `model.layers.N.`) -> GGUF name(s) (under `blk.N.`); two names split HF's interleaved
# gate (even) and up (odd) rows. `_scales` names stand for their MXFP4 pair; `_blocks` come with them.
_NAMES = {
    "lm_head.weight": ("output.weight",),
    "model.embed_tokens.weight": ("token_embd.weight",),
    "model.norm.weight": ("output_norm.weight",),
    "input_layernorm.weight": ("attn_norm.weight",),
    "post_attention_layernorm.weight": ("post_attention_norm.weight",),
    "self_attn.q_proj.weight": ("attn_q.weight",),
    "self_attn.q_proj.bias": ("attn_q.bias",),
    "self_attn.k_proj.weight": ("attn_k.weight",),
    "self_attn.k_proj.bias": ("attn_k.bias",),
    "self_attn.v_proj.weight": ("attn_v.weight",),
    "self_attn.v_proj.bias": ("attn_v.bias",),
    "self_attn.o_proj.weight": ("attn_output.weight",),
    "self_attn.o_proj.bias": ("attn_output.bias",),
    "self_attn.sinks": ("attn_sinks.weight",),
    "mlp.router.weight": ("ffn_gate_inp.weight",),
    "mlp.router.bias": ("ffn_gate_inp.bias",),
    "mlp.experts.gate_up_proj_scales": ("ffn_gate_exps.weight", "ffn_up_exps.weight"),
    "mlp.experts.gate_up_proj": ("ffn_gate_exps.weight", "ffn_up_exps.weight"),
    "mlp.experts.gate_up_proj_bias": ("ffn_gate_exps.bias", "ffn_up_exps.bias"),
    "mlp.experts.down_proj_scales": ("ffn_down_exps.weight",),
    "mlp.experts.down_proj": ("ffn_down_exps.weight",),
    "mlp.experts.down_proj_bias": ("ffn_down_exps.bias",),
}
_DTYPES = {GGML.F32: np.dtype(np.float32), GGML.BF16: np.dtype(ml_dtypes.bfloat16), GGML.MXFP4: np.dtype(np.uint8)}
_GGML_MXFP4_BYTES = 1 + BYTES_PER_BLOCK  # ggml's block_mxfp4: the scale byte, then 16 bytes of codes


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One GGUF tensor and the HF tensor it is made of (for MXFP4: the scales, and `blocks`)."""

    name: str
    type: GGML
    source: layouts.Tensor
    blocks: layouts.Tensor | None = None
    half: int | None = None  # 0 gate or 1 up: every other row (axis 1) of the source
    transpose: bool = False  # dense experts: HF's [E, in, out] back to [E, out, in]

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy order (GGUF's `ne` reversed); MXFP4 rows are counted in bytes, as the writer wants them."""
        shape = list(self.source.shape)
        if self.transpose:
            shape[-2:] = shape[-1], shape[-2]
        if self.half is not None:
            shape[1] //= 2
        if self.type == GGML.MXFP4:
            shape[-1] *= _GGML_MXFP4_BYTES
        return tuple(shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _DTYPES[self.type].itemsize

    def data(self, params: dict[layouts.ParamPath, np.ndarray]) -> np.ndarray:
        values = layouts.assemble(params, self.source)
        if self.transpose:
            values = np.swapaxes(values, -1, -2)
        if self.half is not None:
            values = values[:, self.half :: 2]
        if self.type == GGML.MXFP4:
            blocks = layouts.assemble(params, self.blocks)
            return _ggml_mxfp4(blocks if self.half is None else blocks[:, self.half :: 2], values)
        stored = np.ascontiguousarray(values, ml_dtypes.bfloat16)  # what the HF export holds, and llama.cpp reads
        return stored if self.type == GGML.BF16 else stored.astype(np.float32)


def _ggml_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """HF `blocks [E, R, nb, 16]` (codes 2j, 2j+1 in byte j) and `scales [E, R, nb]` -> ggml rows `[E, R, nb*17]`.

    ggml's block is the scale byte, then codes j and j + 16 in byte j (low nibble, high nibble).
    """
    codes = np.stack([blocks & 0x0F, blocks >> 4], axis=-1).reshape(*scales.shape, BLOCK)
    packed = codes[..., :BYTES_PER_BLOCK] | (codes[..., BYTES_PER_BLOCK:] << 4)
    return np.concatenate([scales[..., None], packed], axis=-1).reshape(*scales.shape[:-1], -1)


def _float_type(name: str, ndim: int) -> GGML:
    """llama.cpp keeps vectors, biases and the router in F32 (conversion/base.py:1080-1160); matrices in bf16."""
    return GGML.F32 if ndim == 1 or not name.endswith(".weight") or ".ffn_gate_inp." in name else GGML.BF16


def _plan(config: GptOssConfig, dense: bool) -> list[_Tensor]:
    """The GGUF tensors in llama.cpp's order: MXFP4 experts first, then the rest, each by sorted HF name."""
    hf = {t.name: t for t in layouts.checkpoint_tensors(config, "hf", "bf16" if dense else "mxfp4")}
    packed, rest = [], []
    for name in sorted(hf):
        match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        prefix, key = (f"blk.{match[1]}.", match[2]) if match else ("", name)
        if key.endswith("_blocks"):
            continue
        targets = _NAMES[key]
        for half, target in zip((0, 1) if len(targets) == 2 else (None,), targets):
            if key.endswith("_scales"):
                blocks = hf[name.removesuffix("_scales") + "_blocks"]
                packed.append(_Tensor(prefix + target, GGML.MXFP4, hf[name], blocks, half))
            else:
                transpose = key.startswith("mlp.experts.") and key.endswith("_proj")
                kind = _float_type(prefix + target, len(hf[name].shape))
                rest.append(_Tensor(prefix + target, kind, hf[name], half=half, transpose=transpose))
    return packed + rest


@functools.cache  # the same for every export, and seconds to build
def _vocabulary() -> tuple[tuple[str, ...], tuple[gguf.TokenType, ...], tuple[str, ...]]:
    """Tokens, token types and merges as llama.cpp reads them from openai/gpt-oss-*'s tokenizer.json.

    Tokens are the o200k ranks' bytes in GPT-2's byte-level text. Merges are TikTokenConverter's: for
    each token in rank order, every split into two tokens, ordered by the ranks of (left, right).
    """
    encoding = get_encoding()
    pieces = [encoding.decode_single_token_bytes(rank) for rank in range(min(ADDED_TOKENS))]
    ranks = {piece: rank for rank, piece in enumerate(pieces)}
    text = _byte_level_text()
    tokens = [piece.decode("latin-1").translate(text) for piece in pieces]
    merges = []
    for piece in pieces:
        splits = sorted(
            (left, right) for k in range(1, len(piece))
            if (left := ranks.get(piece[:k])) is not None and (right := ranks.get(piece[k:])) is not None
        )
        merges.extend(f"{tokens[left]} {tokens[right]}" for left, right in splits)
    padding = range(max(ADDED_TOKENS) + 1, VOCAB_SIZE)
    tokens += [ADDED_TOKENS[i] for i in sorted(ADDED_TOKENS)] + [f"[PAD{i}]" for i in padding]
    types = [gguf.TokenType.NORMAL] * len(pieces) + [gguf.TokenType.CONTROL] * len(ADDED_TOKENS)
    return tuple(tokens), tuple(types + [gguf.TokenType.UNUSED] * len(padding)), tuple(merges)


def _byte_level_text() -> dict[int, str]:
    """GPT-2's byte -> character table: printable Latin-1 bytes stand for themselves, the others for 256, 257, ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}


def _metadata(writer: gguf.GGUFWriter, config: GptOssConfig, dense: bool, name: str) -> None:
    """The key/values llama.cpp writes, in its order (conversion/base.py:1195-1546, gpt_oss.py:128-131)."""
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_size_label(gguf.size_label(*writer.get_total_parameter_count()))
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_context)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(config.rope_scaling_factor)
    writer.add_rope_scaling_orig_ctx_len(config.initial_context_length)
    writer.add_rope_scaling_yarn_beta_fast(config.rope_ntk_beta)
    writer.add_rope_scaling_yarn_beta_slow(config.rope_ntk_alpha)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_expert_count(config.num_experts)
    writer.add_expert_used_count(config.experts_per_token)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_BF16 if dense else gguf.LlamaFileType.MOSTLY_MXFP4_MOE)
    writer.add_sliding_window(config.sliding_window)
    writer.add_expert_feed_forward_length(config.intermediate_size)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens, types, merges = _vocabulary()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-4o")  # llama.cpp's name for o200k's pre-tokenizer (it hashes a test encoding)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    # openai/gpt-oss-*'s tokenizer_config.json names them; llama.cpp writes their ids. No add_bos/add_eos
    # keys: llama.cpp writes those only for a tokenizer.json with a post-processor, and the published GGUF has none.
    writer.add_bos_token_id(SPECIAL_TOKENS["<|startoftext|>"])
    writer.add_eos_token_id(RETURN)
    writer.add_pad_token_id(ENDOFTEXT)


def save(model: GptOss, dst: str | Path, *, progress: bool | None = None) -> int:
    """Writes `model` (a `GptOss` without adapters, with the o200k vocabulary) to the .gguf file `dst`.

    `dst` must not exist; the file appears only once complete. Tensors are computed and written one at a
    time. Returns the tensor bytes written. `progress=None` shows a bar only on a terminal.
    """
    dst = Path(dst)
    if model.config.vocab_size != VOCAB_SIZE:
        raise ValueError(
            f"vocab_size {model.config.vocab_size} cannot carry gpt-oss's o200k tokenizer ({VOCAB_SIZE} ids)"
        )
    arrays = published.model_arrays(model, dst)
    dense = model.expert_format == "bf16"
    plan = _plan(model.config, dense)
    staging = dst.parent / f".{dst.name}.incomplete"
    dst.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(staging, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT_OSS])
    for tensor in plan:
        writer.add_tensor_info(tensor.name, tensor.shape, _DTYPES[tensor.type], tensor.nbytes, raw_dtype=tensor.type)
    _metadata(writer, model.config, dense, dst.stem)
    total = sum(tensor.nbytes for tensor in plan)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        disable = None if progress is None else not progress
        with tqdm.tqdm(total=total, unit="B", unit_scale=True, desc="writing", disable=disable) as bar:
            for tensor in plan:
                writer.write_tensor_data(tensor.data(arrays))
                bar.update(tensor.nbytes)
        writer.close()
        os.rename(staging, dst)
    finally:
        writer.close()
        staging.unlink(missing_ok=True)
    return total

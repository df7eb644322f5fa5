"""GGUF export (`convert.gguf`): read back with a reader written here and checked against ggml's formats, the
model's own weights and config, and tiktoken; the slow test requires llama.cpp's own converter, run on the
Hugging Face export of the same model, to write the same tensors and metadata."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import gguf_reader
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from convert import gguf, published
from gptoss_jax import GptOss, GptOssConfig, LoraSpec
from gptoss_jax.mxfp4 import dequantize
from gptoss_jax.tokenizer import PATTERN, VOCAB_FILE, get_encoding, vocab_folder

CONFIG = dataclasses.replace(GptOssConfig.tiny(), num_hidden_layers=2)  # the real vocabulary: the tokenizer needs it
# openai/gpt-oss-*'s added tokens 199998..200018 (tokenizer_config.json added_tokens_decoder); the others are
# named <|reserved_{id}|>
HF_ADDED_TOKENS = {
    199998: "<|startoftext|>", 199999: "<|endoftext|>", 200002: "<|return|>", 200003: "<|constrain|>",
    200005: "<|channel|>", 200006: "<|start|>", 200007: "<|end|>", 200008: "<|message|>", 200012: "<|call|>",
    200018: "<|endofprompt|>",
}


def _abstract_model(config: GptOssConfig = CONFIG, **options) -> GptOss:
    """A model with shapes only: building the real vocabulary's embeddings with jax.random takes a minute here."""
    return nnx.eval_shape(lambda: GptOss(config, rngs=nnx.Rngs(0), dtype=jnp.float32, **options))


def _random_model(expert_format: str) -> GptOss:
    """Every weight random, biases and norms included, so that a dropped or swapped tensor shows."""
    model = _abstract_model(expert_format=expert_format)
    rng = np.random.default_rng(0)
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        shape = variable.shape
        if str(path[-1]).endswith("_blocks"):
            value = rng.integers(0, 256, shape, np.uint8)
        elif str(path[-1]).endswith("_scales"):
            value = rng.integers(120, 132, shape, np.uint8)  # 2^-7 .. 2^4: every code distinct, nothing overflows
        else:
            value = rng.random(shape, np.float32) * 4 - 2
        variable.set_value(value)  # numpy: the export reads every weight with np.asarray
    return model


@pytest.fixture(scope="module", params=["mxfp4", "bf16"])
def export(request, tmp_path_factory) -> tuple[GptOss, gguf_reader.Gguf, int]:
    model = _random_model(request.param)
    path = tmp_path_factory.mktemp(request.param) / "tiny.gguf"
    written = gguf.save(model, path, progress=False)
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny.gguf"]  # the staging file is gone
    return model, gguf_reader.read(path), written


# ggml's MXFP4 (ggml-common.h block_mxfp4, kvalues_mxfp4): 17-byte blocks of 32 values, an E8M0 scale byte
# (2^(e-127)) then 16 bytes whose low nibbles are values 0..15 and high nibbles values 16..31, E2M1 codes.
_E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)


def _mxfp4_values(tensor: gguf_reader.Tensor) -> np.ndarray:
    """An MXFP4 tensor's values in float32, in numpy order, decoded by ggml's rule."""
    blocks = np.frombuffer(tensor.data, np.uint8).reshape(-1, 17)
    codes = np.concatenate([blocks[:, 1:] & 0x0F, blocks[:, 1:] >> 4], axis=1)
    return (_E2M1[codes] * np.ldexp(np.float32(1), blocks[:, :1].astype(np.int32) - 127)).reshape(tensor.ne[::-1])


_dequantize = jax.jit(functools.partial(dequantize, dtype=jnp.float32))  # compiled: eager ops take seconds each here


def _expected(model: GptOss) -> dict[str, tuple[str, np.ndarray]]:
    """Every GGUF tensor llama.cpp writes (SPEC_GGUF section 3): its type and contents from our parameters.

    BF16 and F32 tensors as stored: our weights rounded to bf16, the dtype of the Hugging Face export that
    llama.cpp reads (F32 holds that rounding in float32). MXFP4 experts as values: our dequantized weights.
    """
    p = {".".join(map(str, path)): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model))}
    bf16 = lambda x: x.astype(ml_dtypes.bfloat16)  # noqa: E731
    f32 = lambda x: bf16(x).astype(np.float32)  # noqa: E731
    tensors = {
        "token_embd.weight": ("BF16", bf16(p["embedding"])),
        "output.weight": ("BF16", bf16(p["unembedding"])),
        "output_norm.weight": ("F32", f32(p["norm.scale"])),
    }
    for n in range(CONFIG.num_hidden_layers):
        stack, i = "sliding_blocks" if n % 2 == 0 else "full_blocks", n // 2
        a, m = lambda name: p[f"{stack}.attn.{name}"][i], lambda name: p[f"{stack}.mlp.{name}"][i]  # noqa: E731
        if model.expert_format == "mxfp4":
            mlp1, mlp2 = (np.asarray(_dequantize(m(f"{w}_blocks"), m(f"{w}_scales"))) for w in ("mlp1", "mlp2"))
            experts = "MXFP4"
        else:
            mlp1, mlp2, experts = bf16(m("mlp1_weight")), bf16(m("mlp2_weight")), "BF16"
        tensors |= {
            f"blk.{n}.{name}": value
            for name, value in {
                "attn_norm.weight": ("F32", f32(a("norm.scale"))),
                "attn_q.weight": ("BF16", bf16(a("q").reshape(-1, CONFIG.hidden_size))),
                "attn_q.bias": ("F32", f32(a("q_bias").reshape(-1))),
                "attn_k.weight": ("BF16", bf16(a("k").reshape(-1, CONFIG.hidden_size))),
                "attn_k.bias": ("F32", f32(a("k_bias").reshape(-1))),
                "attn_v.weight": ("BF16", bf16(a("v").reshape(-1, CONFIG.hidden_size))),
                "attn_v.bias": ("F32", f32(a("v_bias").reshape(-1))),
                "attn_output.weight": ("BF16", bf16(a("out").reshape(CONFIG.hidden_size, -1))),
                "attn_output.bias": ("F32", f32(a("out_bias"))),
                "attn_sinks.weight": ("F32", f32(a("sinks"))),
                "post_attention_norm.weight": ("F32", f32(m("norm.scale"))),
                "ffn_gate_inp.weight": ("F32", f32(m("router"))),
                "ffn_gate_inp.bias": ("F32", f32(m("router_bias"))),
                # mlp1's rows alternate gate (even) and linear "up" (odd), as moe.clamped_swiglu reads them
                "ffn_gate_exps.weight": (experts, mlp1[:, 0::2]),
                "ffn_up_exps.weight": (experts, mlp1[:, 1::2]),
                "ffn_down_exps.weight": (experts, mlp2),
                "ffn_gate_exps.bias": ("F32", f32(m("mlp1_bias")[:, 0::2])),
                "ffn_up_exps.bias": ("F32", f32(m("mlp1_bias")[:, 1::2])),
                "ffn_down_exps.bias": ("F32", f32(m("mlp2_bias"))),
            }.items()
        }
    return tensors


def test_every_tensor_holds_the_model_weights(export):
    model, file, written = export
    expected = _expected(model)
    assert sorted(file.tensors) == sorted(expected)
    for name, (kind, values) in expected.items():
        tensor = file.tensors[name]
        assert (tensor.type, tensor.ne) == (kind, values.shape[::-1]), name
        if kind == "MXFP4":  # ggml's decoding gives our dequantized weights exactly
            np.testing.assert_array_equal(_mxfp4_values(tensor), values, err_msg=name)
        else:
            assert tensor.data == values.tobytes(), name
    assert written == sum(len(t.data) for t in file.tensors.values())


def test_metadata_is_the_config(export):
    model, file, _ = export
    c = model.config
    u32, f32, string = (4,), (6,), (8,)
    expected = {  # llama.cpp's keys, types and order (SPEC_GGUF section 2)
        "general.architecture": (string, "gpt-oss"),
        "general.type": (string, "model"),
        "general.name": (string, "tiny"),
        "general.size_label": (string, "5x39M"),  # cosmetic: E x (shared + one expert's) parameters
        "gpt-oss.block_count": (u32, c.num_hidden_layers),
        "gpt-oss.context_length": (u32, c.initial_context_length * c.rope_scaling_factor),
        "gpt-oss.embedding_length": (u32, c.hidden_size),
        "gpt-oss.feed_forward_length": (u32, c.intermediate_size),
        "gpt-oss.attention.head_count": (u32, c.num_attention_heads),
        "gpt-oss.attention.head_count_kv": (u32, c.num_key_value_heads),
        "gpt-oss.rope.scaling.type": (string, "yarn"),
        "gpt-oss.rope.scaling.factor": (f32, c.rope_scaling_factor),
        "gpt-oss.rope.scaling.original_context_length": (u32, c.initial_context_length),
        "gpt-oss.rope.scaling.yarn_beta_fast": (f32, c.rope_ntk_beta),
        "gpt-oss.rope.scaling.yarn_beta_slow": (f32, c.rope_ntk_alpha),
        "gpt-oss.rope.freq_base": (f32, c.rope_theta),
        "gpt-oss.attention.layer_norm_rms_epsilon": (f32, np.float32(c.rms_norm_eps)),
        "gpt-oss.expert_count": (u32, c.num_experts),
        "gpt-oss.expert_used_count": (u32, c.experts_per_token),
        "gpt-oss.attention.key_length": (u32, c.head_dim),
        "gpt-oss.attention.value_length": (u32, c.head_dim),
        "general.file_type": (u32, 38 if model.expert_format == "mxfp4" else 32),  # MOSTLY_MXFP4_MOE, MOSTLY_BF16
        "gpt-oss.attention.sliding_window": (u32, c.sliding_window),
        "gpt-oss.expert_feed_forward_length": (u32, c.intermediate_size),
        "general.quantization_version": (u32, 2),
        "tokenizer.ggml.model": (string, "gpt2"),
        "tokenizer.ggml.pre": (string, "gpt-4o"),
    }
    for key, (kind, value) in expected.items():
        assert (file.kv_types[key], file.kv[key]) == (kind, value), key
    tokenizer = {"tokens": (9, 8), "token_type": (9, 5), "merges": (9, 8)} | dict.fromkeys(
        ("bos_token_id", "eos_token_id", "padding_token_id"), u32)  # arrays of strings and int32; ids
    assert list(file.kv) == list(expected) + [f"tokenizer.ggml.{key}" for key in tokenizer]
    assert all(file.kv_types[f"tokenizer.ggml.{key}"] == kind for key, kind in tokenizer.items())


@pytest.mark.parametrize("export", ["mxfp4"], indirect=True)
def test_tokenizer_is_o200k_harmony_as_hugging_face_ships_it(export):
    """Tokens, types and merges as llama.cpp reads them from openai/gpt-oss-*'s tokenizer (SPEC_GGUF section 2)."""
    kv = export[1].kv
    encoding = get_encoding()
    tokens, types, merges = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"], kv["tokenizer.ggml.merges"]
    assert len(tokens) == len(types) == 201088 and len(merges) == 446189
    # GPT-2's byte-level text: printable Latin-1 bytes as themselves, the other bytes as chr(256 + n) in order
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = sorted(set(range(256)) - set(printable))
    byte_of = {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}
    assert all(bytes(byte_of[c] for c in tokens[i]) == encoding.decode_single_token_bytes(i) for i in range(199998))
    assert tokens[encoding.encode(" hello")[0]] == "Ġhello" and tokens[0] == "!"
    for i in range(199998, 200019):
        assert tokens[i] == HF_ADDED_TOKENS.get(i, f"<|reserved_{i}|>")
        assert encoding.decode([i]) == tokens[i] or i == 200018  # tiktoken's o200k_harmony calls 200018 reserved
    assert tokens[200019] == "[PAD200019]" and tokens[-1] == "[PAD201087]"
    np.testing.assert_array_equal(types, [1] * 199998 + [3] * 21 + [5] * 1069)  # NORMAL, CONTROL, UNUSED
    assert merges[:3] == ["Ġ Ġ", "Ġ ĠĠĠ", "ĠĠ ĠĠ"]
    rank = {token: i for i, token in enumerate(tokens[:199998])}
    merged = [rank[merge.replace(" ", "")] for merge in merges]  # each merge makes a token; in the order of its rank
    assert all(left <= right for left, right in zip(merged, merged[1:]))
    special = [kv[f"tokenizer.ggml.{name}_token_id"] for name in ("bos", "eos", "padding")]
    assert special == [199998, 200002, 199999]  # tokenizer_config.json: <|startoftext|>, <|return|>, <|endoftext|>


def test_refuses_adapters_existing_files_and_other_vocabularies(tmp_path):
    """Refused before any weight is read, so models with shapes only will do."""
    with pytest.raises(ValueError, match="still has LoRA adapters .*merge them first"):
        gguf.save(_abstract_model(lora=LoraSpec(rank=2, alpha=4.0)), tmp_path / "new.gguf")
    (tmp_path / "taken.gguf").write_bytes(b"mine")
    with pytest.raises(ValueError, match="exists; choose a new destination"):
        gguf.save(_abstract_model(), tmp_path / "taken.gguf")
    with pytest.raises(ValueError, match="vocab_size 311 cannot carry gpt-oss's o200k tokenizer"):
        gguf.save(_abstract_model(dataclasses.replace(CONFIG, vocab_size=311)), tmp_path / "new.gguf")
    assert [(p.name, p.read_bytes()) for p in tmp_path.iterdir()] == [("taken.gguf", b"mine")]


def test_the_export_cli_writes_gguf_with_convert_gguf(tmp_path, monkeypatch, capsys):
    """`--format gguf` reaches convert.gguf.save: its refusal of a vocabulary without the tokenizer comes back."""
    cli = importlib.import_module("gptoss_jax.finetune.export")  # the module (the package exports a function so named)

    model = _abstract_model(dataclasses.replace(CONFIG, vocab_size=311))
    monkeypatch.setattr(cli, "trained_model", lambda run: (model, 3))
    assert cli.main([str(tmp_path / "run"), "--out", str(tmp_path / "model.gguf"), "--format", "gguf"]) == 2
    assert "vocab_size 311 cannot carry gpt-oss's o200k tokenizer" in capsys.readouterr().err


# ---- slow: llama.cpp's converter on the Hugging Face export ----------------------------------------------------

LLAMA_CPP = "0.3.36"  # llama-cpp-python, whose sdist vendors llama.cpp 0c1e5709, the converter SPEC_GGUF was read from


@pytest.fixture(scope="session")
def llama_cpp_converter(tmp_path_factory) -> Path:
    """llama.cpp's convert_hf_to_gguf.py with its conversion/ and gguf-py/, from the llama-cpp-python sdist (cached)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gptoss-jax" / f"llama.cpp-{LLAMA_CPP}"
    if not (cache / "convert_hf_to_gguf.py").is_file():
        download = tmp_path_factory.mktemp("sdist")
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
             "-d", str(download), f"llama-cpp-python=={LLAMA_CPP}"], capture_output=True, text=True,
        )
        if result.returncode:
            pytest.skip(f"cannot download llama-cpp-python {LLAMA_CPP} (llama.cpp's converter): {result.stderr[-300:]}")
        root = f"llama_cpp_python-{LLAMA_CPP}/vendor/llama.cpp/"
        staging = cache.with_name(cache.name + ".incomplete")
        shutil.rmtree(staging, ignore_errors=True)
        with tarfile.open(next(download.glob("*.tar.gz"))) as sdist:
            members = [m for m in sdist.getmembers() if m.name == root + "convert_hf_to_gguf.py"
                       or m.name.startswith((root + "conversion/", root + "gguf-py/"))]
            for member in members:
                member.name = member.name.removeprefix(root)
            sdist.extractall(staging, members=members, filter="data")
        shutil.rmtree(cache, ignore_errors=True)
        os.rename(staging, cache)
    return cache / "convert_hf_to_gguf.py"


@pytest.fixture(scope="session")
def hf_tokenizer(tmp_path_factory) -> Path:
    """openai/gpt-oss-*'s tokenizer files, rebuilt offline as Hugging Face does: transformers' TikTokenConverter."""
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tokenizer = TikTokenConverter(vocab_file=str(vocab_folder() / VOCAB_FILE), pattern=PATTERN).converted()
    added = {i: HF_ADDED_TOKENS.get(i, f"<|reserved_{i}|>") for i in range(199998, 200019)}
    tokenizer.add_special_tokens([AddedToken(added[i], normalized=False, special=True) for i in sorted(added)])
    tokenizer.post_processor = None  # llama.cpp would add add_bos/add_eos keys for one; the published GGUF has none
    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<|startoftext|>", "eos_token": "<|return|>", "pad_token": "<|endoftext|>",
              "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1000000000000000019884624838656}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("experts", ["mxfp4", "bf16"])
def test_llama_cpp_writes_the_same_gguf_from_the_hf_export(tmp_path, experts, llama_cpp_converter, hf_tokenizer):
    model = _random_model(experts)
    hf = tmp_path / "tiny"
    published.save(model, hf, progress=False)
    for file in hf_tokenizer.iterdir():
        shutil.copy(file, hf)
    command = [sys.executable, str(llama_cpp_converter), str(hf), "--outfile", str(tmp_path / "theirs.gguf")]
    converted = subprocess.run(command, capture_output=True, text=True)
    assert converted.returncode == 0, converted.stderr[-3000:]
    gguf.save(model, tmp_path / "tiny.gguf", progress=False)
    ours, theirs = gguf_reader.read(tmp_path / "tiny.gguf"), gguf_reader.read(tmp_path / "theirs.gguf")
    assert list(ours.tensors) == list(theirs.tensors)  # the same order, too (a one-shard export)
    for name, tensor in theirs.tensors.items():
        assert ours.tensors[name] == tensor, name
    assert list(ours.kv) == list(theirs.kv) and ours.kv_types == theirs.kv_types
    for key, value in theirs.kv.items():
        if key != "general.name":  # cosmetic: from the folder name there, the file name here
            assert np.array_equal(ours.kv[key], value) if isinstance(value, np.ndarray) else ours.kv[key] == value, key

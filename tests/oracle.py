"""Hugging Face transformers' `GptOssForCausalLM` built from our weights: the test oracle.

Only tests import this (torch and transformers are test-only dependencies).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from convert import layouts
from gptoss_jax import GptOss, GptOssConfig
from gptoss_jax.mxfp4 import dequantize


def flat_params(model: GptOss) -> dict[tuple[str, ...], np.ndarray]:
    """`{path: numpy array}` of every variable of the model."""
    return {tuple(str(k) for k in path): np.asarray(v[...]) for path, v in nnx.to_flat_state(nnx.state(model))}


def hf_dense_state_dict(config: GptOssConfig, model: GptOss) -> dict[str, torch.Tensor]:
    """Our weights under HF's names, with the experts decoded to HF's dense `[E, in, out]` tensors."""
    tensors = dict(layouts.export(flat_params(model), layouts.checkpoint_tensors(config, "hf")))
    state = {}
    for name, value in tensors.items():
        if name.endswith("_scales"):
            continue
        if name.endswith("_blocks"):
            stem = name.removesuffix("_blocks")
            dense = dequantize(jnp.asarray(value), jnp.asarray(tensors[stem + "_scales"]), jnp.float32)
            name, value = stem, np.swapaxes(np.asarray(dense), 1, 2)
        state[name] = torch.from_numpy(np.asarray(value, np.float32).copy())
    return state


def hf_model(config: GptOssConfig, model: GptOss) -> transformers.GptOssForCausalLM:
    """A float32 eager `GptOssForCausalLM` holding exactly our model's weights."""
    hf_config = transformers.GptOssConfig(**config.to_hf_dict(), attn_implementation="eager")
    with torch.device("cpu"):
        oracle = transformers.GptOssForCausalLM(hf_config).to(torch.float32).eval()
    missing, unexpected = oracle.load_state_dict(hf_dense_state_dict(config, model), strict=False)
    if missing or unexpected:
        raise AssertionError(f"HF state dict mismatch: missing {missing}, unexpected {unexpected}")
    return oracle


def hf_logits(oracle: transformers.GptOssForCausalLM, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return oracle(torch.from_numpy(np.asarray(tokens, np.int64))).logits.float().numpy()


def randomize_norms(model: GptOss, seed: int) -> None:
    """Norm scales start at 1; tests give them random values so a misplaced scale shows."""
    rng = np.random.default_rng(seed)
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        if path[-1] == "scale" and "norm" in [str(p) for p in path]:
            shape = variable[...].shape
            variable[...] = jnp.asarray(rng.uniform(0.5, 1.5, shape), variable[...].dtype)

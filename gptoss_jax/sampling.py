"""Token generation from a `GptOss`: a jitted prefill and a jitted one-token decode step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss_jax.kv_cache import KVCache
from gptoss_jax.model import GptOss


@nnx.jit
def _prefill(model: GptOss, tokens_BT: jax.Array, cache: KVCache, lengths_B: jax.Array) -> tuple[jax.Array, KVCache]:
    """Caches the prompts and returns the logits [B, V] at each row's last real token."""
    logits_BTV, cache = model.step(tokens_BT, cache, lengths_B)
    return jnp.take_along_axis(logits_BTV, (lengths_B - 1)[:, None, None], axis=1)[:, 0], cache


@nnx.jit
def _decode(model: GptOss, tokens_B: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    logits_BTV, cache = model.step(tokens_B[:, None], cache)
    return logits_BTV[:, 0], cache


def greedy(model: GptOss, prompts: list[list[int]], max_new_tokens: int) -> np.ndarray:
    """The `max_new_tokens` most likely continuations of each prompt (prompts may differ in length)."""
    lengths = np.array([len(p) for p in prompts], np.int32)
    if lengths.min() < 1 or max_new_tokens < 1:
        raise ValueError("every prompt needs at least one token, and max_new_tokens must be at least 1")
    max_len = int(lengths.max()) + max_new_tokens
    if max_len > model.config.max_context:
        raise ValueError(f"prompt + new tokens = {max_len} exceeds the model's context of {model.config.max_context}")
    padded = np.zeros((len(prompts), lengths.max()), np.int32)
    for row, prompt in enumerate(prompts):
        padded[row, : len(prompt)] = prompt
    cache = model.init_cache(len(prompts), max_len)
    logits, cache = _prefill(model, jnp.asarray(padded), cache, jnp.asarray(lengths))
    generated = [jnp.argmax(logits, axis=-1).astype(jnp.int32)]
    for _ in range(max_new_tokens - 1):
        logits, cache = _decode(model, generated[-1], cache)
        generated.append(jnp.argmax(logits, axis=-1).astype(jnp.int32))
    return np.asarray(jnp.stack(generated, axis=1))

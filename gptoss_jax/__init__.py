"""gpt-oss-20b / gpt-oss-120b in JAX and Flax NNX, with MXFP4-packed experts."""

from gptoss_jax.checkpoint import load, save
from gptoss_jax.config import GptOssConfig
from gptoss_jax.kv_cache import KVCache
from gptoss_jax.model import GptOss

__all__ = ["GptOss", "GptOssConfig", "KVCache", "load", "save"]

"""gpt-oss-20b / gpt-oss-120b in JAX and Flax NNX, with MXFP4-packed experts."""

from gptoss_jax import sharding
from gptoss_jax.checkpoint import load, save
from gptoss_jax.config import GptOssConfig
from gptoss_jax.harmony import Chat, Completion, Tool, reply
from gptoss_jax.kv_cache import KVCache
from gptoss_jax.lora import LoraSpec, merge_lora
from gptoss_jax.model import GptOss
from gptoss_jax.sampling import Generation, Greedy, Random, Sampler
from gptoss_jax.tokenizer import get_encoding

__all__ = [
    "Chat",
    "Completion",
    "Generation",
    "GptOss",
    "GptOssConfig",
    "Greedy",
    "KVCache",
    "LoraSpec",
    "Random",
    "Sampler",
    "Tool",
    "get_encoding",
    "load",
    "merge_lora",
    "reply",
    "save",
    "sharding",
]

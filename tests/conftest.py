"""Shared test configurations: tiny models whose every width differs, so a swapped axis shows."""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
from pathlib import Path

# Compile each program once per machine, not once per process: the xdist workers, the sample CLI,
# notebook and multi-device subprocesses and the second (slow) pytest step build the same tiny models,
# and XLA compilation is most of this suite's time. Set before jax is imported (the subprocesses
# inherit it); a cache entry is keyed by the program, the devices and the jax version.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(tempfile.gettempdir()) / "gptoss-jax-tests-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))  # the `oracle` helper module beside the tests

from gptoss_jax import GptOss, GptOssConfig  # noqa: E402

# Each config crosses its window several times and runs past initial_context_length (YaRN).
CONFIGS = {
    # odd depth (a sliding layer after the last pair), 3 q heads per kv head, 5 experts choose 2
    "odd": dataclasses.replace(
        GptOssConfig.tiny(), num_hidden_layers=3, sliding_window=5, initial_context_length=16, vocab_size=1031
    ),
    # every field off its default: 7 experts choose 3, one kv head for 4 q heads, head_dim 24
    "wide": GptOssConfig(
        num_hidden_layers=4, num_experts=7, experts_per_token=3, vocab_size=997, hidden_size=64,
        intermediate_size=96, head_dim=24, num_attention_heads=4, num_key_value_heads=1, sliding_window=7,
        initial_context_length=32, rope_theta=10000.0, rope_scaling_factor=8.0, rope_ntk_alpha=2.0,
        rope_ntk_beta=16.0, swiglu_limit=5.0, swiglu_alpha=1.5, rms_norm_eps=1e-4,
    ),
}
SEQ_LEN = 45  # > 5 windows of "odd", > initial_context_length of both


# Jitted once per test session (eager calls re-trace the layer scan every time).
forward = nnx.jit(lambda model, tokens: model(tokens))
step = nnx.jit(lambda model, tokens, cache, valid: model.step(tokens, cache, valid))


def build(config: GptOssConfig, seed: int = 0, dtype=jnp.float32, **impls) -> GptOss:
    import oracle

    model = GptOss(config, rngs=nnx.Rngs(seed), dtype=dtype, **impls)
    oracle.randomize_norms(model, seed)
    return model


# "wide" runs in the slow step: each config is a compile of its own, the suite's main cost.
@pytest.fixture(params=["odd", pytest.param("wide", marks=pytest.mark.slow)])
def config(request) -> GptOssConfig:
    return CONFIGS[request.param]

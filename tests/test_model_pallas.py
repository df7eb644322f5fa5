"""The model with `attention_impl="pallas", moe_impl="pallas"` (kernels interpreted on CPU) equals the XLA path.

The tiny preset (6 q heads on 2 kv heads, 5 experts choose 2, window 8), float32 throughout, so the two
paths differ only by summation order (bound 1e-4 on logits of magnitude ~5, as in the transformers
parity tests). The greedy run prefills a 13-token prompt in chunks of 12 (24 tokens over 2 rows; longer than the window), so it
covers uncached flash attention (first chunk), flash attention against the full cache and against the
rotated ring (second chunk), split-K decode attention over both caches, and the grouped MXFP4 kernels at
prefill and decode sizes. The kernels' own tests cover other head, expert and window sizes.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import build, forward
from flax import nnx

from gptoss_jax import GptOss, GptOssConfig
from gptoss_jax.sampling import Sampler

CONFIG = GptOssConfig.tiny()


@pytest.fixture(scope="module")
def models():
    return CONFIG, build(CONFIG), build(CONFIG, attention_impl="pallas", moe_impl="pallas")


def test_logits_match_xla(models):
    config, xla, pallas = models
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, (2, 19))
    expected, got = forward(xla, tokens), forward(pallas, tokens)
    assert float(jnp.abs(got - expected).max()) < 1e-4


@pytest.mark.slow
def test_greedy_tokens_match_xla(models):
    config, xla, pallas = models
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, config.vocab_size, n).tolist() for n in (13, 6)]
    run = dict(max_new_tokens=16)
    expected = Sampler(xla, stop_tokens=(), bucket=4, prefill_chunk=24).generate(prompts, **run).tokens
    got = Sampler(pallas, stop_tokens=(), bucket=4, prefill_chunk=24).generate(prompts, **run).tokens
    assert got == expected


def test_packed_only_experts_need_packed_weights():
    with pytest.raises(ValueError, match="mxfp4"):
        GptOss(CONFIG, rngs=nnx.Rngs(0), moe_impl="pallas", expert_format="bf16")

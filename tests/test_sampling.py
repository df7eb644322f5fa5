"""Greedy generation through the KV cache equals transformers' `generate` on the same weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import CONFIGS, build

import oracle
from gptoss_jax.sampling import Greedy, Random, Sampler


def test_greedy_matches_transformers_generate():
    """32 tokens after a prompt longer than the window: exercises prefill, the ring and decode."""
    config = CONFIGS["odd"]
    model = build(config)
    prompt = np.random.default_rng(5).integers(0, config.vocab_size, 11).tolist()
    ours = Sampler(model, stop_tokens=()).generate([prompt], max_new_tokens=32).tokens[0]
    hf = oracle.hf_model(config, model)
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None)
    assert ours == theirs[0, len(prompt) :].tolist()


@pytest.mark.slow  # the "wide" config's own compiles; test_stop_tokens_end_each_row_and_are_kept batches rows by default
def test_batched_greedy_equals_each_prompt_alone():
    config = CONFIGS["wide"]
    model = build(config)
    rng = np.random.default_rng(6)
    prompts = [rng.integers(0, config.vocab_size, n).tolist() for n in (3, 17, 9)]
    sampler = Sampler(model, stop_tokens=())
    batched = sampler.generate(prompts, max_new_tokens=8).tokens
    chunked = Sampler(model, stop_tokens=(), bucket=4, prefill_chunk=24).generate(prompts, max_new_tokens=8).tokens
    assert chunked == batched  # prompts of 3, 17 and 9 tokens prefilled in chunks of 24 / 3 rows = 8
    for row, prompt in enumerate(prompts):
        assert batched[row] == sampler.generate([prompt], max_new_tokens=8).tokens[0]


def test_context_overflow_is_a_clear_error():
    model = build(CONFIGS["odd"])
    with pytest.raises(ValueError, match="exceeds the context"):
        Sampler(model).generate([[1, 2, 3]], max_new_tokens=CONFIGS["odd"].max_context)
    with pytest.raises(ValueError, match="token ids must lie in"):
        Sampler(model).generate([[1, CONFIGS["odd"].vocab_size]], max_new_tokens=2)


def test_stop_tokens_end_each_row_and_are_kept():
    model = build(CONFIGS["wide"])
    prompts = [[5, 6, 7], [9, 10]]
    free = Sampler(model, stop_tokens=()).generate(prompts, max_new_tokens=6).tokens
    stop = free[0][2]  # the third token row 0 produces
    result = Sampler(model, stop_tokens=(stop,)).generate(prompts, max_new_tokens=6)
    first = free[0].index(stop)
    assert result.tokens[0] == free[0][: first + 1] and result.stopped[0]
    expected_row1 = free[1][: free[1].index(stop) + 1] if stop in free[1] else free[1]
    assert result.tokens[1] == expected_row1


def test_random_sampling_is_seeded_and_respects_its_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 2000)
    draw = jax.vmap(lambda s, k: s(logits, k)[0], in_axes=(None, 0))

    def frequencies(strategy):
        return np.bincount(np.asarray(jax.jit(draw, static_argnums=0)(strategy, keys)), minlength=4) / len(keys)

    # 2000 draws: a frequency's standard error is at most 0.011, so 0.05 is over 4 sigma.
    np.testing.assert_allclose(frequencies(Random()), [0.5, 0.3, 0.15, 0.05], atol=0.05)
    assert frequencies(Random(top_k=2))[2:].sum() == 0
    assert frequencies(Random(top_p=0.7))[2:].sum() == 0  # 0.5 + 0.3 reaches 0.7
    assert frequencies(Random(top_p=0.85))[3] == 0 and frequencies(Random(top_p=0.85))[2] > 0
    assert frequencies(Random(min_p=0.5))[2:].sum() == 0  # 0.15 < 0.5 * 0.5
    cold = frequencies(Random(temperature=0.25))
    assert cold[0] > 0.85  # (0.5/0.3)^4 = 7.7: sharpened towards the best token
    assert np.array_equal(np.asarray(draw(Random(), keys[:50])), np.asarray(draw(Random(), keys[:50])))
    assert int(Greedy()(logits, keys[0])[0]) == 0
    with pytest.raises(ValueError, match="invalid sampling settings"):
        Random(temperature=0)

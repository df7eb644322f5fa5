"""Greedy generation through the KV cache equals transformers' `generate` on the same weights."""

import numpy as np
import pytest
import torch
from conftest import CONFIGS, build

import oracle
from gptoss_jax import sampling


def test_greedy_matches_transformers_generate():
    """32 tokens after a prompt longer than the window: exercises prefill, the ring and decode."""
    config = CONFIGS["odd"]
    model = build(config)
    prompt = np.random.default_rng(5).integers(0, config.vocab_size, 11).tolist()
    ours = sampling.greedy(model, [prompt], max_new_tokens=32)[0]
    hf = oracle.hf_model(config, model)
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None)
    assert ours.tolist() == theirs[0, len(prompt) :].tolist()


def test_batched_greedy_equals_each_prompt_alone():
    config = CONFIGS["wide"]
    model = build(config)
    rng = np.random.default_rng(6)
    prompts = [rng.integers(0, config.vocab_size, n).tolist() for n in (3, 17, 9)]
    batched = sampling.greedy(model, prompts, max_new_tokens=8)
    for row, prompt in enumerate(prompts):
        assert batched[row].tolist() == sampling.greedy(model, [prompt], max_new_tokens=8)[0].tolist()


def test_context_overflow_is_a_clear_error():
    model = build(CONFIGS["odd"])
    with pytest.raises(ValueError, match="exceeds the model's context"):
        sampling.greedy(model, [[1, 2, 3]], max_new_tokens=CONFIGS["odd"].max_context)

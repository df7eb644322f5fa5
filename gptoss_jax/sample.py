"""`python -m gptoss_jax.sample`: greedy tokens from a gpt-oss model.

Kept short on purpose: argument parsing and printing only; the work is in `gptoss_jax.sampling`.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax.numpy as jnp
from flax import nnx

from gptoss_jax import GptOss, GptOssConfig, sampling

DEFAULT_PROMPT = "200006,17360,200008,12194,200007"  # token ids: <|start|>system<|message|>Hello<|end|>


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gptoss_jax.sample",
        description="Run gpt-oss on a prompt of token ids and print the greedy continuation. "
        "Without weights it builds the chosen preset with random weights (a smoke test: the output is meaningless).",
    )
    parser.add_argument("--preset", default="tiny", choices=["tiny", "gpt-oss-20b", "gpt-oss-120b"],
                        help="model shape to build with random weights (default: tiny)")
    parser.add_argument("--prompt-ids", default=DEFAULT_PROMPT, help="comma-separated prompt token ids")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="tokens to generate (default: 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="parameter/activation dtype")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        prompt = [int(token) for token in args.prompt_ids.split(",")]
    except ValueError:
        print(f"error: --prompt-ids must be comma-separated integers, got {args.prompt_ids!r}", file=sys.stderr)
        return 2
    config = GptOssConfig.from_preset(args.preset)
    if not all(0 <= token < config.vocab_size for token in prompt):
        print(f"error: prompt token ids must lie in [0, {config.vocab_size})", file=sys.stderr)
        return 2
    print(f"notice: {args.preset} with RANDOM weights (seed {args.seed}): the tokens below are meaningless.")
    model = GptOss(config, rngs=nnx.Rngs(args.seed), dtype=jnp.dtype(args.dtype))
    start = time.perf_counter()
    try:
        tokens = sampling.greedy(model, [prompt], args.max_new_tokens)[0]
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("prompt ids:   ", prompt)
    print("greedy tokens:", tokens.tolist())
    print(f"{len(tokens)} tokens in {time.perf_counter() - start:.1f} s (compile included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

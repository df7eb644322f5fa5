"""`python -m gptoss_jax.sample`: chat with (or complete text from) gpt-oss in the terminal.

Kept short on purpose: argument parsing and printing only; the work is in `sampling` and `harmony`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

from gptoss_jax import checkpoint, cli, harmony, moe, sharding
from gptoss_jax.config import GptOssConfig
from gptoss_jax.model import ATTENTION_IMPLS, GptOss
from gptoss_jax.sampling import Greedy, Random, Sampler
from gptoss_jax.tokenizer import ENDOFTEXT, VocabError, get_encoding

DEFAULT_PROMPT = "What is the capital of France?"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m gptoss_jax.sample",
        description="Generate with gpt-oss. Without --checkpoint it runs the tiny preset with random weights "
        "(a smoke test: the text is meaningless). Convert real weights with `python -m convert SRC DST` first.",
    )
    p.add_argument("--checkpoint", help="a converted checkpoint directory (from python -m convert)")
    p.add_argument("--prompt", help="the user message (default: stdin if piped, else a sample question)")
    p.add_argument("--system", help="model identity line of the system message")
    p.add_argument("--developer", help="developer instructions")
    p.add_argument("--reasoning", choices=["low", "medium", "high"], default="medium", help="reasoning effort")
    p.add_argument("--temperature", type=float, default=1.0, help="0 for greedy (default 1.0, as OpenAI recommends)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = no limit")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--show-reasoning", action="store_true", help="print the analysis channel apart from the answer")
    p.add_argument("--raw", action="store_true", help="plain text completion of --prompt, without harmony")
    p.add_argument("--chat", action="store_true", help="interactive multi-turn chat (one message per line)")
    p.add_argument("--json", action="store_true", help="print one JSON object with tokens, text, messages and speeds")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--moe-impl", choices=moe.IMPLS, default="auto",
                   help="experts algorithm: gather (per token), grouped (per expert), pallas (kernels); auto picks by size")
    p.add_argument("--attention-impl", choices=ATTENTION_IMPLS, default="xla", help="xla (reference) or pallas (kernels)")
    cli.add_mesh_flags(p)
    return p.parse_args(argv)


def _model(args: argparse.Namespace, mesh) -> GptOss:
    if not args.checkpoint:
        print("notice: tiny preset with RANDOM weights, so the text is meaningless; "
              "pass --checkpoint DIR (from `python -m convert`) for a real model.", file=sys.stderr)
    return checkpoint.load(
        args.checkpoint or GptOssConfig.tiny(), dtype=args.dtype, mesh=mesh, moe_impl=args.moe_impl,
        attention_impl=args.attention_impl, seed=args.seed,
    )


def _printer(args: argparse.Namespace):
    channel_shown = [None]

    def on_text(channel: str | None, text: str) -> None:
        if channel == "analysis" and not args.show_reasoning:
            return
        if args.show_reasoning and channel != channel_shown[0] and channel is not None:
            print(f"\n[{channel}] ", end="")
            channel_shown[0] = channel
        print(text, end="", flush=True)

    return None if args.json else on_text


def _check_flags(args: argparse.Namespace) -> None:
    """Refuses settings that would sample nonsense (a NaN temperature picks token 0 forever) before loading."""
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ValueError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise ValueError(f"--top-k must be >= 0, got {args.top_k}")
    if not 0 <= args.seed < 2**32:
        raise ValueError(f"--seed must be in [0, 2**32), got {args.seed}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.mesh:
        sharding.parse_mesh(args.mesh)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    try:
        _check_flags(args)
        get_encoding()  # a bad vocabulary is reported before minutes of loading, not after
        mesh = cli.mesh_from_flags(args)
        strategy = Greedy() if args.temperature == 0 else Random(args.temperature, args.top_k, args.top_p)
        sampler = Sampler(_model(args, mesh), mesh=mesh)
        settings = dict(max_new_tokens=args.max_new_tokens, strategy=strategy, seed=args.seed)
        completion, generation = (_raw if args.raw else _harmony)(args, sampler, settings)
    except (ValueError, OSError, VocabError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if generation is None:
        return 0
    if args.json:
        print(json.dumps({
            "tokens": generation.tokens[0], "text": completion.text,
            "messages": [m.to_dict() for m in completion.messages], "parse_error": completion.parse_error,
            "prompt_tokens": generation.prompt_tokens, "prefill_tokens_per_s": generation.prefill_tokens_per_s,
            "decode_tokens_per_s": generation.decode_tokens_per_s,
        }))
    else:
        decode = generation.decode_tokens_per_s
        print(f"\n[{generation.prompt_tokens} prompt tokens at {generation.prefill_tokens_per_s:.1f} tok/s, decode "
              f"{'n/a' if decode is None else f'{decode:.1f}'} tok/s; {time.perf_counter() - started:.1f} s in all]",
              file=sys.stderr)
    return 0


def _prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return args.prompt
    return DEFAULT_PROMPT if sys.stdin.isatty() else sys.stdin.read()


def _raw(args, sampler, settings):
    """Plain-text completion, stopping at <|endoftext|>."""
    encoding = get_encoding()
    echo = None if args.json else (lambda _row, token: print(encoding.decode([token]), end="", flush=True))
    prompt = encoding.encode(_prompt(args), disallowed_special=())
    generation = sampler.generate([prompt], on_token=echo, stop_tokens=(ENDOFTEXT,), **settings)
    return harmony.Completion([], encoding.decode(generation.tokens[0])), generation


def _harmony(args, sampler, settings):
    """One harmony turn, or a whole --chat session; returns the last turn."""
    chat = harmony.Chat(reasoning=args.reasoning, instructions=args.developer, identity=args.system)
    completion = generation = None
    for turn, message in enumerate(_messages(args)):
        chat.add_user(message)
        completion, generation = harmony.reply(chat, sampler, on_text=_printer(args), **{**settings, "seed": args.seed + turn})
        if not args.json and completion.parse_error:
            print(f"[not valid harmony ({completion.parse_error}); raw output:]\n{completion.text}")
        elif not args.json:
            print()
    return completion, generation


def _messages(args: argparse.Namespace):
    """The user's messages: the one prompt, or lines typed at the chat prompt until EOF or 'exit'."""
    if not args.chat:
        yield _prompt(args)
        return
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            return
        if line in ("exit", "quit"):
            return
        yield line


if __name__ == "__main__":
    sys.exit(main())

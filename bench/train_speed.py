"""Fine-tuning speed: tokens per second of a whole training step (forward, backward, AdamW), ours beside
transformers' `GptOssForCausalLM` trained the same way in torch, measured in the same run.

    python bench/train_speed.py --preset tiny --method full --compare hf [--json out.json]
    python bench/train_speed.py --preset gpt-oss-20b --layers 2 --method lora --length 512

Random weights with the preset's shapes (cut to `--layers`), random tokens, every position learned.
Ours is `finetune.Trainer` (bf16 compute over float32 masters and moments, per-layer remat); the peer
is torch AdamW over float32 weights under bf16 autocast, with gradient checkpointing, for `--method
full` only (LoRA on the peer would need peft). The first step compiles (ours) or warms up (theirs) and
is reported apart; tokens/s is batch x length over the median of the later steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from collections.abc import Iterator

import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss_jax import GptOss, GptOssConfig, LoraSpec
from gptoss_jax.finetune import data
from gptoss_jax.finetune.trainer import TrainConfig, Trainer


def cpu_name() -> str:
    """The CPU's model name (figures from different machines compare only as same-run ratios)."""
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _timed(steps: Iterator) -> list[float]:
    """Seconds of each step of an iterator that returns once its step has finished."""
    times, start = [], time.perf_counter()
    for _ in steps:
        now = time.perf_counter()
        times.append(now - start)
        start = now
    return times


def ours(config: GptOssConfig, method: str, tokens: np.ndarray, steps: int) -> list[float]:
    options = dict(lora=LoraSpec(rank=16, alpha=32.0)) if method == "lora" else dict(expert_format="bf16")
    model = GptOss(config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, remat="layer", **options)
    batch, length = tokens.shape
    trainer = Trainer(model, TrainConfig(method=method, steps=steps + 1, global_batch=batch, micro_batch=batch,
                                         max_length=length, bucket=1))
    examples = [data.Example(row.astype(np.int32), np.ones(length, bool), "bench") for row in tokens]
    return _timed(trainer.fit(examples))


def theirs(config: GptOssConfig, tokens: np.ndarray, steps: int) -> list[float]:
    import torch
    import transformers

    hf_config = transformers.GptOssConfig(**config.to_hf_dict(), attn_implementation="eager", use_cache=False)
    model = transformers.GptOssForCausalLM(hf_config).float().train()
    model.activation_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.from_numpy(tokens.astype(np.int64))

    def step_once() -> Iterator[None]:
        for _ in range(steps + 1):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            yield

    return _timed(step_once())


def summary(times: list[float], tokens_per_step: int) -> dict:
    later = times[1:]
    return {"first_step_s": times[0], "step_s": statistics.median(later), "tokens_per_s": tokens_per_step / statistics.median(later)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "gpt-oss-20b", "gpt-oss-120b"])
    parser.add_argument("--layers", type=int, help="cut the depth to N layers")
    parser.add_argument("--method", default="lora", choices=["lora", "full"])
    parser.add_argument("--batch", type=int, default=2, help="rows per step")
    parser.add_argument("--length", type=int, default=256, help="tokens per row")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the first")
    parser.add_argument("--compare", choices=["hf"], help="also time transformers (full fine-tuning only)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    if args.compare and args.method != "full":
        parser.error("--compare hf times full fine-tuning only (LoRA on transformers would need peft)")
    config = GptOssConfig.from_preset(args.preset)
    if args.layers:
        config = dataclasses.replace(config, num_hidden_layers=args.layers)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.length))
    result = {"cpu": cpu_name(), "preset": args.preset, "layers": config.num_hidden_layers,
              "method": args.method, "batch": args.batch, "length": args.length,
              "ours": summary(ours(config, args.method, tokens, args.steps), tokens.size)}
    if args.compare:
        result["transformers"] = summary(theirs(config, tokens, args.steps), tokens.size)
    print(f"{args.preset} ({config.num_hidden_layers} layers), {args.method}, {args.batch} x {args.length} tokens per step, on {result['cpu']}")
    print(f"{'engine':<14}{'first step s':>13}{'step s':>9}{'tok/s':>9}")
    for engine in ("ours", "transformers"):
        if engine in result:
            r = result[engine]
            print(f"{engine:<14}{r['first_step_s']:>13.2f}{r['step_s']:>9.2f}{r['tokens_per_s']:>9.1f}")
    if args.compare:
        print(f"ours / transformers tok/s: {result['ours']['tokens_per_s'] / result['transformers']['tokens_per_s']:.2f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()

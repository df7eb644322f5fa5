"""`python -m gptoss_jax.finetune`: LoRA or full fine-tuning of gpt-oss on chat data, on any mesh and many hosts.

Kept to flags, progress and exit codes; the work is in `data`, `trainer` and `run`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import signal
import sys
import time
from pathlib import Path

import jax
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from gptoss_jax import checkpoint, cli, moe, sharding
from gptoss_jax.finetune import data
from gptoss_jax.finetune.run import Run, fingerprint
from gptoss_jax.finetune.trainer import METHODS, TrainConfig, Trainer
from gptoss_jax.lora import ATTENTION_TARGETS, LoraSpec
from gptoss_jax.model import REMAT_POLICIES

EXAMPLE = """\
data: one chat per line, in the OpenAI chat form; the model learns the assistant messages only.
  {"messages": [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "What is 2 + 2?"},
                {"role": "assistant", "thinking": "Simple sum.", "content": "4"}]}
  Tool use: an assistant message with "tool_calls": [{"id": "1", "type": "function", "function":
  {"name": "add", "arguments": {"a": 2}}}], then {"role": "tool", "tool_call_id": "1", "content": "4"};
  declare the functions in a top-level "tools": [{"type": "function", "function": {"name": "add", ...}}].

example (LoRA on one host, 8 devices holding one expert group each):
  python -m gptoss_jax.finetune --checkpoint gpt-oss-20b-jax --data train.jsonl --out runs/first \\
      --mesh data=1,expert=8,model=1 --steps 500
RUN then holds run.json, metrics.jsonl and checkpoints/; rerun with --resume auto to continue it."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m gptoss_jax.finetune", epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune gpt-oss (LoRA adapters, or every parameter but the packed experts) on chats "
        "rendered in the harmony format, saving resumable checkpoints into --out.",
    )
    p.add_argument("--checkpoint", required=True, help="the base model: a converted checkpoint (python -m convert)")
    p.add_argument("--data", required=True, type=Path, help="training chats, JSONL (format below)")
    p.add_argument("--eval", type=Path, help="held-out chats, JSONL: their loss is logged every --eval-every steps")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--out", required=True, type=Path, help="the run directory (created)")
    p.add_argument("--method", choices=METHODS, default="lora", help="lora: train adapters only (default); full: every parameter")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0, help="the adapters' update is scaled by alpha / rank")
    p.add_argument("--lora-targets", default="q,k,v,out,experts", help="comma-separated among q,k,v,out,experts")
    p.add_argument("--global-batch", type=int, default=16, help="chats per optimizer step")
    p.add_argument("--micro-batch", type=int, default=4, help="chats per data shard per forward pass (memory)")
    p.add_argument("--max-length", type=int, default=4096, help="longer chats are skipped (and counted)")
    p.add_argument("--strict", action="store_true", help="fail on a chat longer than --max-length instead")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps (default: one epoch)")
    length.add_argument("--epochs", type=float, help="passes over --data")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (AdamW)")
    p.add_argument("--warmup", type=float, default=0.03, help="fraction of steps warming up linearly")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="the cosine decay ends at lr x this")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip (0: none)")
    p.add_argument("--save-every", type=int, default=100, help="steps between checkpoints (and one at the end)")
    p.add_argument("--keep", type=int, default=3, help="checkpoints kept")
    p.add_argument("--resume", choices=["auto", "never"], default="never",
                   help="auto: continue the run in --out from its latest checkpoint (settings must match)")
    p.add_argument("--seed", type=int, default=0, help="the data order")
    p.add_argument("--bucket", type=int, default=8,
                   help="global batches per window of the shuffled data sorted by length, so a batch's chats have "
                   "similar lengths and little padding (1: plain shuffle)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="compute dtype (masters are float32)")
    p.add_argument("--remat", choices=REMAT_POLICIES, default="layer", help="activation rematerialization")
    p.add_argument("--moe-impl", choices=moe.IMPLS, default="auto")
    cli.add_mesh_flags(p)
    return p.parse_args(argv)


def _lora(args: argparse.Namespace) -> LoraSpec | None:
    if args.method != "lora":
        return None
    names = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    unknown = [t for t in names if t not in (*ATTENTION_TARGETS, "experts")]
    if unknown:
        raise ValueError(f"unknown --lora-targets {unknown}; choose among {', '.join(ATTENTION_TARGETS)}, experts")
    targets = [t for t in names if t != "experts"] + (["mlp1", "mlp2"] if "experts" in names else [])
    return LoraSpec(rank=args.lora_rank, alpha=args.lora_alpha, targets=tuple(targets))


def _settings(args: argparse.Namespace, config: TrainConfig, lora: LoraSpec | None) -> dict:
    """What makes a run this run: resuming with any of it changed is refused."""
    base = Path(args.checkpoint).absolute()
    return {
        "train": dataclasses.asdict(config), "lora": None if lora is None else dataclasses.asdict(lora),
        "checkpoint": str(base), "checkpoint_fingerprint": fingerprint([base / checkpoint.MARKER, base / "config.json"]),
        "data": str(args.data.absolute()), "data_fingerprint": fingerprint([args.data]),
        "dtype": args.dtype, "remat": args.remat, "moe_impl": args.moe_impl, "mesh": args.mesh,
    }


class Stop:
    """Set by SIGTERM; every process of a job learns of it at the same step."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "requested", True))

    def now(self) -> bool:
        if jax.process_count() == 1:
            return self.requested
        return bool(multihost_utils.process_allgather(np.int32(self.requested)).any())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        mesh = cli.mesh_from_flags(args)
        examples, skipped = data.read_jsonl(args.data, max_length=args.max_length, strict=args.strict)
        held_out = data.read_jsonl(args.eval, max_length=args.max_length, strict=args.strict)[0] if args.eval else []
        steps = args.steps or math.ceil((args.epochs or 1.0) * len(examples) / args.global_batch)
        config = TrainConfig(
            method=args.method, steps=steps, global_batch=args.global_batch, micro_batch=args.micro_batch,
            max_length=args.max_length, lr=args.lr, warmup=args.warmup, min_lr_ratio=args.min_lr_ratio,
            weight_decay=args.weight_decay, clip=args.clip, seed=args.seed, bucket=args.bucket,
        )
        lora = _lora(args)
        config.rows_per_micro_batch(1 if mesh is None else sharding.batch_shards(mesh))  # fail before loading
        run = Run(args.out, _settings(args, config, lora), keep=args.keep, resume=args.resume == "auto")
        model = checkpoint.load(args.checkpoint, dtype=args.dtype, mesh=mesh, moe_impl=args.moe_impl, lora=lora, remat=args.remat)
        trainer = Trainer(model, config, mesh=mesh)
        resumed = run.restore(trainer)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    say = print if jax.process_index() == 0 else (lambda *a, **k: None)
    say(f"{len(examples)} chats ({skipped} over --max-length skipped), {steps} steps"
        + (f", resuming after step {resumed}" if resumed is not None else ""), file=sys.stderr)
    stop = Stop()
    started, seen = time.perf_counter(), 0
    with tqdm.tqdm(total=steps, initial=trainer.step, unit="step", disable=jax.process_index() != 0) as bar:
        for metrics in trainer.fit(examples):
            if not math.isfinite(metrics["loss"]):
                last = run.latest_saved()
                run.close()
                say(f"error: loss is {metrics['loss']} at step {metrics['step']}; the last good checkpoint is "
                    + (f"{run.directory}/checkpoints/{last}" if last is not None else "none (no step was saved)"), file=sys.stderr)
                return 1
            seen += metrics["tokens"]
            metrics["tokens_per_s"] = seen / (time.perf_counter() - started)
            if held_out and metrics["step"] % args.eval_every == 0:
                metrics["eval_loss"] = trainer.evaluate(held_out)
            run.log(metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
            bar.update()
            stopping = stop.now()
            if metrics["step"] % args.save_every == 0 or stopping:
                run.save(trainer)
            if stopping:
                run.close()
                say(f"stopped by SIGTERM after step {metrics['step']}; saved to {run.directory}", file=sys.stderr)
                return 0
    run.save(trainer)
    run.close()
    say(f"done: {run.directory}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

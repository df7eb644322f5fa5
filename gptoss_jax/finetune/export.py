"""`python -m gptoss_jax.finetune.export RUN --out DST`: a fine-tuning run's latest weights as a checkpoint.

`--format orbax` (default) writes what `gptoss_jax.load` and `python -m gptoss_jax.sample --checkpoint DST`
read; `--format hf` writes Hugging Face's published layout (safetensors, bf16, MXFP4 experts), which
transformers, vLLM and llama.cpp's `convert_hf_to_gguf.py` read; `--format original` OpenAI's `original/`;
`--format gguf` the .gguf file (DST) that llama.cpp's converter would write from the hf export, tokenizer
included, for llama.cpp.

LoRA adapters are merged into the base: attention weights exactly, experts re-quantized to MXFP4 (the
published format, and what inference kernels run) or kept dense (`--experts bf16`: exact, 4x the
bytes; MXFP4 rounding can erase a small update).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from convert import gguf, published
from gptoss_jax import checkpoint
from gptoss_jax.finetune import data
from gptoss_jax.finetune.run import Run
from gptoss_jax.finetune.trainer import TrainConfig, Trainer
from gptoss_jax.lora import LoraSpec, merge_lora
from gptoss_jax.loss import next_token_loss_sum
from gptoss_jax.model import GptOss


def run_settings(run_directory: Path) -> dict:
    """The settings a fine-tuning run saved in `RUN/run.json`."""
    settings_file = run_directory / "run.json"
    if not settings_file.is_file():
        raise ValueError(f"{run_directory} is not a fine-tuning run (no run.json)")
    return json.loads(settings_file.read_text())


def base_model(settings: dict, lora: LoraSpec | None = None) -> GptOss:
    """The checkpoint a run was trained from, loaded as the run loaded it."""
    return checkpoint.load(settings["checkpoint"], dtype=settings["dtype"], moe_impl=settings["moe_impl"], lora=lora)


def trained_model(run_directory: str | Path) -> tuple[GptOss, int]:
    """The run's model after its latest checkpoint (adapters not yet merged), and that step."""
    run_directory = Path(run_directory)
    settings = run_settings(run_directory)
    model = base_model(settings, LoraSpec(**settings["lora"]) if settings["lora"] else None)
    trainer = Trainer(model, TrainConfig(**settings["train"]))
    run = Run(run_directory, settings, resume=True)
    step = run.restore(trainer)
    run.close()
    if step is None:
        raise ValueError(f"{run_directory} has no checkpoint yet")
    return trainer.model(), step


_loss_sum = nnx.jit(next_token_loss_sum)


def mean_loss(model: GptOss, examples: Sequence[data.Example], rows: int = 8) -> float:
    """Mean next-token loss over the learned tokens of `examples`, `rows` chats at a time."""
    total, learned = 0.0, 0
    for start in range(0, len(examples), rows):
        batch = examples[start : start + rows]
        tokens, mask = data.pad(batch, data.padded_length(batch, max(len(e.tokens) for e in batch)))
        loss_sum, count = _loss_sum(model, jnp.asarray(tokens), jnp.asarray(mask))
        total, learned = total + float(loss_sum), learned + int(count)
    return total / max(learned, 1)


def rounding_report(base: GptOss, trained: Callable[[], GptOss], examples: Sequence[data.Example]) -> dict[str, float]:
    """Eval loss of the base and of the trained model merged with dense and with re-quantized experts:
    MXFP4 rounding can erase a small update, and this shows whether it did."""
    report = {"base": mean_loss(base, examples)}
    for experts in ("bf16", "mxfp4"):
        report[f"merged, {experts} experts"] = mean_loss(merge_lora(trained(), experts=experts), examples)
    return report


LAYOUTS = ("orbax", "hf", "original", "gguf")


def export(run_directory: str | Path, out: str | Path, *, experts: str = "mxfp4", layout: str = "orbax") -> int:
    """Writes the run's merged model to `out` (which must not exist) in `layout`; returns the step exported."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown export format {layout!r}; choose one of {LAYOUTS}")
    if experts == "bf16" and layout == "original":
        raise ValueError("dense bf16 experts exist only in the hf layout; export with --experts mxfp4")
    model, step = trained_model(run_directory)
    merge_lora(model, experts=experts)  # a no-op without adapters
    if layout == "orbax":
        checkpoint.save(model, out, {"source": "gptoss_jax.finetune", "run": str(Path(run_directory).absolute()), "step": step})
    elif layout == "gguf":
        gguf.save(model, out)
    else:
        published.save(model, out, layout=layout)
    return step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gptoss_jax.finetune.export", description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="the run directory (--out of python -m gptoss_jax.finetune)")
    p.add_argument("--out", required=True, type=Path,
                   help="the checkpoint directory to write, or the .gguf file with --format gguf (must not exist)")
    p.add_argument("--format", choices=LAYOUTS, default="orbax",
                   help="orbax: for gptoss_jax (default); hf: Hugging Face safetensors; original: OpenAI's original/ "
                   "layout; gguf: one .gguf file for llama.cpp")
    p.add_argument("--experts", choices=["mxfp4", "bf16"], default="mxfp4", help="merged experts re-quantized (default) or dense")
    p.add_argument("--eval", type=Path, help="chats (JSONL, as for training): print their loss under the base and the "
                   "merged model with dense and with MXFP4 experts first (rounding can erase a small update)")
    args = p.parse_args(argv)
    if args.out.exists():
        print(f"error: {args.out} exists; choose a new --out", file=sys.stderr)
        return 2
    try:
        if args.eval:
            settings = run_settings(args.run)
            examples = data.read_jsonl(args.eval, max_length=settings["train"]["max_length"])[0]
            for name, loss in rounding_report(base_model(settings), lambda: trained_model(args.run)[0], examples).items():
                print(f"eval loss, {name}: {loss:.4f}", file=sys.stderr)
        step = export(args.run, args.out, experts=args.experts, layout=args.format)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"exported step {step} of {args.run} to {args.out} ({args.format})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
from pathlib import Path

from convert import gguf, published
from gptoss_jax import checkpoint
from gptoss_jax.finetune.run import Run
from gptoss_jax.finetune.trainer import TrainConfig, Trainer
from gptoss_jax.lora import LoraSpec, merge_lora
from gptoss_jax.model import GptOss


def trained_model(run_directory: str | Path) -> tuple[GptOss, int]:
    """The run's model after its latest checkpoint (adapters not yet merged), and that step."""
    run_directory = Path(run_directory)
    settings_file = run_directory / "run.json"
    if not settings_file.is_file():
        raise ValueError(f"{run_directory} is not a fine-tuning run (no run.json)")
    settings = json.loads(settings_file.read_text())
    lora = LoraSpec(**settings["lora"]) if settings["lora"] else None
    model = checkpoint.load(settings["checkpoint"], dtype=settings["dtype"], moe_impl=settings["moe_impl"], lora=lora)
    trainer = Trainer(model, TrainConfig(**settings["train"]))
    run = Run(run_directory, settings, resume=True)
    step = run.restore(trainer)
    run.close()
    if step is None:
        raise ValueError(f"{run_directory} has no checkpoint yet")
    return trainer.model(), step


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
    args = p.parse_args(argv)
    if args.out.exists():
        print(f"error: {args.out} exists; choose a new --out", file=sys.stderr)
        return 2
    try:
        step = export(args.run, args.out, experts=args.experts, layout=args.format)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"exported step {step} of {args.run} to {args.out} ({args.format})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

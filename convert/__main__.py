"""`python -m convert SRC DST`: a published gpt-oss checkpoint into a gptoss-jax (Orbax) checkpoint.

Kept short on purpose: parsing and printing only; the work is in `convert.converter`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from convert.converter import convert
from convert.safetensors_io import CheckpointError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m convert",
        description="Convert a gpt-oss checkpoint as downloaded from the model hub (the Hugging Face layout at the "
        "repo root, or the original layout in original/) into a gptoss-jax Orbax checkpoint. Tensors are copied "
        "byte for byte; nothing is written at DST unless the whole conversion succeeds.",
    )
    parser.add_argument("src", type=Path, help="checkpoint folder (repo root, or its original/ folder)")
    parser.add_argument("dst", type=Path, help="where to write the converted checkpoint (must not exist)")
    parser.add_argument("--format", default="auto", choices=["auto", "hf", "original"], help="source layout (default: detect)")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists (only once the new one is complete)")
    parser.add_argument("--quantize", choices=["mxfp4"], help="pack dense bf16 experts (fine-tunes) to MXFP4 (round to nearest); without it they stay bf16")
    args = parser.parse_args(argv)
    try:
        summary = convert(args.src, args.dst, layout=args.format, overwrite=args.overwrite, quantize=args.quantize)
    except (CheckpointError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{summary} -> {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

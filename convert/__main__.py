"""`python -m convert SRC DST`: a published gpt-oss checkpoint into a gptoss-jax (Orbax) checkpoint.

Kept short on purpose: parsing and printing only; the work is in `convert.converter`.
"""

from __future__ import annotations

import argparse
import signal
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
    previous = signal.signal(signal.SIGTERM, _interrupt), sys.unraisablehook
    sys.unraisablehook = _quiet_closed_loops
    try:
        summary = convert(args.src, args.dst, layout=args.format, overwrite=args.overwrite, quantize=args.quantize)
    except (CheckpointError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"error: interrupted; nothing was written to {args.dst}", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        sys.unraisablehook = previous[1]
    print(f"{summary} -> {args.dst}")
    return 0


def _interrupt(signum: int, frame) -> None:
    """SIGTERM unwinds like Ctrl-C, so the half-written staging folder is removed on the way out."""
    raise KeyboardInterrupt


def _quiet_closed_loops(unraisable) -> None:
    """After a failed write (disk full), Orbax's pending callbacks find its event loop closed and each
    prints a traceback; the error itself has been reported in one line."""
    if not (isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value)):
        sys.__unraisablehook__(unraisable)


if __name__ == "__main__":
    sys.exit(main())

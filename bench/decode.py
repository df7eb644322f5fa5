"""Decode and prefill speed, memory and compile time of gptoss-jax, beside a peer engine in the same run.

    python bench/decode.py --preset gpt-oss-20b --layers 2 --compare hf [--json out.json]
    python bench/decode.py --preset gpt-oss-20b --prompts 512 --batches 1 --compare llama.cpp

Each engine runs in its own fresh process (so peak RSS and time to first token are its own) on the
same prompts: a warm-up and `--repeats` timed greedy generate calls per (prompt length, batch).
The table shows ours, the peer's figure, their ratio (>1: ours is better), and the project's targets.
A roofline section compares decode with what this machine's read bandwidth allows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

import llama_cpp
import peers
import report
import roofline
from convert.converter import convert
from convert.synthetic import write_checkpoint
from gptoss_jax import GptOssConfig
from gptoss_jax.checkpoint import MARKER

HERE = Path(__file__).parent


def synthetic_checkpoints(config: GptOssConfig, preset: str, work_dir: Path) -> tuple[Path, Path]:
    """(published HF layout, converted) random checkpoints of `config`, written once per preset and depth."""
    base = work_dir / f"{preset}-{config.num_hidden_layers}layers"
    published, converted = base / "hf", base / "converted"
    if not published.exists():
        print(f"writing random {preset} weights ({config.num_hidden_layers} layers) to {published}", file=sys.stderr)
        staging = base / "hf.partial"
        shutil.rmtree(staging, ignore_errors=True)
        write_checkpoint(staging, config)
        staging.rename(published)
    if not converted.exists():
        print(f"converting to {converted}", file=sys.stderr)
        convert(published, converted)
    return published, converted


def run_engine(script: str, spec: dict) -> dict:
    finished = peers.run([sys.executable, str(HERE / script), json.dumps({**spec, "spawned_at": time.time()})])
    if finished.returncode:
        raise SystemExit(f"error: {script} failed with exit code {finished.returncode}")
    return {**json.loads(finished.stdout), "peak_rss_bytes": finished.peak_rss_bytes, "wall_s": finished.wall_s}


def run_command(command: list[str]) -> dict:
    print(f"running {shlex.join(command)}", file=sys.stderr, flush=True)
    finished = peers.run(command)
    sys.stderr.write(finished.stdout)
    return {"command": command, "returncode": finished.returncode, "peak_rss_bytes": finished.peak_rss_bytes,
            "wall_s": finished.wall_s, "stdout": finished.stdout}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python bench/decode.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Progress goes to stderr, the tables to stdout. See bench/README.md for how to read them.")
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--preset", choices=["tiny", "gpt-oss-20b", "gpt-oss-120b"], help="random weights of this preset")
    model.add_argument("--checkpoint", type=Path, metavar="PATH", help="a converted gptoss-jax checkpoint (python -m convert)")
    parser.add_argument("--layers", type=int, metavar="N", help="cut the preset to N layers (the full 20b needs ~16 GB)")
    parser.add_argument("--prompts", type=int, nargs="+", metavar="N", default=[512, 4096], help="prompt lengths (default 512 4096)")
    parser.add_argument("--batches", type=int, nargs="+", metavar="B", default=[1, 8], help="batch sizes (default 1 8)")
    parser.add_argument("--new-tokens", type=int, metavar="N", default=128, help="tokens generated per prompt (default 128, at least 3)")
    parser.add_argument("--repeats", type=int, metavar="N", default=1, help="timed runs per case after the warm-up; medians are reported")
    parser.add_argument("--compare", metavar="hf|llama.cpp|COMMAND", help="'hf': transformers on the same weights; 'llama.cpp': "
                        "its llama-bench on the same weights as GGUF (built on first use, batch-1 cases only); anything else: "
                        "a command line to time (wall time and peak RSS)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write every figure to this file")
    parser.add_argument("--work-dir", type=Path, metavar="DIR", default=Path.home() / ".cache/gptoss-jax/bench", help="where random checkpoints are kept")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts")
    return parser.parse_args(argv)


def validate(args: argparse.Namespace) -> GptOssConfig:
    if args.checkpoint is not None:
        if args.layers is not None or args.compare == "hf":
            raise ValueError("--layers and --compare hf need --preset (they run on random weights written by the benchmark)")
        if not (args.checkpoint / MARKER).is_file():
            raise ValueError(f"{args.checkpoint} is not a converted gptoss-jax checkpoint (convert it with python -m convert)")
        config = GptOssConfig.from_pretrained(args.checkpoint / "config.json")
    else:
        config = GptOssConfig.from_preset(args.preset)
        if args.layers is not None:
            if not 1 <= args.layers <= config.num_hidden_layers:
                raise ValueError(f"--layers must lie in [1, {config.num_hidden_layers}]")
            config = dataclasses.replace(config, num_hidden_layers=args.layers)
    if min(args.prompts) < 1 or min(args.batches) < 1 or args.new_tokens < 3 or args.repeats < 1:
        raise ValueError("prompt lengths, batches and --repeats must be at least 1, --new-tokens at least 3")
    if max(args.prompts) + args.new_tokens > config.max_context:
        raise ValueError(f"prompt {max(args.prompts)} + {args.new_tokens} new tokens exceed the context of {config.max_context}")
    if args.compare not in (None, "hf", "llama.cpp") and shutil.which(shlex.split(args.compare)[0]) is None:
        raise ValueError(f"--compare: command {shlex.split(args.compare)[0]!r} not found")
    return config


def run_peer(args: argparse.Namespace, config: GptOssConfig, published: Path | None, checkpoint: Path,
             spec: dict) -> tuple[dict | None, str, str | None]:
    """(peer result or None, its column name, why it was skipped)."""
    compare = args.compare
    if compare is None:
        return None, "peer", None
    if compare == "llama.cpp":
        return llama_cpp.run(args.work_dir, checkpoint, spec), "llama.cpp", None
    if compare != "hf":
        return run_command(shlex.split(compare)), "command", None
    problem = peers.hf_problem(config)
    if problem is not None:
        print(f"transformers skipped: {problem}", file=sys.stderr)
        return None, "transformers", problem
    return run_engine("engine_hf.py", {**spec, "checkpoint": str(published.absolute())}), "transformers", None


def print_report(args: argparse.Namespace, config: GptOssConfig, figures: dict) -> None:
    print(f"\n{args.preset or args.checkpoint}, {config.num_hidden_layers} layers; prompts {args.prompts}, batches {args.batches}, "
          f"{args.new_tokens} new tokens; medians of {args.repeats} run(s) after a warm-up")
    report.print_table(figures["table"], figures["peer_name"])
    ours, peer, peer_name = figures["ours"], figures["peer"], figures["peer_name"]
    if peer and peer.get("returncode"):
        print(f"note: the command exited with code {peer['returncode']}")
    if figures["peer_skipped"]:
        print(f"transformers skipped: {figures['peer_skipped']}")
    if peer_name == "transformers" and peer:  # both engines ran the same weights and prompts
        pairs = [(a, b) for c, d in zip(ours["cases"], peer["cases"]) for a, b in zip(c["first_tokens"], d["first_tokens"])]
        print(f"greedy first tokens equal to transformers' in {sum(a == b for a, b in pairs)} of {len(pairs)} rows")
    if args.preset and config.num_hidden_layers < GptOssConfig.from_preset(args.preset).num_hidden_layers:
        print("note: the targets are meant for the full depth; a cut model is faster and smaller")
    report.print_roofline(figures["bandwidth_bytes_per_s"], figures["copy_bandwidth_bytes_per_s"], figures["roofline"], figures["peer_name"])


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        config = validate(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.checkpoint is None:
        published, checkpoint = synthetic_checkpoints(config, args.preset, args.work_dir)
    else:
        published, checkpoint = None, args.checkpoint
    spec = {"prompts": args.prompts, "batches": args.batches, "new_tokens": args.new_tokens, "repeats": args.repeats, "seed": args.seed}
    print("measuring memory bandwidth", file=sys.stderr, flush=True)
    bandwidth, copy_bandwidth = roofline.read_bandwidth(), roofline.copy_bandwidth()
    ours = run_engine("engine_ours.py", {**spec, "checkpoint": str(checkpoint.absolute())})
    peer, peer_name, skipped = run_peer(args, config, published, checkpoint, spec)
    expert_format = json.loads((checkpoint / MARKER).read_text()).get("expert_format", "mxfp4")
    figures = {
        "model": {"preset": args.preset, "checkpoint": args.checkpoint and str(args.checkpoint), "layers": config.num_hidden_layers},
        "settings": spec, "bandwidth_bytes_per_s": bandwidth, "copy_bandwidth_bytes_per_s": copy_bandwidth, "ours": ours, "peer": peer, "peer_name": peer_name, "peer_skipped": skipped,
        "table": report.table(ours, peer, [(p, b) for p in args.prompts for b in args.batches]),
        "roofline": report.roofline_rows(roofline.abstract_model(config, expert_format), bandwidth, ours, peer),
    }
    print_report(args, config, figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where the time of one compiled decode or prefill step goes: per-op totals from a `jax.profiler` trace.

    python bench/profile_step.py --preset gpt-oss-20b --layers 4 --mode decode
    python bench/profile_step.py --preset gpt-oss-20b --layers 2 --mode prefill --tokens 512

Random weights with the preset's shapes, cut to `--layers` (per-layer costs scale with depth; the
unembedding does not). Runs the step a few times to warm up, then traces one and prints the ops
(XLA fusions, custom calls) that took the most time, summed over their calls.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gzip
import json
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from gptoss_jax import GptOss, GptOssConfig
from gptoss_jax.sampling import Greedy, _decode, _prefill


def step_fn(config: GptOssConfig, mode: str, batch: int, tokens: int):
    """A zero-argument function running one jitted step of the Sampler (its own jitted functions)."""
    model = GptOss(config, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    state = {"cache": model.init_cache(batch, tokens + 64)}
    key = jax.random.key(0)
    ids = jnp.ones((batch, tokens if mode == "prefill" else 1), jnp.int32)

    def run() -> None:
        if mode == "prefill":  # each run prefills the same positions into a fresh cache
            out, _ = _prefill(graphdef, params, ids, model.init_cache(batch, tokens + 64), jnp.full((batch,), tokens), key, Greedy())
        else:  # each run appends one more token
            out, state["cache"] = _decode(graphdef, params, ids[:, 0], state["cache"], key, Greedy())
        out.block_until_ready()

    return run


def op_totals(trace_dir: Path) -> collections.Counter:
    """Microseconds per XLA event name in the perfetto trace, summed over calls (Python frames, named
    `$file:line function`, are left out)."""
    events = json.load(gzip.open(next(trace_dir.rglob("perfetto_trace.json.gz"))))
    totals = collections.Counter()
    for event in events["traceEvents"] if isinstance(events, dict) else events:
        if event.get("ph") == "X" and not event["name"].startswith("$"):
            totals[event["name"]] += event.get("dur", 0)
    return totals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt-oss-20b", choices=["tiny", "gpt-oss-20b", "gpt-oss-120b"])
    parser.add_argument("--layers", type=int, default=2, help="cut the preset to N layers")
    parser.add_argument("--mode", choices=["decode", "prefill"], default="decode")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=512, help="prefill length (prefill) or context reserved (decode)")
    parser.add_argument("--top", type=int, default=20, help="how many ops to list")
    args = parser.parse_args(argv)
    if args.layers < 1 or args.batch < 1 or args.tokens < 1:
        parser.error("--layers, --batch and --tokens must be positive")

    config = dataclasses.replace(GptOssConfig.from_preset(args.preset), num_hidden_layers=args.layers)
    run = step_fn(config, args.mode, args.batch, args.tokens)
    for _ in range(3):
        run()
    start = time.perf_counter()
    run()
    print(f"{args.mode} step, {args.preset} cut to {args.layers} layers, batch {args.batch}: "
          f"{(time.perf_counter() - start) * 1e3:.1f} ms")
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            run()
        totals = op_totals(Path(trace_dir))
    print(f"{'ms':>9}  op (summed over calls; ThunkExecutor lines are whole-program spans)")
    for name, micros in totals.most_common(args.top):
        print(f"{micros / 1e3:9.1f}  {name[:110]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

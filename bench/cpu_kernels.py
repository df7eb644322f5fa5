"""The C++ decode kernels (`gptoss_jax.native`) at each instruction-set level this CPU runs, beside its
read bandwidth: how close one-token decode's matrix-vector products and cache attention come to reading
at memory speed.

    python bench/cpu_kernels.py [--preset gpt-oss-20b] [--layers 4] [--json out.json]

Random weights with the preset's shapes, stacked over `--layers` layers as the model holds them; each
call reads a different layer (so no matrix is in cache), as decode does:
- `mxfp4 mlp1` / `mxfp4 mlp2`: the experts one token chose (experts_per_token of them), packed;
- `bf16 q` / `bf16 out`: attention's query and output projections;
- `attn 544` / `attn 4096`: one token's attention to a full layer's bfloat16 KV cache of that many keys.
Then prefill's first expert product beside XLA's way of doing it (`prefill_gemms`), in GFLOP/s.
GB/s counts the bytes read (packed MXFP4: 17 bytes per 32 values; the cache's keys and values) over the
median call of `--runs`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import roofline
from kernel_speed import median_seconds
from gptoss_jax import GptOssConfig, mxfp4, native


def cases(config: GptOssConfig, layers: int, rng: np.random.Generator) -> list[tuple[str, int, object]]:
    """(name, weight bytes one call reads, call(level) -> call(layer))."""
    H, I, E, K = config.hidden_size, config.intermediate_size, config.num_experts, config.experts_per_token
    Q = config.num_attention_heads * config.head_dim
    experts = jnp.asarray(rng.choice(E, K, replace=False), jnp.int32)
    found = []
    for name, rows, cols in (("mxfp4 mlp1", 2 * I, H), ("mxfp4 mlp2", H, I)):
        blocks = jnp.asarray(rng.integers(0, 256, (layers, E, rows, cols // 32, 16), dtype=np.uint8))
        scales = jnp.asarray(rng.integers(120, 130, (layers, E, rows, cols // 32), dtype=np.uint8))
        x = jnp.asarray(rng.standard_normal((K, cols)), jnp.float32)

        def mxfp4(level, x=x, blocks=blocks, scales=scales):
            run = jax.jit(lambda x, b, s, e, layer: native.mxfp4_matvec(x, b, s, e, layer, at=level))
            return lambda layer: run(x, blocks, scales, experts, layer)

        found.append((name, K * rows * cols // 32 * 17, mxfp4))
    for name, rows, cols in (("bf16 q", Q, H), ("bf16 out", H, Q)):
        w = jnp.asarray(rng.standard_normal((layers, rows, cols)), jnp.bfloat16)
        x = jnp.asarray(rng.standard_normal(cols), jnp.float32)

        def bf16(level, x=x, w=w):
            run = jax.jit(lambda x, w, layer: native.bf16_matvec(x, w, layer, at=level))
            return lambda layer: run(x, w, layer)

        found.append((name, rows * cols * 2, bf16))
    N, G, D = config.num_key_value_heads, config.q_per_kv, config.head_dim
    sinks = jnp.asarray(rng.standard_normal((N, G)), jnp.float32)
    q = jnp.asarray(rng.standard_normal((1, N, G, D)), jnp.float32)
    for keys in (544, 4096):
        caches = [tuple(jnp.asarray(rng.standard_normal((1, keys, N, D)), jnp.bfloat16) for _ in "kv") for _ in range(layers)]
        positions = jnp.arange(keys, dtype=jnp.int32)[None]

        def attention(level, caches=caches, positions=positions, keys=keys):
            run = jax.jit(lambda k, v: native.decode_attention(q, k, v, jnp.full((1,), keys - 1, jnp.int32), positions, sinks, None, at=level))
            return lambda layer: run(*caches[layer])

        found.append((f"attn {keys}", 2 * keys * N * D * 2, attention))
    return found


def prefill_gemms(config: GptOssConfig, rng: np.random.Generator, pairs: int = 2048) -> list[tuple[str, int, object]]:
    """(engine, FLOPs, call) for prefill's first expert product: `pairs` (token, expert) rows spread evenly
    over the experts (512 tokens' worth at gpt-oss-20b), each row times its expert's packed mlp1. XLA's
    way (what `moe.grouped` does without AMX): each expert decoded to bfloat16, then a bf16 GEMM; the C++
    grouped GEMM where this CPU runs the amx level."""
    H, F, E = config.hidden_size, 2 * config.intermediate_size, config.num_experts
    blocks = jnp.asarray(rng.integers(0, 256, (1, E, F, H // 32, 16), dtype=np.uint8))
    scales = jnp.asarray(rng.integers(120, 130, (1, E, F, H // 32), dtype=np.uint8))
    x = jnp.asarray(rng.standard_normal((pairs, H)), jnp.bfloat16)
    counts = jnp.full((E,), pairs // E, jnp.int32)
    xla = jax.jit(lambda x, b, s: jax.lax.map(
        lambda e_x: jnp.einsum("fh,ph->pf", mxfp4.dequantize(b[0, e_x[0]], s[0, e_x[0]]), e_x[1]),
        (jnp.arange(E), x[: E * (pairs // E)].reshape(E, pairs // E, H))))
    found = [("xla", lambda: xla(x, blocks, scales))]
    if "amx" in native.runnable_levels():
        amx = jax.jit(lambda x, b, s: native.mxfp4_grouped_gemm(x, b, s, counts, at="amx"))
        found.append(("amx", lambda: amx(x, blocks, scales)))
    return [(engine, 2 * E * (pairs // E) * F * H, call) for engine, call in found]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["tiny", "gpt-oss-20b", "gpt-oss-120b"], default="gpt-oss-20b", help="shapes (default gpt-oss-20b)")
    parser.add_argument("--layers", type=int, default=4, metavar="N", help="layers in each stack (default 4; more than fit in cache)")
    parser.add_argument("--runs", type=int, default=40, metavar="N", help="timed calls per kernel and level; the median is reported (default 40)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if min(args.layers, args.runs) < 1:
        print("error: --layers and --runs must be at least 1", file=sys.stderr)
        return 2
    if not native.available():
        print("error: gptoss_jax was installed without its C++ kernels", file=sys.stderr)
        return 2
    config = GptOssConfig.from_preset(args.preset)
    bandwidth = roofline.read_bandwidth()
    rows = []
    for name, nbytes, make in cases(config, args.layers, np.random.default_rng(0)):
        for level in native.runnable_levels():
            call, layers = make(level), itertools.cycle(range(args.layers))  # each call reads the next layer
            seconds = median_seconds(lambda: call(next(layers)), args.runs)
            rows.append({"kernel": name, "level": level, "bytes": nbytes, "seconds": seconds, "bytes_per_s": nbytes / seconds})
    print(f"{args.preset}: read bandwidth {bandwidth / 1e9:.1f} GB/s (all cores); bytes read per call, median of {args.runs}")
    print(f"{'kernel':<12}{'level':<10}{'MB':>8}{'ms':>9}{'GB/s':>8}{'of read bw':>12}")
    for row in rows:
        print(f"{row['kernel']:<12}{row['level']:<10}{row['bytes'] / 1e6:>8.1f}{row['seconds'] * 1e3:>9.2f}"
              f"{row['bytes_per_s'] / 1e9:>8.1f}{row['bytes_per_s'] / bandwidth:>11.0%}")
    gemms = []
    for engine, flops, call in prefill_gemms(config, np.random.default_rng(1)):
        seconds = median_seconds(call, max(3, args.runs // 10))
        gemms.append({"engine": engine, "flops": flops, "seconds": seconds, "flops_per_s": flops / seconds})
    print("\nprefill: mlp1 of 2048 expert-sorted rows (512 tokens' worth), packed experts")
    print(f"{'engine':<8}{'GFLOP':>8}{'ms':>9}{'GFLOP/s':>9}")
    for row in gemms:
        print(f"{row['engine']:<8}{row['flops'] / 1e9:>8.1f}{row['seconds'] * 1e3:>9.1f}{row['flops_per_s'] / 1e9:>9.0f}")
    if args.json:
        figures = {"preset": args.preset, "read_bandwidth_bytes_per_s": bandwidth, "rows": rows, "prefill_gemms": gemms}
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Pallas kernels against the XLA path, and against the roofline, at gpt-oss shapes.

On a GPU or TPU every kernel is timed beside the XLA formulation the model would otherwise use
(median of synchronized runs after a compile run) and reported as achieved GB/s and TFLOP/s next to
the device's roofline. On a CPU there is nothing to time (Pallas runs only interpreted there), so the
script prints what an H100 should reach: bytes moved, FLOPs and the ideal time of each kernel.

    python bench/kernel_speed.py [--preset gpt-oss-20b] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable

import jax
import kernel_runs
import numpy as np
import roofline

from gptoss_jax import GptOssConfig
from gptoss_jax.mxfp4 import BLOCK

# Peak dense bf16 FLOP/s and HBM bytes/s from the vendors' data sheets.
DEVICES = {
    "H100 SXM": (989e12, 3.35e12),
    "TPU v5p": (459e12, 2.76e12),
    "TPU v6e": (918e12, 1.64e12),
}
CPU_STAND_IN = "H100 SXM"
MX_BYTES_PER_VALUE = 0.5 + 1 / BLOCK  # a nibble plus one e8m0 scale per block


@dataclasses.dataclass(frozen=True)
class Case:
    """One kernel call: what it moves and computes, and how to run ours and the XLA path on a device."""

    kernel: str
    shape: str
    bytes: float
    flops: float
    run: Callable[[], kernel_runs.Thunks] | None = None  # builds inputs on the device, returns (ours, xla)

    def ideal_seconds(self, device: str) -> float:
        flops_per_s, bytes_per_s = DEVICES[device]
        return max(self.bytes / bytes_per_s, self.flops / flops_per_s)

    def bound(self, device: str) -> str:
        flops_per_s, bytes_per_s = DEVICES[device]
        return "memory" if self.bytes / bytes_per_s >= self.flops / flops_per_s else "compute"


def moe_case(config: GptOssConfig, tokens: int, label: str) -> Case:
    """One layer's experts: mlp1 (+ SwiGLU) then mlp2 (+ routing weight), weights read packed once per expert."""
    H, F, I = config.hidden_size, 2 * config.intermediate_size, config.intermediate_size
    K, experts = config.experts_per_token, roofline.experts_touched(config, tokens)
    rows, total_bytes, flops = tokens * K, 0.0, 0.0
    for n_out, n_in, n_act in ((F, H, F // 2), (H, I, H)):
        total_bytes += experts * (n_out * n_in * MX_BYTES_PER_VALUE + 2 * n_out) + 2 * rows * (n_in + n_act)
        flops += 2 * rows * n_out * n_in
    return Case("grouped mxfp4 experts", f"{label}: {rows} rows, {experts:.1f} experts", total_bytes, flops,
                functools.partial(kernel_runs.experts, config, tokens))


def dequant_case(config: GptOssConfig) -> Case:
    E, H, F = config.num_experts, config.hidden_size, 2 * config.intermediate_size
    values = E * F * H
    return Case("mxfp4 dequant -> bf16", f"one layer's mlp1, {E}x{F}x{H}", values * (MX_BYTES_PER_VALUE + 2), values,
                functools.partial(kernel_runs.dequant, config))


def decode_attention_cases(config: GptOssConfig, batch: int) -> list[Case]:
    Q, N, D, W = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.sliding_window
    cases = []
    for label, keys, window in (("ring", W + 1, W), ("full 4k", 4096, None), ("full 128k", 131072, None)):
        kv_bytes = batch * keys * N * D * 2 * 2
        cases.append(Case("decode attention (split-K)", f"{label}, batch {batch}", kv_bytes + batch * Q * D * 4,
                          4 * batch * Q * keys * D, functools.partial(kernel_runs.decode, config, batch, keys, window)))
    return cases


def prefill_attention_cases(config: GptOssConfig, tokens: int) -> list[Case]:
    Q, N, D, W = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.sliding_window
    io_bytes = tokens * (2 * Q + 2 * N) * D * 2
    causal_pairs = tokens * (tokens + 1) / 2
    band_pairs = sum(min(t + 1, W) for t in range(tokens))
    cases = []
    for label, pairs, window in (("causal", causal_pairs, None), (f"band {W}", band_pairs, W)):
        forward = 4 * pairs * Q * D
        run = functools.partial(kernel_runs.prefill, config, tokens, window)
        cases.append(Case("flash attention fwd", f"{label}, {tokens} tokens", io_bytes, forward, functools.partial(run, False)))
        # the backward pass recomputes the logits and runs four matmuls: ~2.5x the forward FLOPs (timed with it)
        cases.append(Case("flash attention fwd+bwd", f"{label}, {tokens} tokens", 3 * io_bytes, 3.5 * forward,
                          functools.partial(run, True)))
    return cases


def step_cases(config: GptOssConfig) -> list[Case]:
    """Whole model steps: decode (batch 1 and 64, 4k context) and a 4096-token prefill."""
    H, Q, N, D, V, L = (config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                        config.head_dim, config.vocab_size, config.num_hidden_layers)
    F, I, E, W = 2 * config.intermediate_size, config.intermediate_size, config.num_experts, config.sliding_window
    attention_params = H * (Q + 2 * N) * D + Q * D * H  # the four projections
    expert_params = F * H + H * I
    model = roofline.abstract_model(config, "mxfp4")
    cases = []
    for batch, context in ((1, 4096), (64, 4096)):
        kv_positions = L // 2 * context + (L + 1) // 2 * W
        flops = 2 * batch * (L * (attention_params + config.experts_per_token * expert_params) + V * H)
        flops += 4 * batch * Q * D * kv_positions
        cases.append(Case("model decode step", f"batch {batch}, context {context}",
                          roofline.decode_bytes_per_step(model, batch, context), flops))
    tokens = 4096
    weights = roofline.weight_bytes_read(model, tokens) + roofline.cache_bytes(model, 1, tokens)
    pairs = L // 2 * tokens * (tokens + 1) / 2 + (L + 1) // 2 * sum(min(t + 1, W) for t in range(tokens))
    flops = 2 * tokens * L * (attention_params + config.experts_per_token * expert_params) + 2 * V * H
    cases.append(Case("model prefill", f"{tokens} tokens (logits of the last)", weights, flops + 4 * pairs * Q * D))
    return cases


def all_cases(config: GptOssConfig) -> list[Case]:
    return [
        moe_case(config, 1, "decode b1"), moe_case(config, 64, "decode b64"),
        moe_case(config, 4096, "prefill 4096"), dequant_case(config),
        *decode_attention_cases(config, 1), *decode_attention_cases(config, 64),
        *prefill_attention_cases(config, 4096), *step_cases(config),
    ]


def median_seconds(thunk: Callable[[], jax.Array], runs: int = 20) -> float:
    jax.block_until_ready(thunk())  # compile
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(thunk())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def device_name() -> str | None:
    """The roofline entry for the default device, or None on CPU."""
    if jax.default_backend() == "cpu":
        return None
    kind = jax.devices()[0].device_kind
    for name in DEVICES:
        if all(word.lower() in kind.lower() for word in name.split()[:2]):
            return name
    sys.exit(f"no roofline figures for device {kind!r}; add its peak FLOP/s and bytes/s to DEVICES")


def rows_for(cases: list[Case], device: str, measure: bool) -> list[dict]:
    rows = []
    for case in cases:
        row = dict(kernel=case.kernel, shape=case.shape, bytes=case.bytes, flops=case.flops,
                   bound=case.bound(device), ideal_us=case.ideal_seconds(device) * 1e6)
        if measure and case.run is not None:
            for who, thunk in zip(("ours", "xla"), case.run()):
                seconds = median_seconds(thunk)
                row[f"{who}_us"] = seconds * 1e6
                row[f"{who}_GBps"] = case.bytes / seconds / 1e9
                row[f"{who}_TFLOPps"] = case.flops / seconds / 1e12
        rows.append(row)
    return rows


def print_table(rows: list[dict], device: str, measured: bool) -> None:
    header = f"{'kernel':28} {'shape':52} {'MB':>9} {'GFLOP':>9} {'bound':>7} {'ideal us':>9}"
    if measured:
        header += f" {'ours us':>9} {'GB/s':>7} {'TFLOP/s':>8} {'xla us':>9}"
    print(f"roofline: {device} ({DEVICES[device][1] / 1e12:.2f} TB/s, {DEVICES[device][0] / 1e12:.0f} TFLOP/s bf16)")
    print(header)
    for r in rows:
        line = (f"{r['kernel']:28} {r['shape']:52} {r['bytes'] / 1e6:9.1f} {r['flops'] / 1e9:9.2f} "
                f"{r['bound']:>7} {r['ideal_us']:9.1f}")
        if measured:
            line += (f" {r.get('ours_us', np.nan):9.1f} {r.get('ours_GBps', np.nan):7.0f} "
                     f"{r.get('ours_TFLOPps', np.nan):8.1f} {r.get('xla_us', np.nan):9.1f}")
        print(line)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", action="append", choices=["gpt-oss-20b", "gpt-oss-120b"],
                        help="model shapes to use (repeatable; default both)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    device = device_name()
    measured = device is not None
    if not measured:
        print("No GPU or TPU here: Pallas kernels run only interpreted on CPU, so nothing is timed.\n"
              f"Below is what the kernels should reach on an {CPU_STAND_IN} (the roofline).\n")
        device = CPU_STAND_IN
    report = {}
    for preset in args.preset or ["gpt-oss-20b", "gpt-oss-120b"]:
        print(f"== {preset}")
        rows = rows_for(all_cases(GptOssConfig.from_preset(preset)), device, measured)
        print_table(rows, device, measured)
        print()
        report[preset] = dict(device=device, measured=measured, rows=rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()

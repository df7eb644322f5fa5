"""The tables `decode.py` prints: every metric for ours and a peer, with ratio and target; the decode roofline.

An engine's result is the dict its process printed (see `workload.measure`) plus `peak_rss_bytes`
and `wall_s`; a command peer has only the last two, and llama.cpp only speeds of batch-1 cases and
peak RSS, so their other cells stay empty.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import roofline
from gptoss_jax import GptOss

GIB = 2**30
Case = tuple[int, int]  # (prompt length, batch)


@dataclasses.dataclass(frozen=True)
class Metric:
    name: str
    figure: Callable[[dict], float | None]  # engine result -> number, None where the engine has none
    higher_is_better: bool
    target: float | None = None


def find_case(result: dict | None, case: Case) -> dict | None:
    return next((c for c in (result or {}).get("cases", []) if (c["prompt"], c["batch"]) == case), None)


def _per_case(case: Case, key: str, scale: float = 1.0) -> Callable[[dict], float | None]:
    return lambda result: None if (found := find_case(result, case)) is None or found.get(key) is None else found[key] / scale


def _field(key: str, scale: float = 1.0) -> Callable[[dict], float | None]:
    return lambda result: None if result.get(key) is None else result[key] / scale


def metrics(cases: list[Case]) -> list[Metric]:
    first = cases[0]
    named = lambda case: f"prompt {case[0]} batch {case[1]}"  # noqa: E731
    return [
        Metric("load time (s)", _field("load_s"), False),
        Metric("time to first token, fresh process (s)", _field("ttft_s"), False, 60),
        Metric(f"compile prefill, {named(first)} (s)", _per_case(first, "prefill_compile_s"), False),
        Metric(f"compile decode step, {named(first)} (s)", _per_case(first, "decode_compile_s"), False),
        *[Metric(f"prefill tok/s, {named(c)}", _per_case(c, "prefill_tokens_per_s"), True, 50) for c in cases],
        # summed over the batch; the target is a single stream's speed
        *[Metric(f"decode tok/s, {named(c)}", _per_case(c, "decode_tokens_per_s"), True, 3 if c[1] == 1 else None) for c in cases],
        *[Metric(f"KV cache GiB, {named(c)}", _per_case(c, "cache_bytes", GIB), False) for c in cases],
        Metric("parameters GiB", _field("param_bytes", GIB), False),
        Metric("peak RSS GiB", _field("peak_rss_bytes", GIB), False, 16),
        Metric("wall time of the process (s)", _field("wall_s"), False),
    ]


def table(ours: dict, peer: dict | None, cases: list[Case]) -> list[dict]:
    """One row per metric; ratio > 1 means ours is better (faster, or smaller)."""
    rows = []
    for metric in metrics(cases):
        mine, theirs = metric.figure(ours), metric.figure(peer) if peer else None
        ratio = None
        if mine and theirs:  # no ratio against a zero
            ratio = mine / theirs if metric.higher_is_better else theirs / mine
        met, target = None, None
        if metric.target is not None:
            target = f"{'>=' if metric.higher_is_better else '<='} {metric.target:g}"
            met = None if mine is None else mine >= metric.target if metric.higher_is_better else mine <= metric.target
        rows.append({"metric": metric.name, "ours": mine, "peer": theirs, "ratio": ratio, "higher_is_better": metric.higher_is_better,
                     "target": target, "met": met})
    return rows


def roofline_rows(model: GptOss, bandwidth: float, ours: dict, peer: dict | None) -> list[dict]:
    """Per case: bytes a decode step reads, the tokens/s that bandwidth allows, and each engine's fraction of it."""
    rows = []
    for case in ours["cases"]:
        context = case["prompt"] + case["new_tokens"] // 2  # the mean context over the decode
        step_bytes = roofline.decode_bytes_per_step(model, case["batch"], context)
        ceiling = case["batch"] * bandwidth / step_bytes
        theirs = find_case(peer, (case["prompt"], case["batch"]))
        rows.append({"prompt": case["prompt"], "batch": case["batch"], "bytes_per_step": step_bytes, "ceiling_tokens_per_s": ceiling,
                     "ours_fraction": case["decode_tokens_per_s"] / ceiling,
                     "peer_fraction": theirs["decode_tokens_per_s"] / ceiling if theirs else None})
    return rows


def _cell(value, percent: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if percent:
        return f"{value:.1%}"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _print_aligned(header: list[str], lines: list[list[str]]) -> None:
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]
    for line in [header, ["-" * w for w in widths], *lines]:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))))


def print_table(rows: list[dict], peer_name: str) -> None:
    _print_aligned(["metric", "ours", peer_name, "ratio", "ratio>=1", "target", "met"], [
        [r["metric"], _cell(r["ours"]), _cell(r["peer"]), _cell(r["ratio"]), _cell(None if r["ratio"] is None else r["ratio"] >= 1),
         r["target"] or "-", _cell(r["met"])] for r in rows
    ])


def print_roofline(bandwidth: float, copy_bandwidth: float, rows: list[dict], peer_name: str) -> None:
    print(f"\ndecode roofline: read bandwidth {bandwidth / 1e9:.1f} GB/s (copy {copy_bandwidth / 1e9:.1f}); a step reads the active experts (packed), "
          "attention, router and unembedding (bf16) and the KV cache")
    _print_aligned(["prompt", "batch", "MB/step", "ceiling tok/s", "ours", peer_name], [
        [str(r["prompt"]), str(r["batch"]), f"{r['bytes_per_step'] / 1e6:.1f}", _cell(r["ceiling_tokens_per_s"]),
         _cell(r["ours_fraction"], True), _cell(r["peer_fraction"], True)] for r in rows
    ])

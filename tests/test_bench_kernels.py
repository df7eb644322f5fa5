"""bench/kernel_speed.py times pairs of (kernel, XLA path); on CPU both run (kernels interpreted) and must agree.

Small shapes; float32 parameters are not involved (the pairs use bf16 inputs as on a device), so the
bound is bf16's: outputs agree to 2^-6 of their largest magnitude (both paths accumulate in float32
and round once or twice to bf16).
"""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))

import kernel_runs  # noqa: E402
import kernel_speed as bench_kernels  # noqa: E402

from gptoss_jax import GptOssConfig  # noqa: E402

CONFIG = GptOssConfig.tiny()
PAIRS = {
    "experts decode": lambda: kernel_runs.experts(CONFIG, 2),
    "experts prefill": lambda: kernel_runs.experts(CONFIG, 24),
    "dequant": lambda: kernel_runs.dequant(CONFIG),
    "decode full": lambda: kernel_runs.decode(CONFIG, 2, 40, None),
    "decode ring": lambda: kernel_runs.decode(CONFIG, 1, CONFIG.sliding_window + 1, CONFIG.sliding_window),
    "prefill band": lambda: kernel_runs.prefill(CONFIG, 40, CONFIG.sliding_window, backward=False),
    "prefill causal grads": lambda: kernel_runs.prefill(CONFIG, 24, None, backward=True),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PAIRS))
def test_kernel_and_xla_path_agree(name):
    ours, xla = PAIRS[name]()
    for got, expected in zip(jax.tree.leaves(ours()), jax.tree.leaves(xla()), strict=True):
        got, expected = got.astype(jnp.float32), expected.astype(jnp.float32)
        assert float(jnp.abs(got - expected).max()) <= 2**-6 * float(jnp.abs(expected).max())


def test_cpu_prints_the_h100_roofline(tmp_path, capsys):
    bench_kernels.main(["--preset", "gpt-oss-20b", "--json", str(tmp_path / "k.json")])
    assert "nothing is timed" in capsys.readouterr().out
    rows = json.loads((tmp_path / "k.json").read_text())["gpt-oss-20b"]["rows"]
    step = next(r for r in rows if r["kernel"] == "model decode step" and "batch 1," in r["shape"])
    # batch-1 decode reads ~3.7 GB of weights (KERNELS.md section 9) plus a 4k cache: memory-bound on H100
    assert step["bound"] == "memory" and 3.7e9 < step["bytes"] < 3.9e9

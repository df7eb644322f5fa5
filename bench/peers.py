"""Running an engine or any command in its own process, and whether transformers can hold a model."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from flax import nnx

from gptoss_jax import GptOssConfig
from roofline import abstract_model

LAUNCH = Path(__file__).parent / "launch.py"
HF_HEADROOM = 1.7  # transformers' peak RSS over its bf16 parameters (measured 6.3 GiB over 3.7 on 1 layer of 20b)


@dataclasses.dataclass(frozen=True)
class Finished:
    wall_s: float
    peak_rss_bytes: int
    returncode: int
    stdout: str


def run(argv: list[str]) -> Finished:
    """Runs `argv` to completion through `launch.py` (for a peak RSS of its own); stderr passes through."""
    with tempfile.TemporaryDirectory() as scratch:
        figures = Path(scratch) / "figures.json"
        stdout = subprocess.run([sys.executable, str(LAUNCH), str(figures), *argv], stdout=subprocess.PIPE, text=True).stdout
        return Finished(stdout=stdout, **json.loads(figures.read_text()))


def hf_bf16_bytes(config: GptOssConfig) -> int:
    """Parameter bytes of transformers' model with the experts decoded to bf16."""
    total = 0
    for path, variable in nnx.to_flat_state(nnx.state(abstract_model(config, "mxfp4"))):
        value, name = variable.get_value(), str(path[-1])
        if name.endswith("_blocks"):
            total += value.size * 2 * 2  # two 4-bit values per byte, each becomes 2 bytes
        elif not name.endswith("_scales"):
            total += value.size * 2
    return total


def available_memory() -> int:
    """MemAvailable of /proc/meminfo (what can be allocated without swapping)."""
    with open("/proc/meminfo") as meminfo:
        fields = dict(line.split(":", 1) for line in meminfo)
    return int(fields["MemAvailable"].split()[0]) * 1024


def hf_problem(config: GptOssConfig) -> str | None:
    """Why transformers cannot run `config` on this machine (its bf16 weights do not fit), or None."""
    need, available = HF_HEADROOM * hf_bf16_bytes(config), available_memory()
    if need <= available:
        return None
    one = HF_HEADROOM * hf_bf16_bytes(dataclasses.replace(config, num_hidden_layers=1))
    per_layer = HF_HEADROOM * hf_bf16_bytes(dataclasses.replace(config, num_hidden_layers=2)) - one
    fits = int((available - one) // per_layer) + 1 if available >= one else 0
    return (f"transformers needs about {need / 2**30:.1f} GiB for {config.num_hidden_layers} layers in bf16, "
            f"{available / 2**30:.1f} GiB are available; " + (f"--layers {fits} fits" if fits else "no depth fits"))

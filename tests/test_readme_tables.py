"""README.md's "Does it fit?" tables are what `bench/memory.py --markdown` and `bench/train_memory.py
--markdown` print, not figures typed in.

The whole script compiles six decode steps of the full presets on 8 forced CPU devices (about
3.5 minutes on 2 busy cores), so the default suite measures one row in-process (one compile, about
20 s) and checks that the table has one row per scenario; the slow step regenerates the whole table.
To update the README: `XLA_FLAGS=--xla_force_host_platform_device_count=8 python bench/memory.py --markdown`.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # the bench scripts import their siblings as top-level modules

import memory  # noqa: E402
import train_memory  # noqa: E402

from gptoss_jax import kernels  # noqa: E402

README = ROOT / "README.md"


def _fit_table(header: str = memory.MARKDOWN_HEADER) -> list[str]:
    """The README's table under `header`: its header line and every table line under it."""
    lines = README.read_text().splitlines()
    start = lines.index(header.splitlines()[0])
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


def test_fit_table_has_a_row_per_scenario_and_its_first_row_is_measured():
    # The figures are those of the decode step as it compiles here, with the C++ kernels serving the
    # one-token projections (without them XLA:CPU's temp grows by its float32 copy of the unembedding).
    assert kernels.cpu_kernels()  # CI installs with the C++ kernels built
    table = _fit_table()
    assert table[:2] == memory.MARKDOWN_HEADER.splitlines()
    assert len(table) == 2 + len(memory.SCENARIOS) * len(memory.CONTEXTS)
    (row,) = memory.rows(memory.SCENARIOS[:1], memory.CONTEXTS[:1])
    assert table[2] == memory.markdown_row(row), "regenerate the table: see this file's docstring"


@pytest.mark.slow  # six compiles of the full presets: ~3.5 minutes on 2 cores
def test_fit_table_is_what_memory_py_prints():
    env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"}
    command = [sys.executable, str(ROOT / "bench" / "memory.py"), "--markdown"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=1800, env=env)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "\n".join(_fit_table()) == finished.stdout.strip()


@pytest.mark.slow  # five compiles of full-depth training steps: ~15 minutes on 2 cores
def test_training_table_is_what_train_memory_py_prints():
    env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"}
    command = [sys.executable, str(ROOT / "bench" / "train_memory.py"), "--markdown"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=3600, env=env)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "\n".join(_fit_table(train_memory.MARKDOWN_HEADER)) == finished.stdout.strip()


def test_training_table_has_a_row_per_scenario():
    table = _fit_table(train_memory.MARKDOWN_HEADER)
    assert table[:2] == train_memory.MARKDOWN_HEADER.splitlines()
    assert [row.split(" | ")[:5] for row in table[2:]] == [
        ["| " + preset, training, str(sizes), meaning, str(tokens)] for preset, training, sizes, tokens, meaning in train_memory.SCENARIOS
    ]

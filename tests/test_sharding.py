"""The model on any (data, expert, model) mesh of 8 forced CPU devices equals one device.

Runs in its own process (tests/sharded_check.py) because the device count is fixed when jax starts.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, str(HERE / "sharded_check.py"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=900, env={**os.environ, **(env or {})})


def test_meshes_match_one_device(tmp_path):
    result = _run("meshes", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    # float32 everywhere: sharding changes only the order of the sums (all-reduce, all-to-all).
    for mesh, figures in report["meshes"].items():
        assert figures["prefill_error"] < 1e-5, mesh
        assert figures["decode_error"] < 1e-5, mesh
        assert figures["greedy_equal"], mesh
        assert figures["expert_shard_rows"] == report["num_experts"] // figures["expert_axis"], mesh
    assert report["restored_equal"] and report["restored_expert_shard_rows"] == report["num_experts"] // 4


def test_two_processes_match_one(tmp_path):
    port = 23456 + os.getpid() % 1000
    processes = [
        subprocess.Popen(
            [sys.executable, str(HERE / "sharded_check.py"), "multihost", str(tmp_path)],
            env={**os.environ, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
                 "JAX_PROCESS_ID": str(i)},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=900) for p in processes]
    assert all(p.returncode == 0 for p in processes), [o[1][-2000:] for o in outputs]
    report = json.loads((tmp_path / "multihost.json").read_text())
    assert report["processes"] == 2 and report["devices"] == 8
    assert report["error"] < 1e-5


@pytest.mark.parametrize(
    "sizes, message",
    [("3,1,1", "needs 3 devices"), ("1,3,1,3", "num_experts=8 is not divisible"), ("1,1,8", "num_key_value_heads"), ("2,2,1", "needs 4 devices")],
)
def test_bad_meshes_are_clear_errors_before_compiling(sizes, message):
    result = _run("bad-mesh", sizes)
    assert result.returncode == 0 and message in result.stdout, result.stdout + result.stderr[-2000:]

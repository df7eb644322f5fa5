"""The model on any (data, expert, model) mesh of 8 forced CPU devices equals one device.

Runs in its own process (tests/sharded_check.py) because the device count is fixed when jax starts.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def _run(*args: str, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    command = [sys.executable, str(HERE / "sharded_check.py"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.slow  # 5 meshes, each compiling prefill, decode and the sampler: ~15 minutes on 2 cores
def test_meshes_match_one_device(tmp_path):
    result = _run("meshes", str(tmp_path), timeout=3600)  # ~20-30 minutes on 2 busy cores
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    # float32 everywhere: sharding changes only the order of the sums (all-reduce, all-to-all).
    for mesh, figures in report["meshes"].items():
        assert figures["prefill_error"] < 1e-5, mesh
        assert figures["decode_error"] < 1e-5, mesh
        assert figures["greedy_equal"], mesh
        assert figures["expert_shard_rows"] == report["num_experts"] // figures["expert_axis"], mesh
    assert report["restored_equal"] and report["restored_expert_shard_rows"] == report["num_experts"] // 4


def run_processes(count: int, args: list[str], logs: Path, timeout: float = 900, script: str = "sharded_check.py") -> list[tuple[int, str]]:
    """`count` processes of `script` (beside this file) in one jax.distributed job: (exit code, stderr) of each.

    A failure in one ends them all: when one exits non-zero (or the time is up) the others are killed,
    since they would otherwise wait for it in a collective or barrier.
    """
    port = 23456 + os.getpid() % 1000
    processes, stderrs = [], []
    for i in range(count):
        stderrs.append(logs / f"stderr-{i}.txt")
        # conftest's persistent compilation cache is inherited: `sharding.initialize_distributed` must turn
        # it off (processes that load a program from it hang in their first gloo collective, jax 0.12 on CPU).
        env = {**os.environ, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(count),
               "JAX_PROCESS_ID": str(i)}
        with stderrs[-1].open("w") as stderr:
            processes.append(subprocess.Popen([sys.executable, str(HERE / script), *args], env=env,
                                              stdout=subprocess.DEVNULL, stderr=stderr))
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in processes):
            if any(p.poll() not in (None, 0) for p in processes) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
            p.wait()
    return [(p.returncode, path.read_text()) for p, path in zip(processes, stderrs)]


def test_two_processes_match_one(tmp_path):
    saved = _run("save", str(tmp_path))  # the checkpoint and the logits of one process
    assert saved.returncode == 0, saved.stderr[-3000:]
    logs = tmp_path / "logs"
    logs.mkdir()
    results = run_processes(2, ["multihost", str(tmp_path)], logs)
    assert all(code == 0 for code, _ in results), [(code, stderr[-2000:]) for code, stderr in results]
    assert all("persistent compilation cache is off" in stderr for _, stderr in results)  # twice in a row, it would hang
    reports = [json.loads((tmp_path / f"multihost-{i}.json").read_text()) for i in range(2)]
    for report in reports:
        assert report["processes"] == 2 and report["devices"] == 8 and report["local_devices"] == 4
        assert report["experts"]
        for name, figures in report["experts"].items():  # 8 experts over 8 devices: one per device
            assert figures == {"on_own_devices": True, "shards": 4, "rows": [1]}, name
        # float32 both ways: sharding over the experts only reorders sums (the all-to-all and the
        # combine), a few ulps of logits of size ~1.
        assert report["error"] < 1e-5
    # Expert rows are stored 3 to a chunk; process 0 holds experts 0-3, process 1 experts 4-7, and
    # each reads only the chunks with its rows (chunk 1, experts 3-5, by both).
    assert [r["reads"]["sliding_blocks/mlp/mlp1_blocks/0"] for r in reports] == [["0", "1"], ["1", "2"]]


def test_loads_rows_spanning_stored_chunks(tmp_path):
    """A device's rows copied out of several stored chunks (each freed once every shard has its rows),
    on one device and on an expert mesh whose shards share a chunk: bit-identical to the saved model."""
    result = _run("restore", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "restore.json").read_text())
    assert report == {"one device": {"equal": True, "expert_shard_rows": 8}, "(1, 2, 1)": {"equal": True, "expert_shard_rows": 4}}


@pytest.mark.parametrize(
    "sizes, message",
    [("3,1,1", "needs 3 devices"), ("1,3,1,3", "num_experts=8 is not divisible"), ("1,1,8", "num_key_value_heads"), ("2,2,1", "needs 4 devices")],
)
def test_bad_meshes_are_clear_errors_before_compiling(sizes, message):
    result = _run("bad-mesh", sizes)
    assert result.returncode == 0 and message in result.stdout, result.stdout + result.stderr[-2000:]


def test_optimizer_state_splits_over_data_where_it_can():
    """ZeRO-1's placement: the first whole dimension the data size divides takes the data axis."""
    from jax.sharding import AbstractMesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from gptoss_jax import sharding

    mesh = AbstractMesh((2, 2, 1), sharding.AXES)
    cases = [
        (P(None, "expert", None), (3, 4, 6), P(None, "expert", "data")),  # layers 3 and experts taken: the last
        (P(None, "expert", None), (3, 4, 5), P(None, "expert", None)),  # nothing even is left whole
        (P(), (), P()),  # Adam's step count
        (P("data"), (4,), P("data")),  # already split over data
    ]
    for spec, shape, expected in cases:
        assert sharding.over_data(NamedSharding(mesh, spec), shape).spec == expected
    one = AbstractMesh((1, 2, 1), sharding.AXES)
    assert sharding.over_data(NamedSharding(one, P(None, None)), (4, 4)).spec == P(None, None)

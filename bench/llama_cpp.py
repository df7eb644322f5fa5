"""llama.cpp as `decode.py`'s peer: its own `llama-bench` on the same weights, in the same run.

`llama-bench` is built once from the llama.cpp that the `llama-cpp-python` sdist on PyPI vendors (cmake
and a C++ compiler; cached under the work dir), for this machine's CPU (`GGML_NATIVE`). The weights are
the converted checkpoint written as GGUF by `convert.gguf` (tests/test_export_gguf.py holds it byte-equal
to what llama.cpp's own `convert_hf_to_gguf.py` writes from the Hugging Face export): MXFP4 experts,
the rest bf16, as llama.cpp runs the published gpt-oss GGUFs.

llama-bench runs one sequence, so it fills the batch-1 cases: prefill tok/s of each prompt length
(`-p P -n 0`) and decode tok/s after it (`-p 0 -n N -d P`), on all cores, medians of `--repeats`.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

import peers

VERSION = "0.3.36"  # llama-cpp-python; its sdist vendors llama.cpp 0c1e5709 (as tests/test_export_gguf.py)
CMAKE_OPTIONS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF",
                 "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"]


def _run(command: list[str], what: str, **options) -> None:
    result = subprocess.run(command, capture_output=True, text=True, **options)
    if result.returncode:
        raise RuntimeError(f"{what} failed ({' '.join(command[:3])} ...):\n{result.stderr[-1500:]}")


def llama_bench(work_dir: Path) -> Path:
    """The `llama-bench` binary, built on first use (~10 minutes on 2 cores) and kept in `work_dir`."""
    root = work_dir / f"llama.cpp-{VERSION}"
    binary = root / "build" / "bin" / "llama-bench"
    if binary.is_file():
        return binary
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"building llama.cpp needs {tool} on PATH")
    if not (root / "CMakeLists.txt").is_file():
        print(f"downloading the llama-cpp-python {VERSION} sdist (it vendors llama.cpp)", file=sys.stderr, flush=True)
        download = work_dir / "sdist"
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python", "-d", str(download),
              f"llama-cpp-python=={VERSION}"], "pip download")
        prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
        staging = work_dir / f".llama.cpp-{VERSION}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        with tarfile.open(download / f"llama_cpp_python-{VERSION}.tar.gz") as sdist:
            members = [m for m in sdist.getmembers() if m.name.startswith(prefix)]
            for member in members:
                member.name = member.name.removeprefix(prefix)
            sdist.extractall(staging, members=[m for m in members if m.name], filter="data")
        shutil.rmtree(root, ignore_errors=True)
        staging.rename(root)
    print(f"building llama-bench in {root / 'build'}", file=sys.stderr, flush=True)
    _run(["cmake", "-S", str(root), "-B", str(root / "build"), *CMAKE_OPTIONS], "cmake configure")
    _run(["cmake", "--build", str(root / "build"), "--target", "llama-bench", f"-j{os.cpu_count()}"], "cmake build")
    return binary


def gguf_file(checkpoint: Path) -> Path:
    """`checkpoint` as a .gguf beside it (written once)."""
    import gptoss_jax
    from convert import gguf

    target = checkpoint.with_name(checkpoint.name + ".gguf")
    if not target.is_file():
        print(f"writing {target} for llama.cpp", file=sys.stderr, flush=True)
        gguf.save(gptoss_jax.load(checkpoint), target)
    return target


def _tests(binary: Path, model: Path, options: list[str]) -> tuple[list[dict], int]:
    """llama-bench's JSON records for `options`, and the peak RSS of its process."""
    finished = peers.run([str(binary), "-m", str(model), "-t", str(os.cpu_count()), "-o", "json", *options])
    if finished.returncode:
        raise RuntimeError(f"llama-bench exited with code {finished.returncode}")
    return json.loads(finished.stdout), finished.peak_rss_bytes


def run(work_dir: Path, checkpoint: Path, spec: dict) -> dict:
    """llama.cpp's figures in `workload.measure`'s shape: batch-1 cases, plus peak RSS and wall time."""
    binary, model = llama_bench(work_dir), gguf_file(checkpoint)
    prompts, repeats = ",".join(map(str, spec["prompts"])), str(spec["repeats"])
    prefill, rss_prefill = _tests(binary, model, ["-p", prompts, "-n", "0", "-r", repeats])
    decode, rss_decode = _tests(binary, model, ["-p", "0", "-n", str(spec["new_tokens"]), "-d", prompts, "-r", repeats])
    speed = lambda records, key, length: statistics.median(r["avg_ts"] for r in records if r[key] == length)  # noqa: E731
    cases = [{"prompt": p, "batch": 1, "new_tokens": spec["new_tokens"], "prefill_tokens_per_s": speed(prefill, "n_prompt", p),
              "decode_tokens_per_s": speed(decode, "n_depth", p)} for p in spec["prompts"]]
    return {"cases": cases, "peak_rss_bytes": max(rss_prefill, rss_decode), "build": str(binary), "gguf": str(model)}

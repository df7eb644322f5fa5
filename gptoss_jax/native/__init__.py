"""C++ matrix-vector kernels for one-token decode on CPU, called from jitted code through XLA's FFI.

XLA:CPU decodes packed MXFP4 at about 0.5 GB/s in every formulation we measured, and runs a bf16
matrix-vector product at 2-10 GB/s, far below memory bandwidth, so one-token decode of gpt-oss was
bound by arithmetic, not bytes. `matvec.cc` reads each weight byte once and converts it in registers.
It is compiled on first use with the machine's C++ compiler (a few seconds, cached under
`~/.cache/gptoss-jax/native/`), so installing the package needs no compiler; without one `available()`
is False and the XLA formulations serve. `gptoss_jax.kernels` decides where these run.

The instruction set is `GPTOSS_JAX_CPU_LEVEL` (`LEVELS`): by default all this CPU has (`-march=native`:
AVX-512 where present, else AVX2, and aarch64's own on ARM); `avx2` or `portable` build the lower
paths instead, to test them or to run on another machine.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

SOURCE = Path(__file__).with_name("matvec.cc")
TARGETS = {"gptoss_mxfp4_matvec": "GptossMxfp4Matvec", "gptoss_bf16_matvec": "GptossBf16Matvec"}  # XLA name: symbol
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-pthread")
LEVELS = {"native": ("-march=native",), "avx2": ("-mavx2", "-mfma"), "portable": ()}  # GPTOSS_JAX_CPU_LEVEL: flags


def _cache_dir() -> Path:
    return Path(os.environ.get("GPTOSS_JAX_CACHE", Path.home() / ".cache" / "gptoss-jax")) / "native"


def _cpu_flags() -> str:
    """The CPU's feature flags: `-march=native` builds for them, so the cache key includes them."""
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.processor()


def level_flags() -> tuple[str, ...]:
    """The compiler flags of the `GPTOSS_JAX_CPU_LEVEL` asked for (default `native`)."""
    level = os.environ.get("GPTOSS_JAX_CPU_LEVEL", "native")
    if level not in LEVELS:
        raise ValueError(f"GPTOSS_JAX_CPU_LEVEL must be one of {', '.join(LEVELS)}, got {level!r}")
    return LEVELS[level]


def _build() -> Path:
    """Compiles the kernel once per (source, jaxlib, flags, CPU) into the cache; atomic, so concurrent
    processes never load a half-written library."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (set CXX or install g++)")
    source, flags = SOURCE.read_bytes(), (*FLAGS, *level_flags())
    key = hashlib.sha256(b"\0".join([source, jax.lib.__version__.encode(), " ".join(flags).encode(), _cpu_flags().encode()]))
    library = _cache_dir() / f"matvec-{key.hexdigest()[:16]}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
        partial = Path(scratch) / library.name
        command = [compiler, *flags, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", str(partial)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if result.returncode:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
        os.replace(partial, library)
    return library


@functools.cache
def available() -> bool:
    """True once the kernels are compiled, loaded and registered with XLA for the CPU."""
    try:
        library = ctypes.cdll.LoadLibrary(str(_build()))
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as error:
        warnings.warn(f"gptoss_jax: native CPU kernel unavailable, using XLA paths ({error})", stacklevel=2)
        return False
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    return True


def _require() -> None:
    if not available():
        raise RuntimeError("the native CPU kernels are unavailable (see the warning above); use an XLA implementation")


def mxfp4_matvec(
    x_PC: jax.Array, blocks: jax.Array, scales: jax.Array, expert_P: jax.Array, layer: jax.Array | int = 0
) -> jax.Array:
    """`y[p] = W[layer, expert[p]] @ x[p]` in float32 (CPU only; see `available`), W packed: blocks
    `[L, E, R, C/32, 16]` and scales `[L, E, R, C/32]` (`stacked.parts` gives a lone layer an `L` of 1).

    The kernel indexes the stack itself, so no expert or layer is ever sliced out (XLA would copy the
    slice). Out-of-range indices are an error, not a read past the stack.
    """
    _require()
    if blocks.ndim != 5 or expert_P.ndim != 1:
        raise ValueError(f"need blocks [L, E, R, C/32, 16] and experts [P], got {blocks.shape} and {expert_P.shape}")
    L, E, R, J, _ = blocks.shape
    P = expert_P.shape[0]
    if x_PC.shape != (P, J * 32) or scales.shape != (L, E, R, J):
        raise ValueError(f"x {x_PC.shape}, blocks {blocks.shape}, scales {scales.shape} and experts {expert_P.shape} do not match")
    call = jax.ffi.ffi_call("gptoss_mxfp4_matvec", jax.ShapeDtypeStruct((P, R), jnp.float32))
    return call(x_PC.astype(jnp.float32), blocks, scales, jnp.asarray(layer, jnp.int32), expert_P.astype(jnp.int32))


def bf16_matvec(x_C: jax.Array, w: jax.Array, layer: jax.Array | int = 0) -> jax.Array:
    """`w[layer] @ x` in float32 for bfloat16 `w [L, R, C]` (CPU only; see `available`). As in
    `mxfp4_matvec`, the kernel indexes the stack itself."""
    _require()
    if w.ndim != 3 or w.dtype != jnp.bfloat16 or x_C.shape != w.shape[2:]:
        raise ValueError(f"need bfloat16 w [L, R, C] and x [C], got w {w.dtype} {w.shape} and x {x_C.shape}")
    call = jax.ffi.ffi_call("gptoss_bf16_matvec", jax.ShapeDtypeStruct(w.shape[1:2], jnp.float32))
    return call(x_C.astype(jnp.float32), w, jnp.asarray(layer, jnp.int32))

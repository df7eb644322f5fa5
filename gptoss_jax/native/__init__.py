"""C++ kernels for CPU (decode's matrix-vector products and attention to the cache, prefill's expert
products), called from jitted code through XLA's FFI.

XLA:CPU decodes packed MXFP4 at about 0.5 GB/s in every formulation we measured, and runs a bf16
matrix-vector product at 2-10 GB/s, far below memory bandwidth, so one-token decode of gpt-oss was
bound by arithmetic, not bytes. `matvec.cc` reads each weight byte once and converts it in registers;
`decode_attention.cc` reads each cached key and value once (XLA's small GEMMs read them at ~2 GB/s).
For prefill, XLA multiplies decoded bf16 experts at 100-200 GFLOP/s without AMX; `grouped_gemm.cc`
multiplies with AMX tiles from panels decoded in cache.
`pip install` compiles them (CMakeLists.txt), once per instruction-set level in `LEVELS`, into
`_matvec_<level>.so` beside this file; nothing is compiled at run time. Installed without a C++
compiler, `available()` is False and the XLA formulations serve. `gptoss_jax.kernels` decides where
these run.

The level is the best this CPU runs (`runnable_levels`), or `GPTOSS_JAX_CPU_LEVEL` to force a lower
one; each level's kernels register under names of their own, so tests run every level in one process.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

LEVELS = ("amx", "avx512", "avx2", "portable")  # best first; GptossCpuLevel's 3, 2, 1, 0
KERNELS = {  # XLA name: symbol
    "gptoss_mxfp4_matvec": "GptossMxfp4Matvec", "gptoss_bf16_matvec": "GptossBf16Matvec",
    "gptoss_decode_attention": "GptossDecodeAttention", "gptoss_mxfp4_grouped_gemm": "GptossMxfp4GroupedGemm",
    "gptoss_bf16_gemm": "GptossBf16Gemm",
}


def _library(level: str) -> Path | None:
    """`_matvec_<level>.so` as installed (importlib finds it in an editable install too), or None."""
    spec = importlib.util.find_spec(f"{__name__}._matvec_{level}")
    return None if spec is None or spec.origin is None else Path(spec.origin)


def built_levels() -> tuple[str, ...]:
    """The levels this installation has libraries of, best first."""
    return tuple(level for level in LEVELS if _library(level) is not None)


@functools.cache
def runnable_levels() -> tuple[str, ...]:
    """The built levels this CPU runs, best first (asked of the portable library, which any CPU runs)."""
    built = built_levels()
    if "portable" not in built:
        return ()
    best = ctypes.CDLL(str(_library("portable"))).GptossCpuLevel()
    return tuple(level for level in LEVELS[len(LEVELS) - 1 - best :] if level in built)


def level() -> str:
    """The level the kernels run at: `GPTOSS_JAX_CPU_LEVEL` if set, else the best this CPU runs."""
    runnable = runnable_levels()
    if not runnable:
        raise RuntimeError("gptoss_jax was installed without its C++ kernels (no C++ compiler at install time)")
    asked = os.environ.get("GPTOSS_JAX_CPU_LEVEL")
    if asked is None:
        return runnable[0]
    if asked not in LEVELS:
        raise ValueError(f"GPTOSS_JAX_CPU_LEVEL must be one of {', '.join(LEVELS)}, got {asked!r}")
    if asked not in runnable:
        raise ValueError(f"GPTOSS_JAX_CPU_LEVEL={asked}: this CPU and installation run {', '.join(runnable)}")
    return asked


@functools.cache
def _register(at: str) -> None:
    """Loads level `at`'s library and registers its kernels with XLA as `<name>_<at>`."""
    library = ctypes.CDLL(str(_library(at)))
    for name, symbol in KERNELS.items():
        jax.ffi.register_ffi_target(f"{name}_{at}", jax.ffi.pycapsule(getattr(library, f"{symbol}_{at}")), platform="cpu")


@functools.cache
def available() -> bool:
    """True where the kernels are installed and load; otherwise warns once and the XLA paths serve."""
    try:
        _register(level())
    except (OSError, RuntimeError) as error:
        warnings.warn(f"gptoss_jax: C++ CPU kernels unavailable, using XLA paths ({error})", stacklevel=2)
        return False
    return True


def _target(name: str, at: str | None) -> str:
    """The registered XLA name of kernel `name` at level `at` (default `level()`)."""
    at = at or level()
    if at not in runnable_levels():
        raise ValueError(f"level {at!r} is not one this CPU and installation run ({', '.join(runnable_levels())})")
    _register(at)
    return f"{name}_{at}"


def mxfp4_matvec(
    x_PC: jax.Array, blocks: jax.Array, scales: jax.Array, expert_P: jax.Array, layer: jax.Array | int = 0,
    *, at: str | None = None,
) -> jax.Array:
    """`y[p] = W[layer, expert[p]] @ x[p]` in float32 (CPU only; see `available`), W packed: blocks
    `[L, E, R, C/32, 16]` and scales `[L, E, R, C/32]` (`stacked.parts` gives a lone layer an `L` of 1).

    The kernel indexes the stack itself, so no expert or layer is ever sliced out (XLA would copy the
    slice). Out-of-range indices are an error, not a read past the stack. `at` picks a level (default
    `level()`).
    """
    if blocks.ndim != 5 or expert_P.ndim != 1:
        raise ValueError(f"need blocks [L, E, R, C/32, 16] and experts [P], got {blocks.shape} and {expert_P.shape}")
    L, E, R, J, _ = blocks.shape
    P = expert_P.shape[0]
    if x_PC.shape != (P, J * 32) or scales.shape != (L, E, R, J):
        raise ValueError(f"x {x_PC.shape}, blocks {blocks.shape}, scales {scales.shape} and experts {expert_P.shape} do not match")
    call = jax.ffi.ffi_call(_target("gptoss_mxfp4_matvec", at), jax.ShapeDtypeStruct((P, R), jnp.float32))
    return call(x_PC.astype(jnp.float32), blocks, scales, jnp.asarray(layer, jnp.int32), expert_P.astype(jnp.int32))


def mxfp4_grouped_gemm(
    x_PC: jax.Array, blocks: jax.Array, scales: jax.Array, counts_E: jax.Array, layer: jax.Array | int = 0,
    *, at: str | None = None,
) -> jax.Array:
    """`y[p] = W[layer, e] @ x[p]` in float32 for rows sorted by expert: expert e owns the `counts[e]`
    rows after those of experts before it; rows past them are zero. For prefill: each expert's packed
    matrix is decoded once per call, 32 rows at a time into a bfloat16 panel that stays in cache, and
    multiplied with AMX where the level is `amx` (scalar loops elsewhere: correct, not fast). W as in
    `mxfp4_matvec`; x is bfloat16, as AMX multiplies it."""
    if blocks.ndim != 5 or x_PC.dtype != jnp.bfloat16:
        raise ValueError(f"need blocks [L, E, R, C/32, 16] and bfloat16 x, got {blocks.shape} and {x_PC.dtype}")
    L, E, R, J, _ = blocks.shape
    if x_PC.shape[1:] != (J * 32,) or scales.shape != (L, E, R, J) or counts_E.shape != (E,):
        raise ValueError(f"x {x_PC.shape}, blocks {blocks.shape}, scales {scales.shape} and counts {counts_E.shape} do not match")
    call = jax.ffi.ffi_call(_target("gptoss_mxfp4_grouped_gemm", at), jax.ShapeDtypeStruct((x_PC.shape[0], R), jnp.float32))
    return call(x_PC, blocks, scales, jnp.asarray(layer, jnp.int32), counts_E.astype(jnp.int32))


def bf16_gemm(x_PC: jax.Array, w: jax.Array, layer: jax.Array | int = 0, *, at: str | None = None) -> jax.Array:
    """`x @ w[layer].T` in float32 for bfloat16 `x [P, C]` and `w [L, R, C]` (CPU only; see `available`):
    `mxfp4_grouped_gemm`'s tiles, one group, panels copied from `w`. For prefill's projections."""
    if w.ndim != 3 or w.dtype != jnp.bfloat16 or x_PC.dtype != jnp.bfloat16 or x_PC.shape[1:] != w.shape[2:]:
        raise ValueError(f"need bfloat16 w [L, R, C] and x [P, C], got w {w.dtype} {w.shape} and x {x_PC.dtype} {x_PC.shape}")
    call = jax.ffi.ffi_call(_target("gptoss_bf16_gemm", at), jax.ShapeDtypeStruct((x_PC.shape[0], w.shape[1]), jnp.float32))
    return call(x_PC, w, jnp.asarray(layer, jnp.int32))


def bf16_matvec(x_C: jax.Array, w: jax.Array, layer: jax.Array | int = 0, *, at: str | None = None) -> jax.Array:
    """`w[layer] @ x` in float32 for bfloat16 `w [L, R, C]` (CPU only; see `available`). As in
    `mxfp4_matvec`, the kernel indexes the stack itself."""
    if w.ndim != 3 or w.dtype != jnp.bfloat16 or x_C.shape != w.shape[2:]:
        raise ValueError(f"need bfloat16 w [L, R, C] and x [C], got w {w.dtype} {w.shape} and x {x_C.shape}")
    call = jax.ffi.ffi_call(_target("gptoss_bf16_matvec", at), jax.ShapeDtypeStruct(w.shape[1:2], jnp.float32))
    return call(x_C.astype(jnp.float32), w, jnp.asarray(layer, jnp.int32))


def decode_attention(
    q_BNGD: jax.Array, k_BSND: jax.Array, v_BSND: jax.Array, q_pos_B: jax.Array, k_pos_BS: jax.Array,
    sinks_NG: jax.Array, window: int | None, *, at: str | None = None,
) -> jax.Array:
    """Attention with sinks of one new token per row against a bfloat16 cache, float32 `[B, N, G, D]`
    (CPU only; see `available`): `attention.attend`'s math, reading each cached key and value once.
    Keys are visible by their positions `k_pos` (-1: an empty slot), so full caches and sliding rings
    in any slot order read alike."""
    B, N, G, D = q_BNGD.shape
    if k_BSND.dtype != jnp.bfloat16 or v_BSND.shape != k_BSND.shape or k_BSND.shape[::2] != (B, N) or k_BSND.shape[3] != D:
        raise ValueError(f"need bfloat16 k, v [B, S, N, D] for q [B, N, G, D] {q_BNGD.shape}, got {k_BSND.dtype} {k_BSND.shape}, {v_BSND.shape}")
    call = jax.ffi.ffi_call(_target("gptoss_decode_attention", at), jax.ShapeDtypeStruct(q_BNGD.shape, jnp.float32))
    return call(
        q_BNGD.astype(jnp.float32), k_BSND, v_BSND, q_pos_B.astype(jnp.int32), k_pos_BS.astype(jnp.int32),
        sinks_NG.astype(jnp.float32), window=np.int64(window or 0),
    )

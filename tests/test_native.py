"""The C++ matrix-vector kernels (`gptoss_jax.native`): the source's MXFP4 constants against the one
definition, MXFP4 against the `mxfp4.dequantize` reference, bfloat16 against float64, on every
instruction-set level this CPU can run.

The kernel tests skip only on a machine without a C++ compiler (what `native._build` looks for), and
never under `CI`. A kernel that no longer compiles or loads fails them: `native.mxfp4_matvec` and
`native.bf16_matvec` raise, and so does `native._build`."""

import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_jax import mxfp4, native
from gptoss_jax.mxfp4 import dequantize


def _cannot_build() -> str | None:
    """What this machine lacks to build matvec.cc (what `native._build` looks for), or None."""
    if not (os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")):
        return "a C++ compiler (c++ or g++ on PATH, or $CXX)"
    return None


_missing = None if os.environ.get("CI") else _cannot_build()
needs_compiler = pytest.mark.skipif(_missing is not None, reason=f"needs {_missing}")


def _cpu_has(*features: str) -> bool:
    flags = next((line.split() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), [])
    return all(feature in flags for feature in features)


def test_source_constants_match_the_format():
    """matvec.cc keeps its own copy of the format (C++ cannot import Python), read here out of the source.
    Its static_asserts pin the rest: 16 bytes per block, and a bias equal to float32's, which its scale
    decode (shifting the byte into float32's exponent field) relies on."""
    source = native.SOURCE.read_text()
    integers = dict(re.findall(r"constexpr int\w* (\w+) = (\w+(?: / 2)?);", source))
    assert integers == {"kBlock": str(mxfp4.BLOCK), "kBytesPerBlock": "kBlock / 2", "kScaleBias": str(mxfp4.SCALE_BIAS)}
    (table,) = re.findall(r"constexpr float kFp4\[16\] = \{([^}]*)\};", source)
    values = [float(literal.strip().removesuffix("f")) for literal in table.split(",")]
    assert [(v, math.copysign(1, v)) for v in values] == [(v, math.copysign(1, v)) for v in mxfp4.FP4_VALUES]


# (P, R, C): one value block, odd row counts and block counts, gpt-oss-20b's mlp2, and more rows than
# the kernel's per-thread share so every thread's range (and the ragged last one) is covered. The
# matrices sit in a stack of 3 layers x (P + 2) experts; pair p uses expert (2p + 1) % E of layer 2.
@needs_compiler
@pytest.mark.parametrize("P, R, C", [(1, 1, 32), (3, 7, 96), (2, 33, 160), pytest.param(1, 2880, 2880, marks=pytest.mark.slow), (5, 601, 64)])
def test_matches_decoded_weights(P, R, C):
    rng = np.random.default_rng(P * R + C)
    L, E, layer = 3, P + 2, 2
    blocks = rng.integers(0, 256, (L, E, R, C // 32, 16), dtype=np.uint8)  # every code in both nibbles
    scales = rng.integers(118, 130, (L, E, R, C // 32), dtype=np.uint8)
    expert = (2 * np.arange(P) + 1) % E
    x = rng.standard_normal((P, C), np.float32)
    got = np.asarray(jax.jit(native.mxfp4_matvec)(jnp.asarray(x), jnp.asarray(blocks), jnp.asarray(scales), jnp.asarray(expert), layer))
    weights = np.asarray(dequantize(jnp.asarray(blocks[layer, expert]), jnp.asarray(scales[layer, expert]), jnp.float32), np.float64)
    expected = np.einsum("prc,pc->pr", weights, x.astype(np.float64))
    # float32 sums of C exact products in a different order than float64: measured <= 6e-7 of the
    # largest output; a wrong nibble, scale, row, expert or layer moves outputs by O(1) of it.
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6 * np.abs(expected).max())


@needs_compiler
def test_mismatched_shapes_are_an_error():
    blocks, scales = jnp.zeros((1, 2, 4, 3, 16), jnp.uint8), jnp.zeros((1, 2, 4, 3), jnp.uint8)
    with pytest.raises(ValueError, match="do not match"):
        native.mxfp4_matvec(jnp.zeros((2, 64)), blocks, scales, jnp.zeros(2, jnp.int32))
    with pytest.raises(ValueError, match="need blocks"):
        native.mxfp4_matvec(jnp.zeros((2, 96)), blocks[0], scales[0], jnp.zeros(2, jnp.int32))
    with pytest.raises(ValueError, match="bfloat16 w"):
        native.bf16_matvec(jnp.zeros(3), jnp.zeros((1, 4, 3), jnp.float32))


@needs_compiler
@pytest.mark.parametrize("layer, expert", [(1, 0), (-1, 0), (0, 2), (0, -1)])
def test_indices_outside_the_stack_are_an_error(layer, expert):
    """Layer and expert ids are traced values the kernel cannot trust: out of range is an error, not a read
    past the stack."""
    blocks, scales = jnp.zeros((1, 2, 4, 1, 16), jnp.uint8), jnp.zeros((1, 2, 4, 1), jnp.uint8)
    with pytest.raises(Exception, match="out of range"):
        jax.block_until_ready(native.mxfp4_matvec(jnp.zeros((1, 32)), blocks, scales, jnp.array([expert]), layer))
    if expert == 0:
        with pytest.raises(Exception, match="layer out of range"):
            jax.block_until_ready(native.bf16_matvec(jnp.zeros(3), jnp.zeros((1, 4, 3), jnp.bfloat16), layer))


@needs_compiler
def test_library_is_built_once(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTOSS_JAX_CACHE", str(tmp_path))
    first = native._build()
    assert first.parent == tmp_path / "native" and first.stat().st_size > 0
    assert native._build() == first and list(first.parent.iterdir()) == [first]  # no scratch left behind


@needs_compiler
@pytest.mark.parametrize("R, C", [(1, 1), (7, 33), (601, 2880)])  # C not a multiple of 16: the scalar tail
def test_bf16_matvec_matches_float64(R, C):
    rng = np.random.default_rng(R + C)
    w = jnp.asarray(rng.standard_normal((3, R, C)), jnp.bfloat16)  # a stack of 3 layers; layer 1 is used
    x = rng.standard_normal(C, np.float32)
    got = np.asarray(jax.jit(native.bf16_matvec)(jnp.asarray(x), w, 1))
    expected = np.asarray(w[1], np.float64) @ x.astype(np.float64)
    # float32 sums of exact products (bf16 x float32 fits in float32's mantissa): measured <= 3e-7 of
    # sum |w x|; a dropped tail, wrong row or wrong layer is O(1) of it.
    bound = np.abs(np.asarray(w[1], np.float64)) @ np.abs(x.astype(np.float64))
    np.testing.assert_array_less(np.abs(got - expected), 2e-6 * bound + 1e-30)


# The default build is `native`: AVX-512 on CI's machines. The lower levels are built and run here by
# a child process per level (the kernels register under one name per process).
LOWER_LEVELS = [pytest.param("avx2", marks=pytest.mark.skipif(not _cpu_has("avx2", "fma"), reason="needs AVX2 and FMA")), "portable"]


@needs_compiler
@pytest.mark.parametrize("level", LOWER_LEVELS)
def test_every_level_this_cpu_runs(level, tmp_path):
    env = {**os.environ, "GPTOSS_JAX_CPU_LEVEL": level, "GPTOSS_JAX_CACHE": str(tmp_path)}
    checks = "matches_decoded_weights or bf16_matvec_matches or indices_outside"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", __file__, "-k", checks]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0 and " passed" in finished.stdout and "skipped" not in finished.stdout, finished.stdout[-3000:]
    (library,) = (tmp_path / "native").iterdir()  # built at this level, into the child's own cache
    assert library.suffix == ".so"


def test_unknown_level_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("GPTOSS_JAX_CPU_LEVEL", "avx9000")
    with pytest.raises(ValueError, match="GPTOSS_JAX_CPU_LEVEL must be one of native, avx2, portable, got 'avx9000'"):
        native.level_flags()

"""The C++ matrix-vector kernels (`gptoss_jax.native`): the source's MXFP4 constants against the one
definition, MXFP4 against the `mxfp4.dequantize` reference, bfloat16 against float64, on every
instruction-set level this CPU can run (each level registers under names of its own, so one process
runs them all).

The kernels are compiled by `pip install`. Installed without them (no C++ compiler), the kernel tests
skip, except under `CI`, where `test_the_kernels_are_installed` fails."""

import math
import os
import platform
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_jax import kernels, mxfp4, native
from gptoss_jax.mxfp4 import dequantize


LEVELS_HERE = native.runnable_levels()  # empty when installed without the kernels: the kernel tests skip


def test_the_kernels_are_installed():
    """Every level of this architecture is built (CMakeLists.txt), and this CPU runs the portable one."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    if not native.built_levels() and not os.environ.get("CI"):
        pytest.skip("installed without the C++ kernels (no C++ compiler at install time)")
    # (a compiler without AMX, older than GCC 11, builds every level but amx, with a warning)
    assert native.built_levels() in ((native.LEVELS, native.LEVELS[1:]) if x86 else (("portable",),))
    assert LEVELS_HERE[-1] == "portable" and native.available()


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="reads Linux's /proc/cpuinfo")
def test_the_levels_this_cpu_runs_are_what_linux_reports():
    """The portable library's GptossCpuLevel (the compiler's CPU query) against the kernel's own list."""
    if not LEVELS_HERE:
        pytest.skip("installed without the C++ kernels")
    flags = set(next(line.split() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")))
    avx2 = {"avx2", "fma"}
    avx512 = avx2 | {"avx512f", "avx512bw"}
    needs = {"amx": avx512 | {"avx512_bf16", "amx_tile", "amx_bf16"}, "avx512": avx512, "avx2": avx2}
    expected = [level for level in native.built_levels() if level in needs and needs[level] <= flags]
    assert list(LEVELS_HERE) == [*expected, "portable"]
    assert native.level() == LEVELS_HERE[0]


def test_installed_without_the_kernels_the_xla_paths_serve_after_one_warning(monkeypatch):
    caches = (native.runnable_levels, native.available)
    monkeypatch.setattr(native, "_library", lambda level: None)
    for cache in caches:
        cache.cache_clear()
    try:
        with pytest.warns(UserWarning, match="installed without its C.. kernels") as warned:
            assert not native.available() and not native.available()
        assert len(warned) == 1 and not kernels.cpu_kernels()
    finally:
        monkeypatch.undo()
        for cache in caches:
            cache.cache_clear()


def test_source_constants_match_the_format():
    """The kernels keep their own copy of the format in formats.h (C++ cannot import Python), read here out
    of the source. Its static_assert pins the rest: a bias equal to float32's, which the scale decode
    (shifting the byte into float32's exponent field) relies on."""
    sources = Path(native.__file__).parent
    source = (sources / "formats.h").read_text()
    integers = dict(re.findall(r"^constexpr int\w* (\w+) = (\w+(?: / 2)?);", source, re.MULTILINE))
    assert integers == {"kBlock": str(mxfp4.BLOCK), "kBytesPerBlock": "kBlock / 2", "kScaleBias": str(mxfp4.SCALE_BIAS)}
    (table,) = re.findall(r"constexpr float kFp4\[16\] = \{([^}]*)\};", source)
    values = [float(literal.strip().removesuffix("f")) for literal in table.split(",")]
    assert [(v, math.copysign(1, v)) for v in values] == [(v, math.copysign(1, v)) for v in mxfp4.FP4_VALUES]
    (doubled,) = re.findall(r"doubled = _mm_setr_epi8\(([^)]*)\)", (sources / "matvec.cc").read_text())  # the AVX2 path's integer table
    assert [int(v) for v in doubled.split(",")] == [int(2 * v) for v in mxfp4.FP4_VALUES]


# (P, R, C): one value block, odd row counts and block counts, gpt-oss-20b's mlp2, and more rows than
# the kernel's per-thread share so every thread's range (and the ragged last one) is covered; 640 and
# 9600 columns cover the scale loops' vector steps and more blocks than a row's chunk of multipliers. The
# matrices sit in a stack of 3 layers x (P + 2) experts; pair p uses expert (2p + 1) % E of layer 2.
@pytest.mark.parametrize("at", LEVELS_HERE)
@pytest.mark.parametrize("P, R, C", [(1, 1, 32), (3, 7, 96), (2, 33, 160), (2, 5, 640), (1, 3, 9600), pytest.param(1, 2880, 2880, marks=pytest.mark.slow), (5, 601, 224)])
def test_matches_decoded_weights(P, R, C, at):
    rng = np.random.default_rng(P * R + C)
    L, E, layer = 3, P + 2, 2
    blocks = rng.integers(0, 256, (L, E, R, C // 32, 16), dtype=np.uint8)  # every code in both nibbles
    scales = rng.integers(118, 130, (L, E, R, C // 32), dtype=np.uint8)
    expert = (2 * np.arange(P) + 1) % E
    x = rng.standard_normal((P, C), np.float32)
    matvec = jax.jit(lambda *args: native.mxfp4_matvec(*args, at=at))
    got = np.asarray(matvec(jnp.asarray(x), jnp.asarray(blocks), jnp.asarray(scales), jnp.asarray(expert), layer))
    weights = np.asarray(dequantize(jnp.asarray(blocks[layer, expert]), jnp.asarray(scales[layer, expert]), jnp.float32), np.float64)
    expected = np.einsum("prc,pc->pr", weights, x.astype(np.float64))
    # float32 sums of C exact products in a different order than float64: measured <= 6e-7 of the
    # largest output; a wrong nibble, scale, row, expert or layer moves outputs by O(1) of it.
    bound = np.full_like(expected, 2e-6 * np.abs(expected).max())
    if at != "portable":  # x rounded to int16 per block of 32 (matvec.cc's Activations): off by <= half a step
        half_steps = np.abs(x).reshape(P, C // 32, 32).max(-1) / 32767 / 2
        bound += np.einsum("prjb,pj->pr", np.abs(weights).reshape(P, R, C // 32, 32), half_steps)
    np.testing.assert_array_less(np.abs(got - expected), bound)
    if at != "portable":  # and the rounding is really there: the bound is not slack
        assert np.abs(got - expected).max() > 1e-3 * (bound - 2e-6 * np.abs(expected).max()).max()


# (P, R, C, counts): experts' runs of rows longer and shorter than a 32-row tile, an expert without rows,
# rows past the last run (zero), weight rows not a multiple of the 32-row panel, one block of columns.
@pytest.mark.parametrize("at", LEVELS_HERE)
@pytest.mark.parametrize("P, R, C, counts", [(75, 37, 96, (3, 0, 40, 17, 5)), (33, 64, 32, (33,)), (6, 5, 160, (0, 2, 1, 0))])
def test_grouped_gemm_matches_decoded_weights(P, R, C, counts, at):
    rng = np.random.default_rng(P + R + C)
    L, E, layer = 2, len(counts), 1
    blocks = rng.integers(0, 256, (L, E, R, C // 32, 16), dtype=np.uint8)
    scales = rng.integers(118, 130, (L, E, R, C // 32), dtype=np.uint8)
    x = jnp.asarray(rng.standard_normal((P, C)), jnp.bfloat16)
    gemm = jax.jit(lambda *args: native.mxfp4_grouped_gemm(*args, at=at))
    got = np.asarray(gemm(x, jnp.asarray(blocks), jnp.asarray(scales), jnp.asarray(counts, np.int32), layer))
    weights = np.asarray(dequantize(jnp.asarray(blocks[layer]), jnp.asarray(scales[layer]), jnp.float32), np.float64)
    owner = np.repeat(np.arange(E), counts)  # rows past these have no expert: zero
    owned = np.asarray(x, np.float64)[: len(owner)]
    expected, magnitude = np.zeros((P, R)), np.zeros((P, R))
    expected[: len(owner)] = np.einsum("prc,pc->pr", weights[owner], owned)
    magnitude[: len(owner)] = np.einsum("prc,pc->pr", np.abs(weights[owner]), np.abs(owned))
    # float32 sums of exact products (bf16 x bf16); a wrong expert, row, block or pair is O(1) of a row's sum.
    np.testing.assert_array_less(np.abs(got - expected), 2e-6 * magnitude + 1e-30)
    assert (got[len(owner) :] == 0).all()


@pytest.mark.parametrize("at", LEVELS_HERE)
@pytest.mark.parametrize("P, R, C", [(1, 1, 1), (37, 33, 70), (2, 64, 96)])  # partial tiles, panels and blocks (odd C); whole ones
def test_bf16_gemm_matches_float64(P, R, C, at):
    rng = np.random.default_rng(P + R + C)
    w = jnp.asarray(rng.standard_normal((3, R, C)), jnp.bfloat16)  # a stack of 3 layers; layer 2 is used
    x = jnp.asarray(rng.standard_normal((P, C)), jnp.bfloat16)
    got = np.asarray(jax.jit(lambda x, w: native.bf16_gemm(x, w, 2, at=at))(x, w))
    w64, x64 = np.asarray(w[2], np.float64), np.asarray(x, np.float64)
    # float32 sums of exact products (bf16 x bf16); a wrong row, column, layer or padding is O(1) of |w| |x|.
    np.testing.assert_array_less(np.abs(got - x64 @ w64.T), 2e-6 * (np.abs(x64) @ np.abs(w64).T) + 1e-30)


@pytest.mark.parametrize("at", LEVELS_HERE)
def test_grouped_gemm_counts_beyond_the_rows_are_an_error(at):
    blocks, scales = jnp.zeros((1, 2, 4, 1, 16), jnp.uint8), jnp.zeros((1, 2, 4, 1), jnp.uint8)
    for counts in ([2, 2], [-1, 1]):  # 4 rows claimed of 3; a negative count
        with pytest.raises(Exception, match="counts must be >= 0 and sum to at most P"):
            jax.block_until_ready(native.mxfp4_grouped_gemm(jnp.zeros((3, 32), jnp.bfloat16), blocks, scales, jnp.array(counts), at=at))


@pytest.mark.parametrize("at", LEVELS_HERE)
def test_a_nan_in_x_makes_its_rows_nan(at):
    blocks, scales = jnp.ones((1, 2, 3, 2, 16), jnp.uint8), jnp.full((1, 2, 3, 2), 127, jnp.uint8)
    x = jnp.ones((2, 64)).at[1, 40].set(jnp.nan)
    got = np.asarray(native.mxfp4_matvec(x, blocks, scales, jnp.array([0, 1]), at=at))
    assert np.isfinite(got[0]).all() and np.isnan(got[1]).all()


@pytest.mark.skipif(not LEVELS_HERE, reason="installed without the C++ kernels")
def test_mismatched_shapes_are_an_error():
    blocks, scales = jnp.zeros((1, 2, 4, 3, 16), jnp.uint8), jnp.zeros((1, 2, 4, 3), jnp.uint8)
    with pytest.raises(ValueError, match="do not match"):
        native.mxfp4_matvec(jnp.zeros((2, 64)), blocks, scales, jnp.zeros(2, jnp.int32))
    with pytest.raises(ValueError, match="need blocks"):
        native.mxfp4_matvec(jnp.zeros((2, 96)), blocks[0], scales[0], jnp.zeros(2, jnp.int32))
    with pytest.raises(ValueError, match="bfloat16 w"):
        native.bf16_matvec(jnp.zeros(3), jnp.zeros((1, 4, 3), jnp.float32))
    with pytest.raises(ValueError, match="bfloat16 w"):
        native.bf16_gemm(jnp.zeros((2, 3)), jnp.zeros((1, 4, 3), jnp.bfloat16))  # x must be bfloat16 too
    with pytest.raises(ValueError, match="bfloat16 x"):
        native.mxfp4_grouped_gemm(jnp.zeros((2, 32)), blocks[:, :, :, :1], scales[:, :, :, :1], jnp.zeros(2, jnp.int32))


@pytest.mark.parametrize("at", LEVELS_HERE)
@pytest.mark.parametrize("layer, expert", [(1, 0), (-1, 0), (0, 2), (0, -1)])
def test_indices_outside_the_stack_are_an_error(layer, expert, at):
    """Layer and expert ids are traced values the kernel cannot trust: out of range is an error, not a read
    past the stack."""
    blocks, scales = jnp.zeros((1, 2, 4, 1, 16), jnp.uint8), jnp.zeros((1, 2, 4, 1), jnp.uint8)
    with pytest.raises(Exception, match="out of range"):
        jax.block_until_ready(native.mxfp4_matvec(jnp.zeros((1, 32)), blocks, scales, jnp.array([expert]), layer, at=at))
    if expert == 0:
        with pytest.raises(Exception, match="layer out of range"):
            jax.block_until_ready(native.bf16_matvec(jnp.zeros(3), jnp.zeros((1, 4, 3), jnp.bfloat16), layer, at=at))


@pytest.mark.parametrize("at", LEVELS_HERE)
@pytest.mark.parametrize("R, C", [(1, 1), (7, 33), (5, 121), (601, 2880)])  # 121: every unrolled step, the single steps and the scalar tail
def test_bf16_matvec_matches_float64(R, C, at):
    rng = np.random.default_rng(R + C)
    w = jnp.asarray(rng.standard_normal((3, R, C)), jnp.bfloat16)  # a stack of 3 layers; layer 1 is used
    x = rng.standard_normal(C, np.float32)
    got = np.asarray(jax.jit(lambda x, w: native.bf16_matvec(x, w, 1, at=at))(jnp.asarray(x), w))
    expected = np.asarray(w[1], np.float64) @ x.astype(np.float64)
    # float32 sums of exact products (bf16 x float32 fits in float32's mantissa): measured <= 3e-7 of
    # sum |w x|; a dropped tail, wrong row or wrong layer is O(1) of it.
    bound = np.abs(np.asarray(w[1], np.float64)) @ np.abs(x.astype(np.float64))
    np.testing.assert_array_less(np.abs(got - expected), 2e-6 * bound + 1e-30)


def test_an_unknown_or_unrunnable_level_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("GPTOSS_JAX_CPU_LEVEL", "avx9000")
    with pytest.raises(ValueError, match="GPTOSS_JAX_CPU_LEVEL must be one of amx, avx512, avx2, portable, got 'avx9000'"):
        native.level()
    beyond = [level for level in native.built_levels() if level not in LEVELS_HERE]
    if beyond:  # a level built here that this CPU cannot run (AVX-512 on an AVX2 machine)
        monkeypatch.setenv("GPTOSS_JAX_CPU_LEVEL", beyond[0])
        with pytest.raises(ValueError, match=f"GPTOSS_JAX_CPU_LEVEL={beyond[0]}: this CPU and installation run"):
            native.level()

"""The MXFP4 format (SPEC 4.3; OCP MX v1.0), defined once: block size, FP4 E2M1 code values, E8M0 scale rule.

A weight `[..., R, C]` is stored as `blocks uint8 [..., R, C/32, 16]` (two E2M1 codes per byte, low
nibble = even element) and `scales uint8 [..., R, C/32]`; the value is `FP4_VALUES[code] * 2^(s - 127)`.

Every reader and writer takes these from here: the Pallas kernels (`mxfp4`, `grouped_matmul`), the
XLA decoder and the encoder (`gptoss_jax.mxfp4`, which re-exports them to config, model and converter),
and the C++ kernel (`gptoss_jax/native/matvec.cc`), whose literals `tests/test_native.py` checks against
this module. It lives in `pallas_kernels` because that package may import nothing from `gptoss_jax`
while `gptoss_jax` may import it; and in a module of its own, importing nothing, because it is data,
not kernel code: taking the constants loads neither jax nor Pallas (which `mxfp4` needs).
"""

BLOCK = 32  # values sharing one scale, along the last (contraction) axis
BYTES_PER_BLOCK = BLOCK // 2  # two 4-bit codes per byte
# E8M0 scale byte s means 2^(s - SCALE_BIAS). The bias equals float32's (and bfloat16's), so s is their
# biased exponent field: decoders build the scale by shifting s into place instead of calling exp2.
SCALE_BIAS = 127
SCALE_NAN = 255  # E8M0's only special value; real scales are 0..254
# E2M1 code -> value: bit 3 is the sign, bits 2-1 the exponent (bias 1), bit 0 the mantissa.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

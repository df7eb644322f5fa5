"""`kernels.project`: one bfloat16 token on CPU runs the C++ matvec, several the C++ AMX GEMM where
`kernels.gemms_on_amx`; each equals (and differentiates as) the einsum."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_jax import kernels
from gptoss_jax.kernels import project

N, G, D, H, V = 2, 3, 5, 7 * 32, 37  # every width differs, so a swapped axis shows

SPECS = {  # the model's four projections: (spec, x shape without B, T, w shape)
    "q": ("bth,ngdh->btngd", (H,), (N, G, D, H)),
    "kv": ("bth,ndh->btnd", (H,), (N, D, H)),
    "out": ("btngd,hngd->bth", (N, G, D), (H, N, G, D)),
    "unembed": ("bth,vh->btv", (H,), (V, H)),
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])  # the einsum, or the C++ kernel
@pytest.mark.parametrize("name", SPECS)
def test_one_token_matches_einsum(name, dtype):
    spec, x_shape, w_shape = SPECS[name]
    rng = np.random.default_rng(len(name))
    x = jnp.asarray(rng.standard_normal((1, 1, *x_shape)), dtype)
    w = jnp.asarray(rng.standard_normal(w_shape), dtype)
    ours = jax.jit(project, static_argnums=0)(spec, x, w)
    program = str(jax.make_jaxpr(project, static_argnums=0)(spec, x, w))
    assert kernels.cpu_kernels()  # CI installs with the C++ kernels built
    assert ("gptoss_bf16_matvec" in program) == (dtype == jnp.bfloat16)
    assert ("dot_general" in program) == (dtype == jnp.float32)
    reference = jnp.einsum(spec, x, w, precision="highest", preferred_element_type=jnp.float32).astype(dtype)
    # float32 sums both ways (bf16 x bf16 products are exact in float32): only the order of the <= 224
    # summed products differs (~1e-7 relative of outputs ~15), then the same rounding to the output
    # dtype, which a summation-order difference can flip by one bf16 step (2^-8 relative) at most;
    # a wrong axis or a missing term moves outputs by O(1).
    assert ours.shape == reference.shape and ours.dtype == reference.dtype
    ours, reference = np.asarray(ours, np.float32), np.asarray(reference, np.float32)
    rtol = 2**-8 if dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(ours, reference, rtol=rtol, atol=1e-5 * np.abs(reference).max())


@pytest.mark.parametrize("amx", [False, True])
@pytest.mark.parametrize("name", SPECS)
def test_several_tokens_match_einsum(name, amx, monkeypatch):
    """Several bfloat16 rows run XLA's einsum, or the C++ GEMM where `gemms_on_amx` (forced here: it then
    runs at this CPU's level, with AMX or its scalar loops). Tolerance as for one token."""
    monkeypatch.setattr(kernels, "gemms_on_amx", lambda x: amx)
    spec, x_shape, w_shape = SPECS[name]
    rng = np.random.default_rng(len(name) + 10)
    x = jnp.asarray(rng.standard_normal((2, 3, *x_shape)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal(w_shape), jnp.bfloat16)
    program = str(jax.make_jaxpr(lambda x, w: project(spec, x, w))(x, w))
    assert ("gptoss_bf16_gemm" in program) == amx and ("dot_general" in program) == (not amx)
    ours = np.asarray(jax.jit(lambda x, w: project(spec, x, w))(x, w), np.float32)
    reference = np.asarray(jnp.einsum(spec, x, w, precision="highest", preferred_element_type=jnp.float32).astype(jnp.bfloat16), np.float32)
    np.testing.assert_allclose(ours, reference, rtol=2**-8, atol=1e-5 * np.abs(reference).max())


def test_bfloat16_logits_in_float32():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 1, H)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((V, H)), jnp.bfloat16)
    logits = project("bth,vh->btv", x, w, jnp.float32)
    reference = jnp.einsum("bth,vh->btv", x, w, preferred_element_type=jnp.float32)
    assert logits.dtype == jnp.float32
    # Same bf16 inputs, float32 sums both ways: differences are summation order only (~1e-6 relative).
    np.testing.assert_allclose(np.asarray(logits), np.asarray(reference), rtol=1e-5, atol=1e-5 * float(jnp.abs(reference).max()))


def test_one_token_gradients_are_the_einsums():
    """The kernel has no VJP of its own: `kernels.with_reference_vjp` differentiates it as the einsum."""
    spec, x_shape, w_shape = SPECS["q"]
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((1, 1, *x_shape)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal(w_shape), jnp.bfloat16)
    cotangent = jnp.asarray(rng.standard_normal((1, 1, N, G, D)), jnp.float32)

    def loss(function):
        return lambda x, w: (function(x, w).astype(jnp.float32) * cotangent).sum()

    ours = jax.jit(jax.grad(loss(lambda x, w: project(spec, x, w)), argnums=(0, 1)))(x, w)
    einsum = jax.jit(jax.grad(loss(lambda x, w: jnp.einsum(spec, x, w)), argnums=(0, 1)))(x, w)
    for got, expected in zip(ours, einsum):  # the same program: the einsum's own VJP
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(expected, np.float32))

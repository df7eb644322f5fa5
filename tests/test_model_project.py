"""`model.project`: the one-token CPU multiply-and-sum equals the einsum it stands in for."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_jax.model import project

N, G, D, H, V = 2, 3, 5, 7 * 32, 37  # every width differs, so a swapped axis shows

SPECS = {  # the model's four projections: (spec, x shape without B, T, w shape)
    "q": ("bth,ngdh->btngd", (H,), (N, G, D, H)),
    "kv": ("bth,ndh->btnd", (H,), (N, D, H)),
    "out": ("btngd,hngd->bth", (N, G, D), (H, N, G, D)),
    "unembed": ("bth,vh->btv", (H,), (V, H)),
}


@pytest.mark.parametrize("name", SPECS)
def test_one_token_matches_einsum(name):
    spec, x_shape, w_shape = SPECS[name]
    rng = np.random.default_rng(len(name))
    x = jnp.asarray(rng.standard_normal((1, 1, *x_shape)), jnp.float32)
    w = jnp.asarray(rng.standard_normal(w_shape), jnp.float32)
    ours = jax.jit(project, static_argnums=0)(spec, x, w)
    assert "dot_general" not in str(jax.make_jaxpr(project, static_argnums=0)(spec, x, w))  # the CPU path ran
    reference = jnp.einsum(spec, x, w, precision="highest")
    # float32 both ways: only the order of the <= 224 summed products differs (~1e-7 relative of
    # outputs ~15); a wrong axis or a missing term moves outputs by O(1).
    np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), rtol=1e-5, atol=1e-5 * float(jnp.abs(reference).max()))
    assert ours.shape == reference.shape and ours.dtype == reference.dtype


def test_bfloat16_output_dtype_and_more_tokens_use_einsum():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 1, H)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((V, H)), jnp.bfloat16)
    logits = project("bth,vh->btv", x, w, jnp.float32)
    reference = jnp.einsum("bth,vh->btv", x, w, preferred_element_type=jnp.float32)
    assert logits.dtype == jnp.float32
    # Same bf16 inputs, float32 sums both ways: differences are summation order only (~1e-6 relative).
    np.testing.assert_allclose(np.asarray(logits), np.asarray(reference), rtol=1e-5, atol=1e-5 * float(jnp.abs(reference).max()))
    two = jnp.concatenate([x, x], axis=1)
    assert "dot_general" in str(jax.make_jaxpr(lambda a, b: project("bth,vh->btv", a, b))(two, w))

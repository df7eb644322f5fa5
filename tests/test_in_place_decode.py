"""Cached steps on CPU see whole parameter stacks and a layer index (`stacked.LayerOf`): a one-token
decode step copies no layer's weights (the C++ kernels read them in the stacks), a prefill step no
layer's experts (`moe.grouped` slices one expert at a time), and both compute what slicing them does;
a prefill on the C++ GEMMs computes what XLA's products do."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CONFIGS
from flax import nnx

from gptoss_jax import GptOss, kernels

# 2 (sliding, full) pairs in the scan and a last sliding layer (an unrolled step would hide copies);
# every matrix of a layer is over 1000 elements, more than any activation of one token.
CONFIG = dataclasses.replace(CONFIGS["wide"], num_hidden_layers=5, hidden_size=128, intermediate_size=128, vocab_size=101)
MOVES = ("copy", "fusion", "dynamic-slice", "slice", "gather")  # the ops that could write a weight's bytes anew
MATRICES = ("q", "k", "v", "out", "mlp1_blocks", "mlp1_scales", "mlp2_blocks", "mlp2_scales")  # 99.9% of the bytes


def _step(model: GptOss):
    graph, state = nnx.split(model)
    return jax.jit(lambda state, tokens, cache: nnx.merge(graph, state).step(tokens, cache), donate_argnums=2), state


def _layer_shapes(model: GptOss, matrices=MATRICES) -> set[tuple[str, tuple[int, ...]]]:
    """(dtype, shape) of one layer of every stacked matrix, with or without its layer axis, and of the
    K experts a token selects (what a gather of them would write). Biases, norms and the router are
    sliced (their bytes are 0.1% of a layer's)."""
    shapes = set()
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        stack = variable.get_value()
        if str(path[-1]) in matrices:
            dtype, layer = str(stack.dtype), stack.shape[1:]
            shapes |= {(dtype, layer), (dtype, (1, *layer))}
            if layer[0] == CONFIG.num_experts:
                shapes.add((dtype, (CONFIG.experts_per_token, *layer[1:])))
    return shapes


@pytest.fixture(scope="module")
def model() -> GptOss:
    assert kernels.cpu_kernels()  # CI installs with the C++ kernels built
    return GptOss(CONFIG, rngs=nnx.Rngs(0))


def _copies(program: str, shapes: set) -> tuple[list, list]:
    """(every op of `program` that writes a buffer anew, those whose buffer has one of `shapes`)."""
    written = re.findall(r"= (\w+)\[([\d,]*)\]\{[^}]*\} (\S+)\(", program)
    moved = [(dtype, shape, op) for dtype, shape, op in written if op in MOVES]
    named = lambda dtype: dtype.replace("u8", "uint8").replace("bf16", "bfloat16")  # noqa: E731
    return moved, [m for m in moved if (named(m[0]), tuple(int(d) for d in m[1].split(",") if d)) in shapes]


def test_decode_step_copies_no_weights(model):
    step, state = _step(model)
    program = step.lower(state, jnp.zeros((1, 1), jnp.int32), model.init_cache(1, 16)).compile().as_text()
    assert all(f"gptoss_{kernel}" in program for kernel in ("mxfp4_matvec", "bf16_matvec", "decode_attention"))
    moved, copies = _copies(program, _layer_shapes(model))
    assert len(moved) > 10 and not copies, copies  # `moved` holds the step's other fusions: the pattern matches


def test_prefill_step_copies_no_layer_of_experts():
    """`grouped` decodes one expert at a time out of the stacks; the attention matrices are copied
    (transposed for XLA's GEMM), at most one layer's at a time."""
    model = GptOss(CONFIG, moe_impl="grouped", rngs=nnx.Rngs(0))
    step, state = _step(model)
    program = step.lower(state, jnp.zeros((1, 9), jnp.int32), model.init_cache(1, 16)).compile().as_text()
    expert_shapes = _layer_shapes(model, [m for m in MATRICES if m.startswith("mlp")])
    moved, copies = _copies(program, expert_shapes)
    assert len(moved) > 10 and not copies, copies


@pytest.mark.parametrize("moe_impl, chunk", [("auto", 1), ("grouped", 3)])
def test_in_place_equals_sliced(model, monkeypatch, moe_impl, chunk):
    """The same kernels on the same bytes, addressed in the stack or in a sliced copy: equal logits,
    for one-token decode (the C++ kernels) and 3-token chunks (`grouped`)."""
    model = GptOss(CONFIG, moe_impl=moe_impl, rngs=nnx.Rngs(0))
    tokens = [5, 17, 99, 3, 42, 8, 64, 1, 77]  # past the window of 7: the ring wraps
    runs = []
    for in_place in (True, False):
        monkeypatch.setattr(kernels, "reads_stacks", lambda cached, v=in_place: v and cached)
        step, state = _step(model)
        cache, logits = model.init_cache(1, 16), []
        for start in range(0, len(tokens), chunk):
            out, cache = step(state, jnp.array([tokens[start : start + chunk]]), cache)
            logits.append(np.asarray(out[0], np.float32))
        runs.append(np.concatenate(logits))
    # Each output is computed by the same ops in the same order both ways: nothing but the addressing differs.
    np.testing.assert_array_equal(runs[0], runs[1])


def test_prefill_on_the_gemm_kernels_equals_xla(monkeypatch):
    """A bfloat16 model's prefill with its projections and experts in the C++ GEMMs (AMX where the CPU has
    it; forced here, so elsewhere their scalar loops) against XLA's products. The same bf16 roundings
    of the same float32 sums, in another order: measured 2e-7 of the largest logit; a bf16 rounding
    flipped by the order moves an activation by 2^-8 of itself. A wrong row, expert or layer moves
    logits by O(1) of the largest."""
    model = GptOss(CONFIG, moe_impl="grouped", rngs=nnx.Rngs(0))
    tokens = jnp.array([[5, 17, 99, 3, 42, 8, 64, 1, 77]])
    runs = []
    for forced in (True, False):
        monkeypatch.setattr(kernels, "gemms_on_amx", lambda x, f=forced: f and x.dtype == jnp.bfloat16)
        step, state = _step(model)
        program = step.lower(state, tokens, model.init_cache(1, 16)).as_text()
        assert ("gptoss_mxfp4_grouped_gemm" in program and "gptoss_bf16_gemm" in program) == forced
        runs.append(np.asarray(step(state, tokens, model.init_cache(1, 16))[0][0], np.float32))
    np.testing.assert_allclose(runs[0], runs[1], atol=2**-8 * np.abs(runs[1]).max())
    assert (runs[0].argmax(-1) == runs[1].argmax(-1)).all()

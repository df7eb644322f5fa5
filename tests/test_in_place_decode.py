"""One-token decode on CPU hands the C++ kernels whole parameter stacks and a layer index
(`stacked.LayerOf`): the compiled step copies no layer's weights, and computes what slicing them does."""

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


def _decode_step(model: GptOss):
    graph, state = nnx.split(model)
    return jax.jit(lambda state, tokens, cache: nnx.merge(graph, state).step(tokens, cache), donate_argnums=2), state


def _layer_shapes(model: GptOss) -> set[tuple[str, tuple[int, ...]]]:
    """(dtype, shape) of one layer of every stacked matrix, with or without its layer axis, and of the
    K experts a token selects (what a gather of them would write). Biases, norms and the router are
    sliced (their bytes are 0.1% of a layer's)."""
    shapes = set()
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        stack = variable.get_value()
        if str(path[-1]) in MATRICES:
            dtype, layer = str(stack.dtype), stack.shape[1:]
            shapes |= {(dtype, layer), (dtype, (1, *layer))}
            if layer[0] == CONFIG.num_experts:
                shapes.add((dtype, (CONFIG.experts_per_token, *layer[1:])))
    return shapes


@pytest.fixture(scope="module")
def model() -> GptOss:
    assert kernels.cpu_kernels()  # CI installs with the C++ kernels built
    return GptOss(CONFIG, rngs=nnx.Rngs(0))


def test_decode_step_copies_no_weights(model):
    step, state = _decode_step(model)
    program = step.lower(state, jnp.zeros((1, 1), jnp.int32), model.init_cache(1, 16)).compile().as_text()
    assert "gptoss_mxfp4_matvec" in program and "gptoss_bf16_matvec" in program
    shapes = _layer_shapes(model)
    written = re.findall(r"= (\w+)\[([\d,]*)\]\{[^}]*\} (\S+)\(", program)
    moved = [(dtype, shape, op) for dtype, shape, op in written if op in MOVES]
    copies = [m for m in moved if (m[0].replace("u8", "uint8").replace("bf16", "bfloat16"), tuple(int(d) for d in m[1].split(",") if d)) in shapes]
    assert len(moved) > 10 and not copies, copies  # `moved` holds the step's other fusions: the pattern matches


def test_in_place_equals_sliced(model, monkeypatch):
    """The same kernels on the same bytes, addressed in the stack or in a sliced copy: equal logits."""
    tokens = [5, 17, 99, 3, 42, 8, 64, 1, 77]  # past the window of 7: the ring wraps
    runs = []
    for in_place in (True, False):
        monkeypatch.setattr(kernels, "reads_stacks", lambda tokens_per_row, v=in_place: v and tokens_per_row == 1)
        step, state = _decode_step(model)
        cache, logits = model.init_cache(1, 16), []
        for token in tokens:
            out, cache = step(state, jnp.array([[token]]), cache)
            logits.append(np.asarray(out[0, 0], np.float32))
        runs.append(np.stack(logits))
    # Each output row is summed by one thread in one order both ways, so nothing but the addressing differs.
    np.testing.assert_array_equal(runs[0], runs[1])

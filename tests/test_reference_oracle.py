"""OpenAI's own reference implementation reads our synthetic `original/` checkpoint: an oracle we did not write.

`convert/synthetic.py` and the converter share `convert/layouts.py`, so a mistake in that table (say K
and V swapped in the fused qkv) is written and read back consistently and every converter test passes.
`gpt_oss.torch.model.Transformer` from PyPI's `gpt-oss` (0.0.9, installed `--no-deps` by
`scripts/setup test`) reads the same files with OpenAI's own names, slices and MXFP4 decoder, so its
logits must match ours from the converted checkpoint.

Adaptations, all in this file (the reference itself runs unmodified, on CPU, with no monkeypatching:
`Transformer.from_checkpoint` and its forward make no `torch.cuda` calls):
- YaRN: the reference asserts `0 < low < high < d_half - 1` for the ramp's cut points. With "odd"'s
  published betas (32, 1) and initial_context_length 16, low = -1.70 (our model clips it to 0 as
  Hugging Face does), so the reference refuses that config. The test uses "odd" with beta_fast 0.5 and
  beta_slow 0.001 instead: cut points 1.09 and 5.26, so four of the eight frequency pairs lie inside
  the ramp and the clipping question does not arise.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import torch
from conftest import CONFIGS, SEQ_LEN, forward

try:
    from gpt_oss.torch import model as reference
except ImportError as error:  # not in the test extra: pip cannot express --no-deps there
    raise ImportError("OpenAI's reference is missing: run scripts/setup test "
                      "(pip install --no-deps gpt-oss==0.0.9)") from error

import gptoss_jax
from convert.__main__ import main as convert_main
from convert.synthetic import write_checkpoint

CONFIG = dataclasses.replace(CONFIGS["odd"], rope_ntk_beta=0.5, rope_ntk_alpha=0.001)

# The reference keeps every weight in bf16 (norm scales in float32) and runs in its weights' dtype.
# Its forward has no hard-coded dtype: RMSNorm computes in float32 and casts back to the input's
# dtype, the rotary tables are float32 cast to the activations' dtype, the mask is built with
# `Q.new_full`, and its MXFP4 decoder runs at load time (into bf16, exact: every decoded value is
# FP4 times a power of two). So `.float()` after loading gives a float32 forward over exactly the
# checkpoint's values, the same values our float32 load holds, and the logits differ only by
# summation order. Measured: 2.9e-6 max |difference| on logits of magnitude up to 4.6. 1e-4 is our
# float32 parity bound against transformers (tests/test_model.py); the bf16 reference alone differs
# from its float32 self by 0.08, and a swapped K and V in the qkv mapping by several units.
ATOL = 1e-4


def test_original_layout_matches_openai_reference(tmp_path):
    src, dst = tmp_path / "original", tmp_path / "converted"
    write_checkpoint(src, CONFIG, layout="original", seed=11, progress=False)
    assert convert_main([str(src), str(dst)]) == 0
    tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size, SEQ_LEN)  # > windows, > YaRN context

    theirs = reference.Transformer.from_checkpoint(str(src), device="cpu")
    theirs = theirs.float()
    assert all(p.dtype == torch.float32 for p in theirs.parameters())
    with torch.no_grad():
        expected = theirs(torch.from_numpy(tokens)).numpy()
    assert expected.dtype == np.float32

    ours = np.asarray(forward(gptoss_jax.load(dst, dtype="float32"), jnp.asarray(tokens[None])))[0]
    assert ours.shape == expected.shape == (SEQ_LEN, CONFIG.vocab_size)
    error = np.abs(ours - expected).max()
    assert error < ATOL, f"max |logit difference| {error:.3g} vs OpenAI's reference (bound {ATOL})"

"""Training loss: masked next-token cross-entropy without ever holding [T, V] logits.

At gpt-oss's vocabulary (201088) the float32 logits of 4096 tokens are 3.3 GB, and their gradient as
much again. `cross_entropy` unembeds `chunk` tokens at a time in a scan whose body is rematerialized,
so the forward keeps only each chunk's loss and the backward recomputes one chunk's logits at a time:
peak memory is [chunk, V] whatever the sequence length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(
    h_BTH: jax.Array, unembedding_VH: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array, *, chunk: int = 256
) -> jax.Array:
    """Mean of `-log softmax(h · unembeddingᵀ)[target]` over the positions where `mask` is true.

    `h` is the model's final hidden state (`GptOss.hidden`) at the positions that predict `targets`;
    logits and the log-softmax are float32. A batch with no masked position has loss 0.
    """
    B, T, H = h_BTH.shape
    tokens = B * T
    chunk = min(chunk, tokens)  # a short batch is one chunk, not padded up to `chunk`
    pad = -tokens % chunk

    def chunks(x: jax.Array) -> jax.Array:
        x = x.reshape(tokens, *x.shape[2:])
        return jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)]).reshape(-1, chunk, *x.shape[1:])

    @jax.checkpoint  # the backward recomputes each chunk's logits rather than saving them all
    def one_chunk(total, xs):
        h_CH, targets_C, mask_C = xs
        logits_CV = jnp.einsum("ch,vh->cv", h_CH, unembedding_VH, preferred_element_type=jnp.float32)
        picked_C = jnp.take_along_axis(logits_CV, targets_C[:, None], axis=1)[:, 0]
        nll_C = jax.nn.logsumexp(logits_CV, axis=1) - picked_C
        return total + jnp.where(mask_C, nll_C, 0.0).sum(), None

    xs = (chunks(h_BTH), chunks(targets_BT.astype(jnp.int32)), chunks(mask_BT.astype(bool)))
    total, _ = jax.lax.scan(one_chunk, jnp.zeros((), jnp.float32), xs)
    return total / jnp.maximum(mask_BT.sum(), 1).astype(jnp.float32)


def next_token_loss_sum(model, tokens_BT: jax.Array, mask_BT: jax.Array, *, chunk: int = 256) -> tuple[jax.Array, jax.Array]:
    """Summed next-token loss of a `GptOss` over a batch's learned positions, and their count.

    Position t predicts token t + 1, which is learned where `mask[t + 1]`; sums (not means) let batches
    and micro-batches be added up before one division by the tokens learned.
    """
    learned = mask_BT[:, 1:]
    mean = cross_entropy(model.hidden(tokens_BT[:, :-1]), model.unembedding[...], tokens_BT[:, 1:], learned, chunk=chunk)
    return mean * learned.sum(), learned.sum()

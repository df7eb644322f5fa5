"""The train step: one jitted, donated, pjit-style update per global batch.

What is trained is a set of variables (`nnx.LoRAParam`s for LoRA, every `nnx.Param` for full
fine-tuning; packed MXFP4 experts are never parameters, so they stay frozen and packed). They are kept
as float32 master copies with float32 AdamW moments, cast to the model's dtype for each forward. A
step scans over micro-batches, summing each one's masked token losses and gradients, and divides by the
global batch's count of learned tokens: the update equals that of one big batch. Parameters, optimizer
state and the batch have their shardings pinned from `sharding.RULES`, so the step compiles once per
padded length; the optimizer state is also split over the data axis (ZeRO-1, `sharding.over_data`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from gptoss_jax import sharding
from gptoss_jax.finetune import data
from gptoss_jax.loss import next_token_loss_sum
from gptoss_jax.model import GptOss

METHODS = ("lora", "full")
BATCH_AXES = (None, "batch", None)  # [micro-batches, rows, tokens]


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """What a run does; saved with its checkpoints, and a resumed run must match it."""

    method: str = "lora"
    steps: int = 100
    global_batch: int = 16  # rows per optimizer step
    micro_batch: int = 4  # rows per data shard per forward (the global batch is accumulated over these)
    max_length: int = 4096
    lr: float = 2e-4
    warmup: float = 0.03  # fraction of the steps with a linear warmup from 0
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * this
    weight_decay: float = 0.0
    clip: float = 1.0  # global gradient-norm clip (0: none)
    seed: int = 0  # the data order
    bucket: int = 8  # global batches per length-sorted window of the data order (1: plain shuffle)
    loss_chunk: int = 256  # tokens unembedded at a time by the loss

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}")
        for name in ("steps", "global_batch", "micro_batch", "max_length", "loss_chunk", "bucket"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("lr", "warmup", "min_lr_ratio", "weight_decay", "clip"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        if self.warmup > 1 or self.min_lr_ratio > 1:
            raise ValueError("warmup and min_lr_ratio are fractions in [0, 1]")

    def rows_per_micro_batch(self, data_shards: int) -> int:
        rows = self.micro_batch * data_shards
        if self.global_batch % rows:
            raise ValueError(
                f"global batch {self.global_batch} is not divisible by data shards x micro-batch "
                f"({data_shards} x {self.micro_batch} = {rows})"
            )
        return rows

    def schedule(self) -> optax.Schedule:
        warmup = round(self.warmup * self.steps)
        return optax.warmup_cosine_decay_schedule(
            0.0, self.lr, warmup, max(self.steps, warmup + 1), end_value=self.lr * self.min_lr_ratio
        )

    def optimizer(self) -> optax.GradientTransformation:
        adamw = optax.adamw(self.schedule(), weight_decay=self.weight_decay)
        return optax.chain(optax.clip_by_global_norm(self.clip), adamw) if self.clip else adamw


class Trainer:
    """Trains `model` in place of its trainable variables; `fit` yields each step's metrics.

    With a `mesh`, the model must already be on it (`gptoss_jax.load(..., mesh=mesh)`); the batch is
    split over its data axis and each process builds only the rows its devices hold. While training,
    the trainable weights live in the trainer (float32 masters, donated to each step, so a float32
    model's own arrays are consumed by the first step); `model()` puts the current ones back.
    """

    def __init__(self, model: GptOss, config: TrainConfig, *, mesh: Mesh | None = None):
        self.config, self.mesh = config, mesh
        self.rows = config.rows_per_micro_batch(sharding.batch_shards(mesh) if mesh is not None else 1)
        wrt = nnx.LoRAParam if config.method == "lora" else nnx.Param
        self.graphdef, trainable, self.frozen = nnx.split(model, wrt, ...)
        if not jax.tree.leaves(trainable):
            raise ValueError("method 'lora' needs a model built with LoRA adapters (load(..., lora=LoraSpec(...)))")
        self._model = model
        self._dtypes = jax.tree.map(lambda x: x.dtype, trainable)
        self.params = jax.tree.map(lambda x: x.astype(jnp.float32), trainable)  # master copy
        self.optimizer = config.optimizer()
        self.opt_state = jax.jit(self.optimizer.init)(self.params)
        if mesh is not None:  # moments as their parameter and split over data (ZeRO-1); the step count replicated
            placements = optax.tree_map_params(
                self.optimizer, lambda moment, placement: sharding.over_data(placement, moment.shape), self.opt_state,
                self._shardings(trainable), transform_non_params=lambda _: NamedSharding(mesh, PartitionSpec()),
            )
            self.opt_state = jax.device_put(self.opt_state, placements)
        state_shardings = (self._shardings(trainable), jax.tree.map(lambda x: x.sharding, self.opt_state))
        self.batch_sharding = NamedSharding(mesh, sharding.spec(BATCH_AXES)) if mesh is not None else self._device()
        self._step = jax.jit(
            self._train_step,
            in_shardings=(*state_shardings, None, None, self.batch_sharding, self.batch_sharding),
            out_shardings=(*state_shardings, None),
            donate_argnums=(0, 1),
        )
        self._evaluate = jax.jit(self._evaluate_sums)
        self.step = 0

    def _device(self) -> SingleDeviceSharding:
        return SingleDeviceSharding(jax.local_devices()[0])

    def _shardings(self, state: nnx.State):
        """Each trainable variable's sharding, from its logical axes (one device without a mesh)."""
        if self.mesh is None:
            return jax.tree.map(lambda _: self._device(), state)
        return jax.tree.map(
            lambda v: v.replace(value=NamedSharding(self.mesh, sharding.variable_spec(v))),
            state, is_leaf=lambda x: isinstance(x, nnx.Variable),
        )

    def _loss_sum(self, params, frozen, tokens_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
        """Summed next-token loss over the learned positions of one micro-batch."""
        cast = jax.tree.map(lambda x, dtype: x.astype(dtype), params, self._dtypes)
        model = nnx.merge(self.graphdef, cast, frozen)
        return next_token_loss_sum(model, tokens_BT, mask_BT, chunk=self.config.loss_chunk)[0]

    def _train_step(self, params, opt_state, frozen, step, tokens_ABT, mask_ABT):
        def micro_batch(carry, batch):
            total, grads = carry
            loss, micro_grads = jax.value_and_grad(self._loss_sum)(params, frozen, *batch)
            return (total + loss, jax.tree.map(jnp.add, grads, micro_grads)), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        (total, grads), _ = jax.lax.scan(micro_batch, (jnp.zeros((), jnp.float32), zeros), (tokens_ABT, mask_ABT))
        learned = jnp.maximum(mask_ABT[:, :, 1:].sum(), 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g: g / learned, grads)
        updates, opt_state = self.optimizer.update(grads, opt_state, params)
        metrics = {"loss": total / learned, "grad_norm": optax.tree.norm(grads), "lr": self.config.schedule()(step)}
        return optax.apply_updates(params, updates), opt_state, metrics

    def batch(self, rows: Sequence[data.Example]) -> tuple[jax.Array, jax.Array]:
        """A global batch (`global_batch` examples) as `[micro-batches, rows, length]` tokens and mask on
        the batch sharding; each device's rows are padded (and so built) only by the process holding it."""
        shape = (self.config.global_batch // self.rows, self.rows, data.padded_length(rows, self.config.max_length))
        numbers = np.arange(self.config.global_batch).reshape(shape[:2])

        def piece(index: tuple[slice, ...], which: int) -> np.ndarray:
            picked = numbers[index[:2]]
            padded = data.pad([rows[i] for i in picked.ravel()], shape[2])[which]
            return padded.reshape(*picked.shape, shape[2])[..., index[2]]

        return tuple(
            jax.make_array_from_callback(shape, self.batch_sharding, lambda index, w=which: piece(index, w))
            for which in (0, 1)
        )

    def train_step(self, tokens: jax.Array, mask: jax.Array) -> dict[str, float]:
        """One optimizer step on a global batch from `batch`; returns loss, grad_norm and lr."""
        with sharding.use(self.mesh):
            self.params, self.opt_state, metrics = self._step(self.params, self.opt_state, self.frozen, self.step, tokens, mask)
        self.step += 1
        return {name: float(value) for name, value in metrics.items()}

    def fit(self, examples: Sequence[data.Example]) -> Iterator[dict[str, float]]:
        """Runs steps `self.step` .. `config.steps - 1`, yielding each step's metrics (with `step`, counted
        from 1, and `tokens`: the global batch's tokens without padding)."""
        lengths = [len(example.tokens) for example in examples]
        while self.step < self.config.steps:
            indices = data.step_indices(self.step, lengths, self.config.global_batch, self.config.seed, self.config.bucket)
            picked = [examples[i] for i in indices]
            metrics = self.train_step(*self.batch(picked))
            yield {"step": self.step, **metrics, "tokens": data.token_count(picked)}

    def evaluate(self, examples: Sequence[data.Example]) -> float:
        """Mean loss over the learned tokens of `examples`, in global batches (the last one padded)."""
        size, total, learned = self.config.global_batch, 0.0, 0
        for start in range(0, len(examples), size):
            rows = list(examples[start : start + size])
            rows += [data.EMPTY] * (size - len(rows))
            with sharding.use(self.mesh):
                loss_sum, count = self._evaluate(self.params, self.frozen, *self.batch(rows))
            total, learned = total + float(loss_sum), learned + int(count)
        return total / max(learned, 1)

    def _evaluate_sums(self, params, frozen, tokens_ABT, mask_ABT):
        losses = jax.lax.map(lambda batch: self._loss_sum(params, frozen, *batch), (tokens_ABT, mask_ABT))
        return losses.sum(), mask_ABT[:, :, 1:].sum()

    def model(self) -> GptOss:
        """The model with the trained weights (in the model's dtype), sharing the frozen ones."""
        nnx.update(self._model, jax.tree.map(lambda x, dtype: x.astype(dtype), self.params, self._dtypes))
        return self._model


"""A fine-tuning run's directory: what it is, what it measured, and checkpoints to resume it exactly.

    RUN/run.json         the run's settings (train config, LoRA, base checkpoint and its fingerprint, data)
    RUN/metrics.jsonl    one JSON line per step
    RUN/checkpoints/N/   Orbax, after step N: the trainable weights (float32 masters) and optimizer state

The data position is the step itself (`data.step_indices`), so a checkpoint plus the settings resume a
run exactly. Orbax commits each checkpoint atomically (a half-written one is never the latest), saves
asynchronously and keeps the last `keep`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from gptoss_jax.finetune.trainer import Trainer


class RunError(ValueError):
    """A run directory that cannot be used as asked (settings differ, or it exists and resuming was not asked)."""


def fingerprint(paths: list[Path]) -> str:
    """sha256 over the given files' bytes: a base checkpoint's marker and config, or a data file."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def write_atomically(path: Path, text: str) -> None:
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(text)
    os.replace(staging, path)


class Run:
    """Opens RUN for `settings`: new, or (with `resume`) the same run continued; anything else is a `RunError`."""

    def __init__(self, directory: str | Path, settings: dict[str, Any], *, keep: int = 3, resume: bool = False):
        self.directory = Path(directory).absolute()
        self.settings = json.loads(json.dumps(settings))  # as it reads back from run.json
        settings_file = self.directory / "run.json"
        if settings_file.exists():
            if not resume:
                raise RunError(f"{self.directory} already holds a run; pass --resume auto to continue it, or choose a new --out")
            stored = json.loads(settings_file.read_text())
            changed = sorted(k for k in {*stored, *self.settings} if stored.get(k) != self.settings.get(k))
            if changed:
                raise RunError(f"{self.directory} was started with other settings ({', '.join(changed)}); resume with the same ones or choose a new --out")
        if jax.process_count() > 1:  # every process has checked before process 0 writes
            multihost_utils.sync_global_devices("gptoss_jax.finetune: run.json checked")
        if jax.process_index() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            write_atomically(settings_file, json.dumps(self.settings, indent=2) + "\n")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self.directory / "checkpoints", options=options)
        self.metrics_file = self.directory / "metrics.jsonl"

    def restore(self, trainer: Trainer) -> int | None:
        """Loads the latest checkpoint into `trainer` (its step included); the step, or None if there is none.
        Metrics logged after that step (by a run that was then cut off) are dropped."""
        step = self.manager.latest_step()
        if step is None:
            return None
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _state(trainer))
        restored = self.manager.restore(step, args=ocp.args.StandardRestore(target))
        trainer.params, trainer.opt_state, trainer.step = restored["params"], restored["opt_state"], step
        if jax.process_index() == 0 and self.metrics_file.exists():
            kept = [line for line in self.metrics_file.read_text().splitlines() if json.loads(line)["step"] <= step]
            write_atomically(self.metrics_file, "".join(line + "\n" for line in kept))
        return step

    def save(self, trainer: Trainer) -> None:
        """Starts an asynchronous save of the trainer after its last step (a no-op if already saved)."""
        if self.manager.latest_step() != trainer.step:
            self.manager.save(trainer.step, args=ocp.args.StandardSave(_state(trainer)), force=True)

    def log(self, metrics: dict[str, float]) -> None:
        if jax.process_index() == 0:
            with self.metrics_file.open("a") as handle:
                handle.write(json.dumps(metrics) + "\n")

    def latest_saved(self) -> int | None:
        self.manager.wait_until_finished()
        return self.manager.latest_step()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _state(trainer: Trainer) -> dict[str, Any]:
    return {"params": trainer.params, "opt_state": trainer.opt_state}

"""Fine-tuning: chat data (`data`), the train step (`trainer`), run directories (`run`), the CLI and `export`."""

from gptoss_jax.finetune.export import export
from gptoss_jax.finetune.trainer import TrainConfig, Trainer

__all__ = ["TrainConfig", "Trainer", "export"]

"""`GptOssConfig`: the model's hyperparameters, its presets, and both published config.json layouts.

Field names follow OpenAI's `original/config.json` (SPEC section 1); `from_pretrained` also reads the
Hugging Face layout. Mesh, kernels, dtype and sampling settings are deliberately not model config.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from gptoss_jax.mxfp4 import BLOCK as MXFP4_BLOCK  # expert contraction axes must be multiples of it

MAX_LAYERS = 1024  # a sanity bound: a corrupt config could otherwise ask for a model of any depth


@dataclasses.dataclass(frozen=True, kw_only=True)
class GptOssConfig:
    """Hyperparameters of a gpt-oss model. Every field is read by the model code."""

    num_hidden_layers: int
    num_experts: int
    experts_per_token: int
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    head_dim: int
    num_attention_heads: int
    num_key_value_heads: int
    sliding_window: int  # keys visible to a query on sliding layers, itself included
    initial_context_length: int  # YaRN's pre-extension context
    rope_theta: float
    rope_scaling_factor: float
    rope_ntk_alpha: float  # YaRN beta_slow: sets the high cut
    rope_ntk_beta: float  # YaRN beta_fast: sets the low cut
    swiglu_limit: float
    swiglu_alpha: float = 1.702
    rms_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if field.type == "int" and not (number and isinstance(value, int) and value > 0):
                raise ValueError(f"{field.name} must be a positive integer, got {value!r}")
            if field.type == "float" and not (number and math.isfinite(value) and value > 0):
                raise ValueError(f"{field.name} must be a finite positive number, got {value!r}")
        if self.num_hidden_layers > MAX_LAYERS:  # refused before anything is built for that many layers
            raise ValueError(f"num_hidden_layers={self.num_hidden_layers} exceeds {MAX_LAYERS} (gpt-oss-120b has 36)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.experts_per_token > self.num_experts:
            raise ValueError(f"experts_per_token={self.experts_per_token} exceeds num_experts={self.num_experts}")
        for name in ("hidden_size", "intermediate_size"):
            if getattr(self, name) % MXFP4_BLOCK:
                raise ValueError(f"{name}={getattr(self, name)} must be a multiple of {MXFP4_BLOCK} for MXFP4 experts")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for the half-split rotary embedding")
        if self.rope_scaling_factor < 1:
            raise ValueError(f"rope_scaling_factor={self.rope_scaling_factor} must be at least 1 (YaRN extends context)")
        if self.rope_ntk_beta <= self.rope_ntk_alpha:
            raise ValueError(
                f"rope_ntk_beta={self.rope_ntk_beta} must exceed rope_ntk_alpha={self.rope_ntk_alpha} "
                "(YaRN's low cut must lie below its high cut)"
            )

    # Derived quantities -------------------------------------------------------------------------

    @property
    def q_per_kv(self) -> int:
        """G: query heads sharing one KV head."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def max_context(self) -> int:
        """Longest context YaRN was extended to (131072 for the published models)."""
        return int(self.initial_context_length * self.rope_scaling_factor)

    def is_sliding(self, layer: int) -> bool:
        """Even layers (0, 2, ...) use the sliding window; odd layers attend to the full context."""
        return layer % 2 == 0

    # Presets --------------------------------------------------------------------------------------

    @classmethod
    def gpt_oss_20b(cls) -> GptOssConfig:
        return cls(**_PUBLISHED)

    @classmethod
    def gpt_oss_120b(cls) -> GptOssConfig:
        return cls(**{**_PUBLISHED, "num_hidden_layers": 36, "num_experts": 128})

    @classmethod
    def tiny(cls) -> GptOssConfig:
        """A few layers with every width distinct, the real vocabulary, and a short YaRN base context."""
        return cls(
            **{
                **_PUBLISHED,
                "num_hidden_layers": 4,
                "num_experts": 5,
                "experts_per_token": 2,
                "hidden_size": 96,
                "intermediate_size": 64,
                "head_dim": 16,
                "num_attention_heads": 6,
                "num_key_value_heads": 2,
                "sliding_window": 8,
                "initial_context_length": 32,
            }
        )

    @classmethod
    def from_preset(cls, name: str) -> GptOssConfig:
        presets = {"gpt-oss-20b": cls.gpt_oss_20b, "gpt-oss-120b": cls.gpt_oss_120b, "tiny": cls.tiny}
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(presets)}")
        return presets[name]()

    # config.json, both layouts ------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | Path) -> GptOssConfig:
        """Reads a config.json (or a folder holding one) in the HF or the `original/` layout."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(raw).__name__}")
        try:
            return cls.from_dict(raw)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> GptOssConfig:
        """Builds a config from a parsed config.json of either layout; unknown or missing keys are errors."""
        is_hf = "model_type" in raw or "num_local_experts" in raw
        values = _from_hf(raw) if is_hf else dict(raw)
        names = {field.name for field in dataclasses.fields(cls)}
        if unknown := sorted(set(values) - names):
            raise ValueError(f"unknown config keys {unknown}")
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        if missing := sorted(required - set(values)):
            raise ValueError(f"missing config keys {missing}")
        return cls(**values)

    def to_original_dict(self) -> dict[str, Any]:
        """The `original/config.json` layout. The published files omit `swiglu_alpha` and `rms_norm_eps`
        (OpenAI's reference hard-codes them), so they are written only when they differ from those values."""
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.default is not dataclasses.MISSING}
        return {key: value for key, value in dataclasses.asdict(self).items() if defaults.get(key, dataclasses.MISSING) != value}

    def to_hf_dict(self) -> dict[str, Any]:
        """The Hugging Face `config.json` layout (without `quantization_config`)."""
        hf = {hf_key: getattr(self, key) for hf_key, key in _HF_RENAMES.items()}
        hf |= {key: getattr(self, key) for key in _SHARED_KEYS}
        return hf | {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "attention_bias": True,
            "tie_word_embeddings": False,
            "max_position_embeddings": self.max_context,
            "layer_types": self._layer_types(),
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": self.rope_scaling_factor,
                "beta_fast": self.rope_ntk_beta,
                "beta_slow": self.rope_ntk_alpha,
                "original_max_position_embeddings": self.initial_context_length,
                "truncate": False,
            },
        }

    def _layer_types(self) -> list[str]:
        return [
            "sliding_attention" if self.is_sliding(i) else "full_attention" for i in range(self.num_hidden_layers)
        ]


_PUBLISHED: dict[str, Any] = {
    "num_hidden_layers": 24,
    "num_experts": 32,
    "experts_per_token": 4,
    "vocab_size": 201088,
    "hidden_size": 2880,
    "intermediate_size": 2880,
    "head_dim": 64,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "sliding_window": 128,
    "initial_context_length": 4096,
    "rope_theta": 150000.0,
    "rope_scaling_factor": 32.0,
    "rope_ntk_alpha": 1.0,
    "rope_ntk_beta": 32.0,
    "swiglu_limit": 7.0,
}

# Keys spelled the same in both layouts.
_SHARED_KEYS = (
    "num_hidden_layers",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "head_dim",
    "num_attention_heads",
    "num_key_value_heads",
    "sliding_window",
    "initial_context_length",
    "rope_theta",
    "swiglu_limit",
    "swiglu_alpha",
    "rms_norm_eps",
)
# HF name -> our name, for keys that differ (rope keys live in the nested rope dict).
_HF_RENAMES = {"num_local_experts": "num_experts", "num_experts_per_tok": "experts_per_token"}
_HF_ROPE_RENAMES = {
    "factor": "rope_scaling_factor",
    "beta_fast": "rope_ntk_beta",
    "beta_slow": "rope_ntk_alpha",
    "original_max_position_embeddings": "initial_context_length",
    "rope_theta": "rope_theta",  # transformers >= 5 saves it inside rope_parameters
}
# HF keys that do not change inference math (training, generation or bookkeeping settings).
_HF_IGNORED = {
    "architectures",
    "model_type",
    "attention_dropout",
    "hidden_act",
    "initializer_range",
    "output_router_logits",
    "router_aux_loss_coef",
    "use_cache",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "quantization_config",
    "max_position_embeddings",
    "experts_per_token",  # the shipped file repeats num_experts_per_tok under this name
}


def _from_hf(raw: dict[str, Any]) -> dict[str, Any]:
    """Translates an HF config.json into our field names, rejecting settings the model does not have."""
    raw = dict(raw)
    rope = raw.pop("rope_scaling", None) or raw.pop("rope_parameters", None) or {}
    raw.pop("rope_parameters", None)
    if not isinstance(rope, dict) or rope.get("rope_type", "yarn") != "yarn" or rope.get("truncate", False):
        raise ValueError(f"rope_scaling must be untruncated YaRN, got {rope}")
    if raw.pop("attention_bias", True) is not True:
        raise ValueError("attention_bias must be true: gpt-oss attention has biases")
    if raw.pop("tie_word_embeddings", False) is not False:
        raise ValueError("tie_word_embeddings must be false: gpt-oss has a separate unembedding")
    layer_types = raw.pop("layer_types", None)
    values = {ours: rope[theirs] for theirs, ours in _HF_ROPE_RENAMES.items() if theirs in rope}
    for key, value in raw.items():
        if key in _HF_RENAMES:
            values[_HF_RENAMES[key]] = value
        elif key not in _HF_IGNORED:
            values[key] = value
    if layer_types is not None:
        layers = values.get("num_hidden_layers", len(layer_types))
        expected = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
        if list(layer_types) != expected:
            raise ValueError("layer_types must alternate sliding/full starting with sliding, as gpt-oss does")
    for key in ("rope_theta", "rope_scaling_factor", "rope_ntk_alpha", "rope_ntk_beta", "swiglu_limit"):
        if isinstance(values.get(key), int):
            values[key] = float(values[key])
    return values

import dataclasses
import json

import pytest

from gptoss_jax import GptOssConfig

# The shipped openai/gpt-oss-20b config.json (SPEC section 1), key for key.
HF_20B = {
    "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
    "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880,
    "initial_context_length": 4096, "initializer_range": 0.02, "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 12, "max_position_embeddings": 131072,
    "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 24,
    "num_key_value_heads": 8, "num_local_experts": 32, "output_router_logits": False, "pad_token_id": 199999,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                     "rope_type": "yarn", "truncate": False},
    "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
    "tie_word_embeddings": False, "transformers_version": "4.55.0.dev0", "use_cache": True, "vocab_size": 201088,
    "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                       "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
}
ORIGINAL_20B = {
    "num_hidden_layers": 24, "num_experts": 32, "experts_per_token": 4, "vocab_size": 201088, "hidden_size": 2880,
    "intermediate_size": 2880, "swiglu_limit": 7.0, "head_dim": 64, "num_attention_heads": 64,
    "num_key_value_heads": 8, "sliding_window": 128, "initial_context_length": 4096, "rope_theta": 150000,
    "rope_scaling_factor": 32.0, "rope_ntk_alpha": 1, "rope_ntk_beta": 32,
}


@pytest.mark.parametrize("raw", [HF_20B, ORIGINAL_20B], ids=["hf", "original"])
def test_published_config_files_give_the_20b_preset(tmp_path, raw):
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert GptOssConfig.from_pretrained(tmp_path) == GptOssConfig.from_preset("gpt-oss-20b")


def test_120b_preset():
    config = GptOssConfig.from_preset("gpt-oss-120b")
    assert (config.num_hidden_layers, config.num_experts) == (36, 128)
    assert config.max_context == 131072


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_written_config_reads_back(layout):
    config = dataclasses.replace(GptOssConfig.tiny(), swiglu_alpha=1.5, rms_norm_eps=1e-6, rope_theta=1e4)
    raw = config.to_hf_dict() if layout == "hf" else config.to_original_dict()
    assert GptOssConfig.from_dict(json.loads(json.dumps(raw))) == config


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(num_attention_heads=6, num_key_value_heads=4), "not divisible by num_key_value_heads"),
        (dict(experts_per_token=9, num_experts=8), "exceeds num_experts"),
        (dict(hidden_size=100), "multiple of 32"),
        (dict(intermediate_size=48), "multiple of 32"),
        (dict(head_dim=15), "even"),
        (dict(sliding_window=0), "positive"),
        (dict(num_hidden_layers=2.5), "integer"),
        (dict(rope_ntk_alpha=64.0), "must exceed rope_ntk_alpha"),
    ],
)
def test_invalid_configs_are_clear_errors(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(GptOssConfig.tiny(), **change)


def test_unknown_and_missing_keys(tmp_path):
    with pytest.raises(ValueError, match="unknown config keys.*'mystery'"):
        GptOssConfig.from_dict({**ORIGINAL_20B, "mystery": 1})
    missing = dict(ORIGINAL_20B)
    del missing["num_experts"]
    with pytest.raises(ValueError, match="missing config keys.*num_experts"):
        GptOssConfig.from_dict(missing)
    with pytest.raises(ValueError, match="layer_types"):
        GptOssConfig.from_dict({**HF_20B, "layer_types": ["full_attention"] * 24})
    with pytest.raises(ValueError, match="YaRN"):
        GptOssConfig.from_dict({**HF_20B, "rope_scaling": {**HF_20B["rope_scaling"], "truncate": True}})
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        GptOssConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unknown preset"):
        GptOssConfig.from_preset("gpt-oss-7b")

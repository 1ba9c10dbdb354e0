"""config.json as the releases write it: the Hugging Face layout's and openai's original/ one.

The exporter writes the first; the test tooling (:mod:`mlx_gptoss.testing`) writes both for random
checkpoints.
"""

from __future__ import annotations

from mlx_gptoss.config import GptOssConfig


def hf_config_dict(cfg: GptOssConfig, dense: bool = False) -> dict:
    """config.json as the release writes it."""
    d = {
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_local_experts": cfg.num_local_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "experts_per_token": cfg.num_experts_per_tok,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "head_dim": cfg.head_dim,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "sliding_window": cfg.sliding_window,
        "layer_types": list(cfg.layer_types),
        "rope_theta": cfg.rope_theta,
        "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                         "original_max_position_embeddings": 4096, "truncate": False},
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "swiglu_limit": cfg.swiglu_limit,
        "attention_bias": True,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.9,
        "use_cache": True,
        # The release's ids; tiny test vocabularies have no room for them.
        "eos_token_id": 200002 if cfg.vocab_size > 200002 else None,
        "pad_token_id": 199999 if cfg.vocab_size > 199999 else None,
        "torch_dtype": "bfloat16",
    }  # fmt: skip
    if cfg.rope_scaling is not None:
        r = cfg.rope_scaling
        d["rope_scaling"] = {"rope_type": "yarn", "factor": r.factor, "beta_fast": r.beta_fast, "beta_slow": r.beta_slow,
                             "original_max_position_embeddings": r.original_max_position_embeddings, "truncate": r.truncate}  # fmt: skip
    if not dense:
        d["quantization_config"] = {
            "quant_method": "mxfp4",
            "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"],
        }
    return d


def original_config_dict(cfg: GptOssConfig) -> dict:
    r = cfg.rope_scaling
    return {
        "num_hidden_layers": cfg.num_hidden_layers, "num_experts": cfg.num_local_experts,
        "experts_per_token": cfg.num_experts_per_tok, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "swiglu_limit": cfg.swiglu_limit, "head_dim": cfg.head_dim,
        "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
        "sliding_window": cfg.sliding_window, "initial_context_length": r.original_max_position_embeddings,
        "rope_theta": cfg.rope_theta, "rope_scaling_factor": r.factor, "rope_ntk_alpha": r.beta_slow,
        "rope_ntk_beta": r.beta_fast,
    }  # fmt: skip

"""Model presets: the published DeepSeek shapes (docs/deepseek.md, Presets) and small ones.

Each function returns a validated `ModelConfig`; `configs/*.py` wrap them into run configs.
"""

import dataclasses


from deepjax.model.config import ModelConfig, RopeScaling

PRESETS = ("deepseek_v3", "deepseek_v2", "deepseek_v2_lite", "bench", "tiny")

_V2_YARN = RopeScaling(factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0,
                       beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707)


def _checked(cfg: ModelConfig) -> ModelConfig:
    cfg.validate()
    return cfg


def deepseek_v3() -> ModelConfig:
    """DeepSeek-V3 / R1, 671B (the ModelConfig defaults are exactly this model)."""
    return _checked(ModelConfig())


def deepseek_v2() -> ModelConfig:
    """DeepSeek-V2, 236B: softmax router, group-limited greedy (group max), x16 scaling."""
    return _checked(ModelConfig(
        vocab_size=102400, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
        num_hidden_layers=60, first_k_dense_replace=1, num_attention_heads=128, q_lora_rank=1536,
        n_routed_experts=160, n_shared_experts=2, num_experts_per_tok=6, n_group=8, topk_group=3,
        topk_method="group_limited_greedy", scoring_func="softmax", norm_topk_prob=False,
        routed_scaling_factor=16.0, rope_scaling=_V2_YARN, num_nextn_predict_layers=0,
        bos_token_id=100000, eos_token_id=100001))


def deepseek_v2_lite() -> ModelConfig:
    """DeepSeek-V2-Lite, 16B: no query compression, plain greedy softmax top-6."""
    return _checked(dataclasses.replace(
        deepseek_v2(), hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, q_lora_rank=None, n_routed_experts=64,
        n_group=1, topk_group=1, topk_method="greedy", routed_scaling_factor=1.0))


def bench() -> ModelConfig:
    """The benchmark shape of bench/anchors/hf_deepseek_v3.py (1.25B params, 215M matmul-active per token)."""
    return _checked(ModelConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
        num_hidden_layers=12, first_k_dense_replace=1, num_attention_heads=16, q_lora_rank=384,
        kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=8, topk_group=4,
        topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
        routed_scaling_factor=2.5, rope_theta=10000.0, rope_scaling=None,
        max_position_embeddings=4096, num_nextn_predict_layers=0, initializer_range=0.02))


def tiny() -> ModelConfig:
    """A V3-shaped model that runs in seconds on a CPU (every code path: q_lora, groups, YaRN, MTP)."""
    return _checked(ModelConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=32,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
        rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=256),
        max_position_embeddings=1024, num_nextn_predict_layers=1, initializer_range=0.02))

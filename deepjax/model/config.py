"""The model's config: `ModelConfig`, whose fields carry the names of DeepSeek's `config.json` (a released config
maps field for field: `ModelConfig.from_hf` / `to_hf`), and `RopeScaling` (YaRN). Derived values are properties,
never extra fields. `ModelConfig.validate` decides what a valid model is; every error names the field and value.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Optional

from deepjax.schema import ConfigError, bad, check_finite, check_types, checker, coerce

SCORING_FUNCS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
DTYPES = ("float32", "bfloat16", "float16")
LAYER_LOOPS = ("auto", "scan", "python")
REMAT_POLICIES = ("none", "full", "save_dots", "save_outputs", "save_experts")
KERNELS = ("auto", "xla", "tokamax")
# ModelConfig.attention: the causal attention's implementation (deepjax/model/ops.py); auto: what `kernels` picks
ATTENTION_KERNELS = ("auto", "xla", "tokamax", "cudnn")
# deepjax's own ModelConfig fields, how it runs the model rather than what the model is: an HF config.json does not
# carry them (`ModelConfig.to_hf`, deepjax.train.convert).
LOCAL_FIELDS = ("dtype", "param_dtype", "remat", "layer_loop", "kernels", "attention", "capacity_factor")
ROPE_TYPES = ("yarn",)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """YaRN parameters (DeepSeek's `rope_scaling`)."""

    type: str = "yarn"
    factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0

    def validate(self, prefix: str = "model.rope_scaling.") -> None:
        if self.type not in ROPE_TYPES:
            raise bad(f"{prefix}type", self.type, f"unknown; choose from {ROPE_TYPES}")
        for f in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow"):
            if not getattr(self, f) > 0:
                raise bad(prefix + f, getattr(self, f), "must be positive")
        for f in ("mscale", "mscale_all_dim"):
            if getattr(self, f) < 0:
                raise bad(prefix + f, getattr(self, f), "must be >= 0")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The MoE-MLA transformer. Field names and meanings follow DeepSeek's config.json."""

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3
    num_attention_heads: int = 128
    q_lora_rank: Optional[int] = 1536  # None: plain q_proj (V2-Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = RopeScaling()
    rms_norm_eps: float = 1e-6
    num_nextn_predict_layers: int = 1
    max_position_embeddings: int = 163840
    tie_word_embeddings: bool = False
    bos_token_id: int = 0
    eos_token_id: int = 1
    # deepjax-only fields (not in DeepSeek's config.json)
    initializer_range: float = 0.006  # V3 paper section 4.2 (the released configs say 0.02)
    dtype: str = "float32"  # activations and matmul inputs
    param_dtype: str = "float32"
    remat: str = "none"  # per-layer rematerialization, REMAT_POLICIES (transformer.remat_policy)
    layer_loop: str = "auto"  # training's loop over each layer stack, LAYER_LOOPS (transformer.python_layer_loop)
    kernels: str = "auto"  # attention / grouped-matmul implementation: auto | xla | tokamax (deepjax/model/ops.py)
    attention: str = "auto"  # causal attention alone, ATTENTION_KERNELS: auto (= kernels) | xla | tokamax | cudnn
    capacity_factor: Optional[float] = None  # None: dropless MoE; c: expert-parallel slots = c x balanced load

    # ---- derived values ---------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_dense_layers(self) -> int:
        return self.first_k_dense_replace

    @property
    def n_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    @property
    def softmax_scale(self) -> float:
        """(qk_nope + qk_rope)^-0.5 x mscale^2, mscale = 0.1 mscale_all_dim ln(factor) + 1 (YaRN, as HF)."""
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs is not None and rs.mscale_all_dim:
            m = yarn_mscale(rs.factor, rs.mscale_all_dim)
            scale *= m * m
        return scale

    # ---- validation -------------------------------------------------------------------------
    def validate(self) -> None:
        """Raises ConfigError naming the first invalid field and its value."""
        m = self
        check_types(m, "model.")

        fail = checker(m, "model")

        for f in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                  "num_hidden_layers", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
                  "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "num_experts_per_tok",
                  "n_group", "topk_group", "max_position_embeddings"):
            if getattr(m, f) <= 0:
                fail(f, "must be positive")
        for f in ("n_shared_experts", "num_nextn_predict_layers", "first_k_dense_replace"):
            if getattr(m, f) < 0:
                fail(f, "must be >= 0")
        for f in ("rms_norm_eps", "rope_theta", "routed_scaling_factor", "initializer_range"):
            if not getattr(m, f) > 0:
                fail(f, "must be positive")
        if m.q_lora_rank is not None and m.q_lora_rank <= 0:
            fail("q_lora_rank", "must be positive, or None for a plain q projection")
        if m.first_k_dense_replace > m.num_hidden_layers:
            fail("first_k_dense_replace", f"exceeds num_hidden_layers={m.num_hidden_layers}")
        if m.num_experts_per_tok > m.n_routed_experts:
            fail("num_experts_per_tok", f"exceeds n_routed_experts={m.n_routed_experts}")
        if m.n_routed_experts % m.n_group:
            fail("n_routed_experts", f"not divisible by n_group={m.n_group}")
        if m.topk_group > m.n_group:
            fail("topk_group", f"exceeds n_group={m.n_group}")
        if m.scoring_func not in SCORING_FUNCS:
            fail("scoring_func", f"unknown; choose from {SCORING_FUNCS}")
        if m.topk_method not in TOPK_METHODS:
            fail("topk_method", f"unknown; choose from {TOPK_METHODS}")
        if m.topk_method != "greedy":
            per_group = m.n_routed_experts // m.n_group
            if m.topk_group * per_group < m.num_experts_per_tok:
                fail("topk_group", f"kept groups hold {m.topk_group * per_group} experts "
                                  f"< num_experts_per_tok={m.num_experts_per_tok}")
            if m.topk_method == "noaux_tc" and per_group < 2:
                fail("n_group", "noaux_tc scores a group by its top-2 experts: needs >= 2 experts per group")
        if m.qk_rope_head_dim % 2:
            fail("qk_rope_head_dim", "must be even (rope rotates pairs)")
        for f in ("dtype", "param_dtype"):
            if getattr(m, f) not in DTYPES:
                fail(f, f"unknown; choose from {DTYPES}")
        if m.capacity_factor is not None and not m.capacity_factor > 0:
            fail("capacity_factor", "must be positive, or None for dropless")
        if m.remat not in REMAT_POLICIES:
            fail("remat", f"unknown; choose from {REMAT_POLICIES}")
        if m.kernels not in KERNELS:
            fail("kernels", f"unknown; choose from {KERNELS}")
        if m.attention not in ATTENTION_KERNELS:
            fail("attention", f"unknown; choose from {ATTENTION_KERNELS}")
        if m.layer_loop not in LAYER_LOOPS:
            fail("layer_loop", f"unknown; choose from {LAYER_LOOPS}")
        if m.rope_scaling is not None:
            m.rope_scaling.validate()
        check_finite(m, "model.")  # last: an inf passes "must be positive" (initializer_range=inf)

    # ---- HF config.json ---------------------------------------------------------------------
    @classmethod
    def from_hf(cls, src: str | os.PathLike | dict, **overrides: Any) -> "ModelConfig":
        """Builds a config from an HF / DeepSeek `config.json` (a path, a directory or a dict)."""
        if not isinstance(src, dict):
            path = os.path.join(src, "config.json") if os.path.isdir(src) else src
            with open(path) as f:
                src = json.load(f)
        d = dict(src)
        model_type = d.get("model_type", "deepseek_v3")
        if model_type not in ("deepseek_v3", "deepseek_v2"):
            raise ConfigError(f"model_type: {model_type!r} is not a DeepSeek V2/V3 config")
        is_v3 = model_type == "deepseek_v3"
        kw: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in d and f.name not in ("rope_scaling", "dtype"):
                kw[f.name] = d[f.name]
        # HF's V3 class has no scoring_func / topk_method (fixed to sigmoid / noaux_tc); V2 is softmax.
        kw.setdefault("scoring_func", "sigmoid" if is_v3 else "softmax")
        kw.setdefault("topk_method", "noaux_tc" if is_v3 else "greedy")
        if not is_v3:
            kw.setdefault("num_nextn_predict_layers", 0)
        for k in ("n_group", "topk_group"):
            if kw.get(k) is None:
                kw[k] = 1
        rope = d.get("rope_scaling") or d.get("rope_parameters")
        if rope and "rope_theta" in rope:
            kw["rope_theta"] = rope["rope_theta"]
        rtype = (rope or {}).get("rope_type", (rope or {}).get("type", "default"))
        if rope and rtype != "default":
            rdef = RopeScaling()
            kw["rope_scaling"] = RopeScaling(
                type=rtype,
                factor=rope.get("factor", rdef.factor),
                original_max_position_embeddings=rope.get(
                    "original_max_position_embeddings", rdef.original_max_position_embeddings),
                beta_fast=rope.get("beta_fast") or 32.0,
                beta_slow=rope.get("beta_slow") or 1.0,
                mscale=rope.get("mscale") or 0.0,
                mscale_all_dim=rope.get("mscale_all_dim") or 0.0,
            )
        else:
            kw["rope_scaling"] = None
        for k in ("bos_token_id", "eos_token_id"):
            if isinstance(kw.get(k), list):
                kw[k] = kw[k][0]
            if kw.get(k) is None:
                kw.pop(k, None)
        kw = {k: coerce(cls, k, v) for k, v in kw.items()}
        cfg = dataclasses.replace(cls(), **{**kw, **overrides})  # overrides win over the file
        cfg.validate()
        return cfg

    def to_hf(self) -> dict:
        """The `config.json` dict for DeepseekV3ForCausalLM / DeepseekV2ForCausalLM (DeepSeek's field names)."""
        is_v3 = self.scoring_func == "sigmoid"
        d = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in LOCAL_FIELDS + ("rope_scaling",)
        }
        d["rope_scaling"] = None if self.rope_scaling is None else dataclasses.asdict(self.rope_scaling)
        d["model_type"] = "deepseek_v3" if is_v3 else "deepseek_v2"
        d["architectures"] = ["DeepseekV3ForCausalLM" if is_v3 else "DeepseekV2ForCausalLM"]
        d["num_key_value_heads"] = self.num_attention_heads
        d["hidden_act"] = "silu"
        d["attention_bias"] = False
        d["torch_dtype"] = self.param_dtype
        return d


def yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0

"""Typed configs, command-line overrides and validation (in one place).

Model fields carry the names of DeepSeek's `config.json`, so a released config maps field for field
(`ModelConfig.from_hf`). Derived values are properties, never extra fields.

A run config is a Python file defining `get_config() -> Config` (see `configs/`), or a preset name
(`tiny`, `bench`, `deepseek_v3`, ...). Any field can be overridden on the command line:

    --config.model.n_routed_experts=8 --config.model.rope_scaling.factor=10 --config.model.q_lora_rank=none

`validate` is the only place that decides what a valid config is; every error names the field and value.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import types
import typing
from typing import Any, Optional, Sequence

SCORING_FUNCS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "save_dots")
ROPE_TYPES = ("yarn",)


class ConfigError(ValueError):
    """A config field has an invalid value; the message names the field and the value."""


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
    remat: str = "none"  # per-layer rematerialization: none | full | save_dots
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
        kw = {k: _coerce(cls, k, v) for k, v in kw.items()}
        cfg = dataclasses.replace(cls(), **{**kw, **overrides})  # overrides win over the file
        validate_model(cfg)
        return cfg

    def to_hf(self) -> dict:
        """The `config.json` dict for DeepseekV3ForCausalLM / DeepseekV2ForCausalLM (DeepSeek's field names)."""
        is_v3 = self.scoring_func == "sigmoid"
        d = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("dtype", "param_dtype", "remat", "capacity_factor", "rope_scaling")
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


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; one of them may be -1 (fill with the remaining devices). See deepjax/sharding.py."""

    data: int = 1
    fsdp: int = -1
    expert: int = 1
    tensor: int = 1
    dcn_data: int = 1  # slices (multi-slice pods): multiplies the data axis over DCN
    rules: str = "fsdp_expert_tensor"


DATA_SOURCES = ("arithmetic", "countdown", "jsonl_math", "text")
DATA_MODES = ("pretrain", "sft")
SCHEDULES = ("constant", "warmup_cosine", "deepseek_v3")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What the model is trained on (deepjax/datasets.py builds it as TFDS, deepjax/pipeline.py reads it)."""

    source: str = "arithmetic"  # arithmetic | countdown (generated from seed) | jsonl_math | text (local files)
    path: Optional[str] = None  # jsonl_math: JSONL file(s); text: text file(s); comma-separated, globs allowed
    data_dir: Optional[str] = None  # TFDS data_dir; None: <workdir>/tfds
    split: str = "train"
    mode: str = "sft"  # pretrain: every token is a target | sft: completion tokens only
    template: str = "r1"  # prompt template for question/answer sources: r1 (DEEPSEEK.md section 7) | plain
    tokenizer: str = "byte"  # byte (built in) or a path to an HF tokenizer.json
    seq_len: int = 128  # packed sequence length
    global_batch: int = 16  # packed sequences per optimizer step, over all hosts
    seed: int = 0  # shuffle seed (deterministic order)
    num_train: int = 20000  # generated tasks: examples in the train split
    num_test: int = 500  # generated tasks: examples in the test split
    task_seed: int = 0  # generated tasks: the seed they are generated from
    max_digits: int = 4  # arithmetic: digits per operand (1-9; * is capped at 3 x 2 digits)
    ops: str = "+-*"  # arithmetic: the operators drawn from
    # Share of SFT completions written free-form ("... The answer is 12.", no <answer> tags, so never rewarded),
    # drawn afresh per example each epoch: a base that computes the answer but states it in a checkable form only
    # part of the time, like a base model pretrained on web text (the weak base of the R1-Zero job).
    freeform_share: float = 0.0
    worker_count: int = 0  # Grain worker processes (0: in-process)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW and the learning-rate schedule (DEEPSEEK.md section 5)."""

    lr: float = 1e-3  # peak learning rate
    schedule: str = "warmup_cosine"  # constant | warmup_cosine | deepseek_v3
    warmup_steps: int = 20
    # deepseek_v3: warmup -> constant until constant_steps -> cosine to lr*final_ratio over decay_steps
    # -> lr*final_ratio, then lr*tail_ratio for the last tail_steps (V3: 2.2e-4 -> 2.2e-5 -> 7.3e-6)
    constant_steps: int = 0
    decay_steps: int = 0
    final_ratio: float = 0.1  # warmup_cosine decays to lr*final_ratio at the last step
    tail_ratio: float = 0.0331  # deepseek_v3 only: 7.3e-6 / 2.2e-4
    tail_steps: int = 0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # matrices only
    clip_norm: float = 1.0  # global-norm clipping
    micro_batches: int = 1  # gradient accumulation: the global batch is split this many ways


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The training loop: losses, balancing, checkpoints, logging."""

    steps: int = 200
    mtp_lambda: float = 0.3  # lambda: weight of the MTP loss (V3: 0.3, then 0.1)
    balance_alpha: float = 1e-4  # alpha: sequence-wise balance loss weight (V3: 1e-4)
    bias_update_speed: float = 1e-3  # gamma: aux-loss-free bias update speed (V3: 0.001; 0 = off)
    max_nonfinite: int = 3  # stop after this many non-finite steps in a row
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    fallback_on_damage: bool = False  # on a damaged latest checkpoint: restore the previous good one
    peak_tflops: Optional[float] = None  # per-device peak for MFU; None: guessed from the device kind
    plot: bool = True  # write loss / MaxVio PNG at the end


RL_AGGREGATIONS = ("grpo", "dapo", "dr_grpo")
RL_ADVANTAGE_NORMS = ("std", "mean")


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """GRPO (`deepjax grpo`, deepjax/grpo_run.py; DEEPSEEK.md sections 6-7). Prompts come from data.source's train
    split; the optimizer is `optim` with rl.lr as its peak when set (its schedule over rl.steps x rl.mu updates);
    checkpoints, logging and the non-finite guard follow `train` (checkpoint_every counts GRPO steps)."""

    init_from: Optional[str] = None  # run directory (train or grpo) whose checkpoint is the initial policy; None: init
    init_step: Optional[int] = None  # its checkpoint step; None: the newest
    steps: int = 100  # GRPO steps, each one batch of rollouts and mu optimizer updates
    prompts_per_step: int = 16  # prompts per step over all hosts (R1-Zero: 32)
    group_size: int = 8  # G: outputs per prompt (R1-Zero: 16)
    mu: int = 1  # optimizer updates per batch of rollouts
    max_new_tokens: int = 32
    temperature: float = 1.0  # rollout temperature (R1-Zero: 1)
    top_p: float = 1.0
    top_k: int = 0
    eps_low: float = 0.2  # clip epsilon
    eps_high: Optional[float] = None  # clip-higher (DAPO 0.28); None: eps_low
    beta: float = 0.001  # KL coefficient (R1-Zero 0.001); 0: no reference model is held or run
    aggregation: str = "grpo"  # grpo | dapo | dr_grpo
    advantage_norm: str = "std"  # std (GRPO) | mean (Dr. GRPO)
    max_log_ratio: float = 20.0
    ref_refresh_every: int = 0  # copy the policy into the reference every N steps; 0: never
    reward_accuracy: float = 1.0  # reward weights (deepjax/rewards.py RewardConfig)
    reward_format: float = 0.1
    reward_language: float = 0.0
    eval_every: int = 0  # held-out evaluation every N steps (and at the last); 0: only at the last step
    eval_problems: int = 64
    eval_k: int = 4
    eval_temperature: float = 0.6  # as R1's evaluation
    eval_top_p: float = 0.95
    bias_update_speed: float = 0.0  # gamma of the aux-loss-free bias rule on rollout loads; 0: biases frozen
    lr: Optional[float] = None  # GRPO's peak learning rate; None: optim.lr (the rest of `optim` applies as is)


@dataclasses.dataclass(frozen=True)
class Config:
    """A run: the model plus what the run does with it."""

    model: ModelConfig = ModelConfig()
    seed: int = 0  # parameter init and every other RNG of the run
    mesh: MeshConfig = MeshConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    rl: RLConfig = RLConfig()


# ---- overrides ------------------------------------------------------------------------------

def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _parse_scalar(tp, raw: str, name: str):
    s = raw.strip()
    try:
        if tp is bool:
            if s.lower() in ("true", "1", "yes"):
                return True
            if s.lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if tp is int:
            return int(s)
        if tp is float:
            return float(s)
        if tp is str:
            return s
    except ValueError:
        pass
    raise ConfigError(f"{name}: expected {tp.__name__}, got {raw!r}")


def _coerce(cls, name: str, value: Any, prefix: str = "model."):
    """Type-checks a value given in Python (config files, HF json); ints are accepted for floats."""
    tp, optional = _unwrap_optional(_hints(cls)[name])
    full = prefix + name
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{full}: None is not allowed")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        raise ConfigError(f"{full}: expected {tp.__name__}, got {value!r}")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{full}: expected bool, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{full}: expected int, got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{full}: expected {tp.__name__}, got {value!r}")
    return value


def _set_path(obj, path: list[str], raw: str, full: str):
    if not dataclasses.is_dataclass(obj):
        raise ConfigError(f"{full}: unknown override key (nothing under a non-config value)")
    names = {f.name for f in dataclasses.fields(obj)}
    head = path[0]
    if head not in names:
        raise ConfigError(f"{full}: unknown override key {head!r}; known: {sorted(names)}")
    tp, optional = _unwrap_optional(_hints(type(obj))[head])
    if len(path) == 1:
        if optional and raw.strip().lower() in ("none", "null"):
            value = None
        elif dataclasses.is_dataclass(tp):
            raise ConfigError(f"{full}: is a sub-config; set its fields ({full}.FIELD=...) or none")
        else:
            value = _parse_scalar(tp, raw, full)
    else:
        child = getattr(obj, head)
        if child is None and dataclasses.is_dataclass(tp):
            child = tp()  # e.g. enabling rope_scaling from the command line
        value = _set_path(child, path[1:], raw, full)
    return dataclasses.replace(obj, **{head: value})


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """Applies `--config.a.b=value` (or `a.b=value`) strings, then validates."""
    for item in overrides:
        s = item[2:] if item.startswith("--") else item
        if "=" not in s:
            raise ConfigError(f"{item}: an override must look like --config.FIELD=VALUE")
        key, raw = s.split("=", 1)
        parts = key.split(".")
        if parts[0] == "config":
            parts = parts[1:]
        if not parts or not all(parts):
            raise ConfigError(f"{item}: empty override key")
        cfg = _set_path(cfg, parts, raw, "config." + ".".join(parts))
    validate(cfg)
    return cfg


# ---- loading --------------------------------------------------------------------------------

# configs/ sits beside the package in a checkout; an installed wheel carries it inside the package, as
# deepjax/configs (pyproject.toml maps it there).
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
CONFIG_DIRS = (os.path.join(_PACKAGE_DIR, "configs"), os.path.join(os.path.dirname(_PACKAGE_DIR), "configs"))


def load_config(name_or_path: str, overrides: Sequence[str] = ()) -> Config:
    """Loads `configs/NAME.py` (or any file defining get_config()), or a preset by name, then overrides."""
    path = name_or_path
    if not path.endswith(".py"):
        found = next((c for c in (os.path.join(d, f"{path}.py") for d in CONFIG_DIRS) if os.path.exists(c)), None)
        if found:
            path = found
        else:
            from deepjax import presets

            # Only the names in PRESETS: the module also holds imports and helpers.
            if name_or_path not in presets.PRESETS:
                raise ConfigError(f"config {name_or_path!r}: no such file or preset "
                                  f"(presets: {', '.join(presets.PRESETS)})")
            cfg = Config(model=getattr(presets, name_or_path)())
            return apply_overrides(cfg, overrides)
    if not os.path.exists(path):
        raise ConfigError(f"config file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"_deepjax_config_{abs(hash(path))}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not hasattr(mod, "get_config"):
        raise ConfigError(f"config file {path!r} defines no get_config()")
    cfg = mod.get_config()
    if not isinstance(cfg, Config):
        raise ConfigError(f"config file {path!r}: get_config() returned {type(cfg).__name__}, not a Config")
    return apply_overrides(cfg, overrides)


# ---- validation (the one place) ---------------------------------------------------------------

def _check_types(obj, prefix: str):
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        _coerce(type(obj), f.name, v, prefix)
        if dataclasses.is_dataclass(v):
            _check_types(v, f"{prefix}{f.name}.")


def validate_model(m: ModelConfig) -> None:
    _check_types(m, "model.")

    def bad(field, why):
        raise ConfigError(f"model.{field}={getattr(m, field)!r}: {why}")

    for f in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
              "num_hidden_layers", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
              "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "num_experts_per_tok",
              "n_group", "topk_group", "max_position_embeddings"):
        if getattr(m, f) <= 0:
            bad(f, "must be positive")
    for f in ("n_shared_experts", "num_nextn_predict_layers", "first_k_dense_replace"):
        if getattr(m, f) < 0:
            bad(f, "must be >= 0")
    for f in ("rms_norm_eps", "rope_theta", "routed_scaling_factor", "initializer_range"):
        if not getattr(m, f) > 0:
            bad(f, "must be positive")
    if m.q_lora_rank is not None and m.q_lora_rank <= 0:
        bad("q_lora_rank", "must be positive, or None for a plain q projection")
    if m.first_k_dense_replace > m.num_hidden_layers:
        bad("first_k_dense_replace", f"exceeds num_hidden_layers={m.num_hidden_layers}")
    if m.num_experts_per_tok > m.n_routed_experts:
        bad("num_experts_per_tok", f"exceeds n_routed_experts={m.n_routed_experts}")
    if m.n_routed_experts % m.n_group:
        bad("n_routed_experts", f"not divisible by n_group={m.n_group}")
    if m.topk_group > m.n_group:
        bad("topk_group", f"exceeds n_group={m.n_group}")
    if m.scoring_func not in SCORING_FUNCS:
        bad("scoring_func", f"unknown; choose from {SCORING_FUNCS}")
    if m.topk_method not in TOPK_METHODS:
        bad("topk_method", f"unknown; choose from {TOPK_METHODS}")
    if m.topk_method != "greedy":
        per_group = m.n_routed_experts // m.n_group
        if m.topk_group * per_group < m.num_experts_per_tok:
            bad("topk_group", f"kept groups hold {m.topk_group * per_group} experts "
                              f"< num_experts_per_tok={m.num_experts_per_tok}")
        if m.topk_method == "noaux_tc" and per_group < 2:
            bad("n_group", "noaux_tc scores a group by its top-2 experts: needs >= 2 experts per group")
    if m.qk_rope_head_dim % 2:
        bad("qk_rope_head_dim", "must be even (rope rotates pairs)")
    for f in ("dtype", "param_dtype"):
        if getattr(m, f) not in DTYPES:
            bad(f, f"unknown; choose from {DTYPES}")
    if m.capacity_factor is not None and not m.capacity_factor > 0:
        bad("capacity_factor", "must be positive, or None for dropless")
    if m.remat not in REMAT_POLICIES:
        bad("remat", f"unknown; choose from {REMAT_POLICIES}")
    rs = m.rope_scaling
    if rs is not None:
        if rs.type not in ROPE_TYPES:
            raise ConfigError(f"model.rope_scaling.type={rs.type!r}: unknown; choose from {ROPE_TYPES}")
        for f in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow"):
            if not getattr(rs, f) > 0:
                raise ConfigError(f"model.rope_scaling.{f}={getattr(rs, f)!r}: must be positive")
        for f in ("mscale", "mscale_all_dim"):
            if getattr(rs, f) < 0:
                raise ConfigError(f"model.rope_scaling.{f}={getattr(rs, f)!r}: must be >= 0")


def validate_run(cfg: Config) -> None:
    def bad(section, field, why):
        raise ConfigError(f"{section}.{field}={getattr(getattr(cfg, section), field)!r}: {why}")

    d, o, t, me = cfg.data, cfg.optim, cfg.train, cfg.mesh
    if d.source not in DATA_SOURCES:
        bad("data", "source", f"unknown; choose from {DATA_SOURCES}")
    if d.mode not in DATA_MODES:
        bad("data", "mode", f"unknown; choose from {DATA_MODES}")
    if d.template not in ("r1", "plain"):
        bad("data", "template", "unknown; choose from ('r1', 'plain')")
    if d.source in ("jsonl_math", "text") and not d.path:
        bad("data", "path", f"data.source={d.source!r} reads local files: set data.path")
    for f in ("seq_len", "global_batch", "num_train", "num_test"):
        if getattr(d, f) <= 0:
            bad("data", f, "must be positive")
    if d.worker_count < 0:
        bad("data", "worker_count", "must be >= 0")
    if not 0 <= d.freeform_share <= 1:
        bad("data", "freeform_share", "must be in [0, 1]")
    from deepjax import tasks  # standard library only
    try:
        tasks.check_options(d.source, d.max_digits, d.ops)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if o.schedule not in SCHEDULES:
        bad("optim", "schedule", f"unknown; choose from {SCHEDULES}")
    for f in ("lr", "b2", "eps", "clip_norm"):
        if not getattr(o, f) > 0:
            bad("optim", f, "must be positive")
    for f in ("warmup_steps", "constant_steps", "decay_steps", "tail_steps", "weight_decay", "final_ratio",
              "tail_ratio", "b1"):
        if getattr(o, f) < 0:
            bad("optim", f, "must be >= 0")
    if o.micro_batches <= 0:
        bad("optim", "micro_batches", "must be positive")
    if d.global_batch % o.micro_batches:
        bad("optim", "micro_batches", f"does not divide data.global_batch={d.global_batch}")
    for f in ("steps", "log_every", "checkpoint_every", "keep_checkpoints", "max_nonfinite"):
        if getattr(t, f) <= 0:
            bad("train", f, "must be positive")
    for f in ("mtp_lambda", "balance_alpha", "bias_update_speed"):
        if getattr(t, f) < 0:
            bad("train", f, "must be >= 0")
    if t.peak_tflops is not None and not t.peak_tflops > 0:
        bad("train", "peak_tflops", "must be positive, or None")
    r = cfg.rl
    for f in ("steps", "prompts_per_step", "group_size", "mu", "max_new_tokens", "eval_problems", "eval_k"):
        if getattr(r, f) <= 0:
            bad("rl", f, "must be positive")
    if r.group_size < 2:
        bad("rl", "group_size", "must be >= 2 (advantages compare the outputs of a group)")
    for f in ("top_k", "ref_refresh_every", "eval_every", "beta", "reward_accuracy", "reward_format",
              "reward_language", "bias_update_speed", "temperature", "eval_temperature"):
        if not getattr(r, f) >= 0:
            bad("rl", f, "must be >= 0")
    for f in ("top_p", "eval_top_p"):
        if not 0 < getattr(r, f) <= 1:
            bad("rl", f, "must be in (0, 1]")
    if not 0 < r.eps_low < 1:
        bad("rl", "eps_low", "must be in (0, 1)")
    if r.eps_high is not None and not r.eps_high > 0:
        bad("rl", "eps_high", "must be positive, or None (= eps_low)")
    if r.lr is not None and not r.lr > 0:
        bad("rl", "lr", "must be positive, or None (= optim.lr)")
    if not r.max_log_ratio > 0:
        bad("rl", "max_log_ratio", "must be positive")
    if r.aggregation not in RL_AGGREGATIONS:
        bad("rl", "aggregation", f"unknown; choose from {RL_AGGREGATIONS}")
    if r.advantage_norm not in RL_ADVANTAGE_NORMS:
        bad("rl", "advantage_norm", f"unknown; choose from {RL_ADVANTAGE_NORMS}")
    sizes = [me.data, me.fsdp, me.expert, me.tensor]
    if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes) or me.dcn_data < 1:
        raise ConfigError(f"mesh={me}: axis sizes must be positive, with at most one -1")


def validate(cfg: Config) -> None:
    _check_types(cfg, "")
    validate_model(cfg.model)
    validate_run(cfg)


def from_dict(d: dict, cls=None, prefix: str = "") -> Config:
    """The inverse of `to_dict` (a run directory's config.json back into a Config), type-checked and
    validated; unknown keys are errors naming them."""
    cls = cls or Config
    kwargs = {}
    hints = _hints(cls)
    for key, value in d.items():
        if key not in hints:
            raise ConfigError(f"{prefix}{key}: unknown config key")
        tp, _ = _unwrap_optional(hints[key])
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            value = from_dict(value, tp, f"{prefix}{key}.")
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = _coerce(cls, key, value, prefix)
    out = cls(**kwargs)
    if cls is Config:
        validate(out)
    return out


def to_dict(cfg) -> dict:
    """The resolved config as plain JSON-able data."""
    return dataclasses.asdict(cfg)

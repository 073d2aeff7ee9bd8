"""Config validation, command-line overrides, presets against docs/deepseek.md, HF config.json round trips, configs/.

Every invalid config must raise ConfigError naming the field and the value; presets must carry DeepSeek's
published values field for field; `ModelConfig.from_hf` must read what transformers and DeepSeek write.
"""

import dataclasses
import json
import os
import re

import pytest

from deepjax import model as M
from deepjax.model import presets
from deepjax.config import (CONFIG_DIRS, Config, ConfigError, DataConfig, ModelConfig, RopeScaling, apply_overrides,
                            load_config, validate)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _error(overrides, base: str = "tiny") -> str:
    with pytest.raises(ConfigError) as e:
        load_config(base, overrides)
    return str(e.value)


# ---- validation: every path names the field and the value ------------------------------------------------
# tiny: 8 routed experts, top-2, 4 groups (2 experts each), top-2 groups, noaux_tc, 3 layers.

@pytest.mark.parametrize("override, expected", [
    ("hidden_size=0", "model.hidden_size=0: must be positive"),
    ("vocab_size=-1", "model.vocab_size=-1: must be positive"),
    ("num_attention_heads=0", "model.num_attention_heads=0: must be positive"),
    ("moe_intermediate_size=0", "model.moe_intermediate_size=0: must be positive"),
    ("kv_lora_rank=0", "model.kv_lora_rank=0: must be positive"),
    ("max_position_embeddings=0", "model.max_position_embeddings=0: must be positive"),
    ("n_shared_experts=-1", "model.n_shared_experts=-1: must be >= 0"),
    ("num_nextn_predict_layers=-1", "model.num_nextn_predict_layers=-1: must be >= 0"),
    ("rms_norm_eps=0", "model.rms_norm_eps=0.0: must be positive"),
    ("routed_scaling_factor=-2.5", "model.routed_scaling_factor=-2.5: must be positive"),
    ("rope_theta=nan", "model.rope_theta=nan: must be positive"),
    ("q_lora_rank=0", "model.q_lora_rank=0: must be positive"),
    ("first_k_dense_replace=4", "model.first_k_dense_replace=4: exceeds num_hidden_layers=3"),
    ("num_experts_per_tok=9", "model.num_experts_per_tok=9: exceeds n_routed_experts=8"),
    ("n_group=3", "model.n_routed_experts=8: not divisible by n_group=3"),
    ("topk_group=5", "model.topk_group=5: exceeds n_group=4"),
    ("scoring_func=relu", "model.scoring_func='relu': unknown"),
    ("topk_method=best", "model.topk_method='best': unknown"),
    ("qk_rope_head_dim=7", "model.qk_rope_head_dim=7: must be even"),
    ("dtype=int8", "model.dtype='int8': unknown"),
    ("param_dtype=float64", "model.param_dtype='float64': unknown"),
    ("remat=sometimes", "model.remat='sometimes': unknown"),
    ("attention=flash", "model.attention='flash': unknown; choose from ('auto', 'xla', 'tokamax', 'cudnn')"),
    ("capacity_factor=0", "model.capacity_factor=0.0: must be positive"),
    ("rope_scaling.type=linear", "model.rope_scaling.type='linear': unknown"),
    ("rope_scaling.factor=0", "model.rope_scaling.factor=0.0: must be positive"),
    ("rope_scaling.mscale=-1", "model.rope_scaling.mscale=-1.0: must be >= 0"),
    # noaux_tc scores a group by its top-2 experts: 8 experts in 8 groups leaves one per group.
    ("n_group=8", "model.n_group=8: noaux_tc"),
])
def test_invalid_value_names_field_and_value(override, expected):
    assert expected in _error([f"--config.model.{override}"])


def test_kept_groups_must_hold_top_k():
    # 1 kept group of 2 experts cannot supply 3 experts per token.
    msg = _error(["--config.model.num_experts_per_tok=3", "--config.model.topk_group=1"])
    assert "model.topk_group=1" in msg and "num_experts_per_tok=3" in msg


def test_greedy_ignores_groups():
    cfg = load_config("tiny", ["--config.model.topk_method=greedy", "--config.model.num_experts_per_tok=3",
                               "--config.model.topk_group=1"])
    assert cfg.model.topk_method == "greedy"


@pytest.mark.parametrize("override, expected", [
    ("--config.model.hidden_size=abc", "config.model.hidden_size: expected int, got 'abc'"),
    ("--config.model.hidden_size=64.5", "config.model.hidden_size: expected int, got '64.5'"),
    ("--config.model.hidden_size=none", "config.model.hidden_size: expected int, got 'none'"),
    ("--config.model.rope_theta=fast", "config.model.rope_theta: expected float, got 'fast'"),
    ("--config.model.norm_topk_prob=maybe", "config.model.norm_topk_prob: expected bool, got 'maybe'"),
    ("--config.seed=x", "config.seed: expected int, got 'x'"),
    ("--config.model.hidden=64", "config.model.hidden: unknown override key 'hidden'"),
    ("--config.modle.hidden_size=64", "config.modle.hidden_size: unknown override key 'modle'"),
    ("--config.model.rope_scaling.scale=2", "config.model.rope_scaling.scale: unknown override key 'scale'"),
    ("--config.model.hidden_size.x=1", "config.model.hidden_size.x: unknown override key"),
    ("--config.model.rope_scaling=yes", "config.model.rope_scaling: is a sub-config"),
    ("--config.model.hidden_size", "--config.model.hidden_size: an override must look like"),
    ("--config.model..hidden_size=1", "empty override key"),
])
def test_bad_override_names_field_and_value(override, expected):
    assert expected in _error([override])


def test_types_checked_outside_overrides():
    """Config files are Python: a float where an int belongs must fail just as on the command line."""
    bad = Config(model=dataclasses.replace(presets.tiny(), hidden_size=64.0))
    with pytest.raises(ConfigError, match=r"model\.hidden_size: expected int, got 64\.0"):
        validate(bad)
    with pytest.raises(ConfigError, match=r"model\.norm_topk_prob: expected bool, got 1"):
        validate(Config(model=dataclasses.replace(presets.tiny(), norm_topk_prob=1)))
    with pytest.raises(ConfigError, match=r"model\.first_k_dense_replace: expected int, got True"):
        validate(Config(model=dataclasses.replace(presets.tiny(), first_k_dense_replace=True)))


@pytest.mark.parametrize("raw, value", [("true", True), ("False", False), ("1", True), ("0", False),
                                        ("YES", True), ("no", False)])
def test_bool_parsing(raw, value):
    assert load_config("tiny", [f"--config.model.norm_topk_prob={raw}"]).model.norm_topk_prob is value


# ---- overrides ----------------------------------------------------------------------------------------------

def test_overrides_replace_only_named_fields():
    cfg = load_config("tiny", ["--config.model.n_routed_experts=4", "--config.model.n_group=2",
                               "--config.model.rope_scaling.factor=10", "--config.model.q_lora_rank=none",
                               "model.rope_theta=5e5", "--config.seed=3"])
    tiny = presets.tiny()
    expected = Config(
        model=dataclasses.replace(tiny, n_routed_experts=4, n_group=2, q_lora_rank=None, rope_theta=5e5,
                                  rope_scaling=dataclasses.replace(tiny.rope_scaling, factor=10.0)),
        data=DataConfig(template="plain"), seed=3)
    assert cfg == expected
    assert isinstance(cfg.model.rope_scaling.factor, float) and isinstance(cfg.model.rope_theta, float)


def test_optional_sub_config_off_and_on():
    assert load_config("tiny", ["--config.model.rope_scaling=none"]).model.rope_scaling is None
    # Setting a field of a disabled sub-config enables it with the defaults for the other fields.
    cfg = load_config("bench", ["--config.model.rope_scaling.factor=8"])
    assert cfg.model.rope_scaling == RopeScaling(factor=8.0)
    assert load_config("tiny", ["--config.model.capacity_factor=1.25"]).model.capacity_factor == 1.25


def test_later_override_wins_and_validation_sees_the_result():
    # n_group=3 alone is invalid for 8 experts; the final state (6 experts, 3 groups) is valid.
    cfg = load_config("tiny", ["--config.model.n_group=3", "--config.model.n_routed_experts=6",
                               "--config.model.topk_group=1", "--config.model.topk_group=2"])
    assert (cfg.model.n_routed_experts, cfg.model.n_group, cfg.model.topk_group) == (6, 3, 2)


def test_apply_overrides_on_config_object():
    cfg = apply_overrides(Config(model=presets.tiny()), ["--config.model.num_hidden_layers=2"])
    assert cfg.model.num_hidden_layers == 2 and cfg.model.n_moe_layers == 1


# ---- loading ------------------------------------------------------------------------------------------------

def test_unknown_config_name():
    msg = _error([], base="tiny2")
    assert "'tiny2'" in msg and "deepseek_v3" in msg  # lists the presets


def test_preset_lookup_only_takes_preset_names():
    # presets.py also holds imports and helpers; those are not configs.
    for name in ("dataclasses", "ModelConfig", "validate_model"):
        assert f"{name!r}: no such file or preset" in _error([], base=name)


def test_missing_and_bad_config_files(tmp_path):
    assert "does not exist" in _error([], base=str(tmp_path / "nope.py"))
    f = tmp_path / "empty.py"
    f.write_text("x = 1\n")
    assert "defines no get_config()" in _error([], base=str(f))
    f.write_text("from deepjax.model import presets\ndef get_config():\n    return presets.tiny()\n")
    assert "returned ModelConfig, not a Config" in _error([], base=str(f))


def test_names_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config("tiny") == Config(model=presets.tiny(), data=DataConfig(template="plain"))
    assert load_config("deepseek_v2_lite").model == presets.deepseek_v2_lite()


CONFIG_FILES = ("deepseek_v3", "deepseek_v2", "deepseek_v2_lite", "bench", "tiny")


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_config_files(name):
    """Each configs/NAME.py wraps its preset, and its docstring gives the command and the true counts."""
    path = os.path.join(REPO, "configs", f"{name}.py")
    cfg = load_config(path)
    data = DataConfig(template="plain") if name == "tiny" else DataConfig()  # tiny: `deepjax train` bare runs
    assert cfg == Config(model=getattr(presets, name)(), data=data)
    assert load_config(name) == cfg  # by name: the file (CONFIG_DIRS) or the preset, the same config
    with open(path) as f:
        doc = re.match(r'"""(.*?)"""', f.read(), re.S).group(1)
    assert doc.startswith(f"deepjax info configs/{name}.py\n")
    _, params = M.abstract_init(cfg.model)
    for n in (M.count_params(params), M.count_active_params(cfg.model, params)):
        assert f"{n:,}" in doc
    if cfg.model.num_nextn_predict_layers:
        assert f"{M.count_params(params, include_mtp=False):,}" in doc


def test_config_dirs_are_the_package_and_the_checkout_links_to_it():
    package = os.path.join(REPO, "deepjax")
    assert CONFIG_DIRS == (os.path.join(package, "configs"),)
    assert os.path.realpath(os.path.join(REPO, "configs")) == os.path.join(package, "configs")


# ---- presets: docs/deepseek.md, Presets ---------------------------------------------------------------------

PUBLISHED = {
    "deepseek_v3": dict(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, first_k_dense_replace=3, num_attention_heads=128, q_lora_rank=1536,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, scoring_func="sigmoid",
        topk_method="noaux_tc", n_group=8, topk_group=4, norm_topk_prob=True, routed_scaling_factor=2.5,
        rope_theta=10000.0, rms_norm_eps=1e-6,
        rope_scaling=RopeScaling("yarn", 40.0, 4096, 32.0, 1.0, 1.0, 1.0),
        max_position_embeddings=163840, num_nextn_predict_layers=1, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=1),
    "deepseek_v2": dict(
        vocab_size=102400, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
        num_hidden_layers=60, first_k_dense_replace=1, num_attention_heads=128, q_lora_rank=1536,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=160, n_shared_experts=2, num_experts_per_tok=6, scoring_func="softmax",
        topk_method="group_limited_greedy", n_group=8, topk_group=3, norm_topk_prob=False,
        routed_scaling_factor=16.0, rope_theta=10000.0, rms_norm_eps=1e-6,
        rope_scaling=RopeScaling("yarn", 40.0, 4096, 32.0, 1.0, 0.707, 0.707),
        max_position_embeddings=163840, num_nextn_predict_layers=0, tie_word_embeddings=False,
        bos_token_id=100000, eos_token_id=100001),
    "deepseek_v2_lite": dict(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, first_k_dense_replace=1, num_attention_heads=16, q_lora_rank=None,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, scoring_func="softmax",
        topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0,
        rope_theta=10000.0, rms_norm_eps=1e-6,
        rope_scaling=RopeScaling("yarn", 40.0, 4096, 32.0, 1.0, 0.707, 0.707),
        max_position_embeddings=163840, num_nextn_predict_layers=0, tie_word_embeddings=False,
        bos_token_id=100000, eos_token_id=100001),
}
# Every DeepSeek config.json field is pinned above; the rest are deepjax's own.
DEEPJAX_ONLY = {"initializer_range", "dtype", "param_dtype", "remat", "layer_loop", "kernels", "attention",
                "capacity_factor"}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_presets_match_deepseek_md(name):
    cfg = getattr(presets, name)()
    assert set(PUBLISHED[name]) | DEEPJAX_ONLY == {f.name for f in dataclasses.fields(ModelConfig)}
    assert {k: getattr(cfg, k) for k in PUBLISHED[name]} == PUBLISHED[name]
    assert cfg.initializer_range == 0.006  # V3 paper section 4.2
    assert (cfg.dtype, cfg.param_dtype, cfg.remat, cfg.kernels, cfg.capacity_factor) == (
        "float32", "float32", "none", "auto", None)


@pytest.mark.parametrize("name, scale", [("deepseek_v3", 0.1352338), ("deepseek_v2", 0.1147214),
                                         ("deepseek_v2_lite", 0.1147214)])
def test_softmax_scale(name, scale):
    assert getattr(presets, name)().softmax_scale == pytest.approx(scale, rel=1e-6)


def _anchor_bench_hf_config():
    """bench/anchors/hf_deepseek_v3.py `bench_cfg()`, verbatim: the shape HF is timed on."""
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816,
        moe_intermediate_size=512, num_hidden_layers=12, first_k_dense_replace=1,
        num_attention_heads=16, num_key_value_heads=16, q_lora_rank=384,
        kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
        n_group=8, topk_group=4, routed_scaling_factor=2.5, norm_topk_prob=True,
        max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False,
        num_nextn_predict_layers=0,
    )


def test_bench_preset_is_the_anchor_shape():
    assert ModelConfig.from_hf(_anchor_bench_hf_config().to_dict()) == presets.bench()


def test_preset_names():
    assert presets.PRESETS == ("deepseek_v3", "deepseek_v2", "deepseek_v2_lite", "bench", "tiny")
    for name in presets.PRESETS:
        validate(Config(model=getattr(presets, name)()))


# ---- HF / DeepSeek config.json --------------------------------------------------------------------------------

# The fields of DeepSeek's released config.json files (values as on the hub).
V3_JSON = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "first_k_dense_replace": 3, "moe_layer_freq": 1, "num_attention_heads": 128, "num_key_value_heads": 128,
    "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8,
    "n_group": 8, "topk_group": 4, "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True,
    "routed_scaling_factor": 2.5, "aux_loss_alpha": 0.001, "seq_aux": True, "hidden_act": "silu",
    "max_position_embeddings": 163840, "initializer_range": 0.02, "rms_norm_eps": 1e-06, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "num_nextn_predict_layers": 1, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1,
    "attention_bias": False, "torch_dtype": "bfloat16",
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}
V2_LITE_JSON = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": 102400,
    "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
    "first_k_dense_replace": 1, "moe_layer_freq": 1, "num_attention_heads": 16, "num_key_value_heads": 16,
    "q_lora_rank": None, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6,
    "n_group": 1, "topk_group": 1, "topk_method": "greedy", "scoring_func": "softmax", "norm_topk_prob": False,
    "routed_scaling_factor": 1.0, "aux_loss_alpha": 0.001, "seq_aux": True, "hidden_act": "silu",
    "max_position_embeddings": 163840, "initializer_range": 0.02, "rms_norm_eps": 1e-06, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "tie_word_embeddings": False, "bos_token_id": 100000, "eos_token_id": 100001, "torch_dtype": "bfloat16",
}
V2_JSON = {**V2_LITE_JSON, "hidden_size": 5120, "intermediate_size": 12288, "moe_intermediate_size": 1536,
           "num_hidden_layers": 60, "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536,
           "n_routed_experts": 160, "n_group": 8, "topk_group": 3, "topk_method": "group_limited_greedy",
           "routed_scaling_factor": 16.0}


def _hf_class(model_type: str):
    from transformers import DeepseekV2Config, DeepseekV3Config

    return {"deepseek_v3": DeepseekV3Config, "deepseek_v2": DeepseekV2Config}[model_type]


@pytest.mark.parametrize("name, hub_json", [("deepseek_v3", V3_JSON), ("deepseek_v2", V2_JSON),
                                            ("deepseek_v2_lite", V2_LITE_JSON)])
def test_from_hf_reads_released_configs(name, hub_json):
    """DeepSeek's config.json, directly and after a pass through transformers' config class (which renames
    rope_scaling to rope_parameters and moves rope_theta into it), gives the preset."""
    expected = dataclasses.replace(getattr(presets, name)(), initializer_range=0.02)  # the hub says 0.02
    assert ModelConfig.from_hf(hub_json) == expected
    hf_dict = _hf_class(hub_json["model_type"])(**hub_json).to_dict()
    assert "rope_parameters" in hf_dict
    assert ModelConfig.from_hf(hf_dict) == expected


def test_from_hf_defaults_hf_leaves_out():
    """transformers' V3 class has no scoring_func / topk_method (always sigmoid / noaux_tc); V2's has no
    scoring_func (softmax) and no MTP; a config without rope scaling gives rope_scaling None."""
    v3 = {k: v for k, v in V3_JSON.items() if k not in ("scoring_func", "topk_method", "rope_scaling")}
    cfg = ModelConfig.from_hf(v3)
    assert (cfg.scoring_func, cfg.topk_method, cfg.rope_scaling) == ("sigmoid", "noaux_tc", None)
    v2 = {k: v for k, v in V2_JSON.items() if k != "scoring_func"}
    cfg = ModelConfig.from_hf(v2)
    assert (cfg.scoring_func, cfg.num_nextn_predict_layers) == ("softmax", 0)
    # Some configs give eos as a list and n_group as null.
    cfg = ModelConfig.from_hf({**V2_LITE_JSON, "eos_token_id": [100001, 100002], "n_group": None,
                               "topk_group": None})
    assert (cfg.eos_token_id, cfg.n_group, cfg.topk_group) == (100001, 1, 1)


def test_from_hf_overrides_and_errors(tmp_path):
    assert ModelConfig.from_hf(V3_JSON, num_hidden_layers=4).num_hidden_layers == 4
    with pytest.raises(ConfigError, match=r"model_type: 'llama'"):
        ModelConfig.from_hf({**V3_JSON, "model_type": "llama"})
    with pytest.raises(ConfigError, match=r"model\.num_experts_per_tok=300: exceeds n_routed_experts=256"):
        ModelConfig.from_hf({**V3_JSON, "num_experts_per_tok": 300})
    with pytest.raises(ConfigError, match=r"model\.hidden_size: expected int, got '7168'"):
        ModelConfig.from_hf({**V3_JSON, "hidden_size": "7168"})
    (tmp_path / "config.json").write_text(json.dumps(V3_JSON))
    from_dir = ModelConfig.from_hf(str(tmp_path))
    assert from_dir == ModelConfig.from_hf(str(tmp_path / "config.json")) == ModelConfig.from_hf(V3_JSON)


# Non-default values in every field a config.json carries (q_lora off, no MTP, no rope scaling, tied...).
ODD = dataclasses.replace(
    presets.tiny(), q_lora_rank=None, rope_scaling=None, num_nextn_predict_layers=0, tie_word_embeddings=True,
    norm_topk_prob=False, routed_scaling_factor=1.5, rms_norm_eps=1e-5, rope_theta=50000.0, bos_token_id=3,
    eos_token_id=4, initializer_range=0.01, topk_method="group_limited_greedy")


@pytest.mark.parametrize("name", [*presets.PRESETS, "odd"])
def test_to_hf_from_hf_identity(name):
    cfg = ODD if name == "odd" else getattr(presets, name)()
    hf = cfg.to_hf()
    assert ModelConfig.from_hf(hf) == cfg
    assert ModelConfig.from_hf(json.loads(json.dumps(hf))) == cfg  # as written to config.json
    # ... and through transformers' own config class, as hf.save / save_pretrained would write it.
    assert ModelConfig.from_hf(_hf_class(hf["model_type"])(**hf).to_dict()) == cfg


def test_nested_rl_configs_override_round_trip_and_name_the_field():
    """rl.loss / rl.reward / rl.rollout are the library configs themselves (GRPOConfig, RewardConfig, SamplingConfig):
    overrides reach their fields, tuples parse from commas, config.json round-trips, and errors name the full path."""
    from deepjax.config import from_dict, to_dict

    cfg = load_config("tiny", ["--config.rl.loss.beta=0", "--config.rl.loss.group_size=4",
                               "--config.rl.reward.format=0.5", "--config.rl.rollout.top_k=20",
                               "--config.rl.rollout.eos_ids=3,7", "--config.rl.eval.every=5",
                               "--config.rl.rollout.kernel_tuning=grouped.decode_min_tokens=256,route.num_warps=4"])
    assert (cfg.rl.loss.beta, cfg.rl.loss.group_size, cfg.rl.reward.format) == (0.0, 4, 0.5)
    assert (cfg.rl.rollout.top_k, cfg.rl.rollout.eos_ids, cfg.rl.eval.every) == (20, (3, 7), 5)
    assert cfg.rl.rollout.kernel_tuning == ("grouped.decode_min_tokens=256", "route.num_warps=4")
    assert cfg.rl.grpo().max_completion_length == cfg.rl.rollout.max_new_tokens  # Dr. GRPO's L
    assert from_dict(to_dict(cfg)) == cfg
    for override, match in [("rl.loss.eps_low=1.5", "rl.loss.eps_low=1.5: GRPOConfig.eps_low"),
                            ("rl.rollout.temperature=-1", "rl.rollout.temperature=-1.0"),
                            ("rl.rollout.eos_ids=a", "rl.rollout.eos_ids: expected int"),
                            ("rl.eval.k=0", "rl.eval.k=0"), ("rl.group_size=4", "unknown override key 'group_size'"),
                            ("rl.rollout.kernel_tuning=grouped.decode_min_tokens=x", "rl.rollout.kernel_tuning"),
                            ("rl.rollout.kernel_tuning=route.num_warps=True", "route.num_warps takes a int")]:
        with pytest.raises(ConfigError, match=re.escape(match)):
            load_config("tiny", ["--config." + override])
    bad = to_dict(cfg)
    bad["rl"]["loss"]["aggregation"] = "mean"
    with pytest.raises(ConfigError, match="rl.loss: GRPOConfig.aggregation"):
        from_dict(bad)


def test_resume_check_takes_missing_fields_as_defaults_and_ignores_execution_only_ones():
    """A checkpoint written before a model field existed resumes (the field counts as its default); layer_loop may
    differ (the same parameters and math); any other difference is one clear error naming the field."""
    from deepjax.config import to_dict
    from deepjax.train.run import check_same_model
    cfg = Config(model=presets.tiny())
    saved = to_dict(cfg)
    del saved["model"]["layer_loop"]
    check_same_model(saved, cfg, "old/ckpt")
    saved["model"]["layer_loop"] = "python"
    check_same_model(saved, cfg, "old/ckpt")
    saved["model"]["attention"] = "cudnn"  # the same math by another kernel
    check_same_model(saved, cfg, "old/ckpt")
    saved["model"]["vocab_size"] = cfg.model.vocab_size + 1
    with pytest.raises(ConfigError, match=r"model.vocab_size=512 but the checkpoint in old/ckpt"):
        check_same_model(saved, cfg, "old/ckpt")
    del saved["model"]["vocab_size"]  # missing: the default (V3's), not this tiny model's
    with pytest.raises(ConfigError, match=r"model.vocab_size"):
        check_same_model(saved, cfg, "old/ckpt")

"""The run config: `Config` composes one config per concern, plus command-line overrides, loading and validation.

Each part is defined, documented and validated beside its code: `ModelConfig` (deepjax/model/config.py; fields
carry the names of DeepSeek's `config.json`), `MeshConfig` (deepjax/parallel/sharding.py), `DataConfig`
(deepjax/data/config.py), `OptimConfig` and `TrainConfig` (deepjax/train/config.py), `RLConfig`
(deepjax/rl/config.py). They are re-exported here.

A run config is a Python file defining `get_config() -> Config` (see `configs/`), or a preset name
(`tiny`, `bench`, `deepseek_v3`, ...). Any field can be overridden on the command line:

    --config.model.n_routed_experts=8 --config.model.rope_scaling.factor=10 --config.model.q_lora_rank=none

`validate` checks the types, calls each part's `validate`, then the few rules that span parts; every error names
the field and value.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Sequence

from deepjax.data.config import DataConfig
from deepjax.model import presets
from deepjax.model.config import ModelConfig, RopeScaling
from deepjax.parallel.sharding import MeshConfig
from deepjax.rl.config import RLConfig
from deepjax.schema import ConfigError, bad, coerce, hints, parse_scalar, unwrap_optional
from deepjax.train.config import OptimConfig, TrainConfig


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


# ---- overrides -------------------------------------------------------------------------------------------------

def _set_path(obj, path: list[str], raw: str, full: str):
    if not dataclasses.is_dataclass(obj):
        raise ConfigError(f"{full}: unknown override key (nothing under a non-config value)")
    names = {f.name for f in dataclasses.fields(obj)}
    head = path[0]
    if head not in names:
        raise ConfigError(f"{full}: unknown override key {head!r}; known: {sorted(names)}")
    tp, optional = unwrap_optional(hints(type(obj))[head])
    if len(path) == 1:
        if optional and raw.strip().lower() in ("none", "null"):
            value = None
        elif dataclasses.is_dataclass(tp):
            raise ConfigError(f"{full}: is a sub-config; set its fields ({full}.FIELD=...) or none")
        else:
            value = parse_scalar(tp, raw, full)
    else:
        child = getattr(obj, head)
        if child is None and dataclasses.is_dataclass(tp):
            child = tp()  # e.g. enabling rope_scaling from the command line
        value = _set_path(child, path[1:], raw, full)
    try:
        return dataclasses.replace(obj, **{head: value})
    except ValueError as e:  # a library config (GRPOConfig, SamplingConfig, ...) validates itself when built
        name = full.removeprefix("config.")
        if isinstance(e, ConfigError) and str(e).startswith(name):
            raise
        raise bad(name, value, str(e)) from None


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

# The config files are the sub-package deepjax/configs (in a checkout `configs/` links to it), so a checkout and
# an installed wheel find the same files.
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
CONFIG_DIRS = (os.path.join(_PACKAGE_DIR, "configs"),)


def load_config(name_or_path: str, overrides: Sequence[str] = ()) -> Config:
    """Loads `configs/NAME.py` (or any file defining get_config()), or a preset by name, then overrides."""
    path = name_or_path
    if not path.endswith(".py"):
        found = next((c for c in (os.path.join(d, f"{path}.py") for d in CONFIG_DIRS) if os.path.exists(c)), None)
        if found:
            path = found
        else:
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


# ---- validation ---------------------------------------------------------------------------------------------------

def validate(cfg: Config) -> None:
    for f in dataclasses.fields(cfg):  # each part checks its own fields' types
        coerce(Config, f.name, getattr(cfg, f.name), "")
    for part in (cfg.model, cfg.mesh, cfg.data, cfg.optim, cfg.train, cfg.rl):
        part.validate()
    if cfg.data.global_batch % cfg.optim.micro_batches:
        raise ConfigError(f"optim.micro_batches={cfg.optim.micro_batches!r}: does not divide "
                          f"data.global_batch={cfg.data.global_batch}")


def from_dict(d: dict, cls=None, prefix: str = "") -> Config:
    """The inverse of `to_dict` (a run directory's config.json back into a Config), type-checked and
    validated; unknown keys are errors naming them."""
    cls = cls or Config
    kwargs = {}
    field_types = hints(cls)
    for key, value in d.items():
        if key not in field_types:
            raise ConfigError(f"{prefix}{key}: unknown config key")
        tp, _ = unwrap_optional(field_types[key])
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            value = from_dict(value, tp, f"{prefix}{key}.")
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = coerce(cls, key, value, prefix)
    try:
        out = cls(**kwargs)
    except ValueError as e:  # a nested library config validates itself when built
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from None
    if cls is Config:
        validate(out)
    return out


def to_dict(cfg) -> dict:
    """The resolved config as plain JSON-able data."""
    return dataclasses.asdict(cfg)


__all__ = ["Config", "ConfigError", "ModelConfig", "RopeScaling", "MeshConfig", "DataConfig", "OptimConfig",
           "TrainConfig", "RLConfig", "load_config", "apply_overrides", "validate", "from_dict", "to_dict",
           "CONFIG_DIRS"]

"""The run config: `Config` composes one config per concern, plus command-line overrides, loading and validation.

Each part is defined, documented and validated beside its code: `ModelConfig` (deepjax/model/config.py; fields
carry the names of DeepSeek's `config.json`), `MeshConfig` (deepjax/parallel/sharding.py), `DataConfig`
(deepjax/data/config.py), `OptimConfig` and `TrainConfig` (deepjax/train/config.py), `RLConfig`
and `DistillConfig` (deepjax/rl/config.py). They are re-exported here.

A run config is a Python file defining `get_config() -> Config` (see `configs/`), or a preset name
(`tiny`, `bench`, `deepseek_v3`, ...). Any field can be overridden on the command line:

    --config.model.n_routed_experts=8 --config.model.rope_scaling.factor=10 --config.model.q_lora_rank=none

`validate` checks the types, calls each part's `validate`, then the few rules that span parts (data.seq_len within
the model's context), then that every float of every part is finite; every error names the field and value. A config
file that fails to load (a SyntaxError, a failed import, a raising get_config) is a ConfigError naming its file and
line.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import traceback
from typing import Optional, Sequence

from deepjax.data.config import DataConfig
from deepjax.errors import UserError, one_line
from deepjax.model import presets
from deepjax.model.config import ModelConfig, RopeScaling
from deepjax.parallel.sharding import MeshConfig
from deepjax.rl.config import DistillConfig, RLConfig
from deepjax.schema import ConfigError, bad, check_finite, coerce, hints, parse_scalar, unwrap_optional
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
    distill: DistillConfig = DistillConfig()


# ---- overrides -------------------------------------------------------------------------------------------------

def set_path(obj, path: list[str], raw: str, full: str):
    """`obj` (a config dataclass) with the field at `path` set from the override string `raw`; `full` names it in
    errors."""
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
        value = set_path(child, path[1:], raw, full)
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
        cfg = set_path(cfg, parts, raw, "config." + ".".join(parts))
    validate(cfg)
    return cfg


# ---- loading --------------------------------------------------------------------------------

# The config files are the sub-package deepjax/configs (in a checkout `configs/` links to it), so a checkout and
# an installed wheel find the same files.
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
CONFIG_DIRS = (os.path.join(_PACKAGE_DIR, "configs"),)


def config_file(name_or_path: str) -> Optional[str]:
    """The config file a `CONFIG` argument names: a path ending in .py as it is, else `configs/NAME.py` when it
    exists; None for anything else (a preset name)."""
    if name_or_path.endswith(".py"):
        return name_or_path
    return next((c for c in (os.path.join(d, f"{name_or_path}.py") for d in CONFIG_DIRS) if os.path.exists(c)), None)


def load_config(name_or_path: str, overrides: Sequence[str] = ()) -> Config:
    """Loads `configs/NAME.py` (or any file defining get_config()), or a preset by name, then overrides."""
    path = config_file(name_or_path)
    if path is None:
        # Only the names in PRESETS: the module also holds imports and helpers.
        if name_or_path not in presets.PRESETS:
            raise ConfigError(f"config {name_or_path!r}: no such file or preset "
                              f"(presets: {', '.join(presets.PRESETS)})")
        return apply_overrides(Config(model=getattr(presets, name_or_path)()), overrides)
    if not os.path.exists(path):
        raise ConfigError(f"config file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"_deepjax_config_{abs(hash(path))}", path)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except Exception as e:
        raise _file_error(path, e) from e
    if not hasattr(mod, "get_config"):
        raise ConfigError(f"config file {path!r} defines no get_config()")
    try:
        cfg = mod.get_config()
    except Exception as e:
        raise _file_error(path, e) from e
    if not isinstance(cfg, Config):
        raise ConfigError(f"config file {path!r}: get_config() returned {type(cfg).__name__}, not a Config")
    return apply_overrides(cfg, overrides)


# What a config file may raise that is the user's to fix wherever it was raised: a value or a call a library refused
# (ValueError, TypeError: GRPOConfig(max_log_ratio=100), ModelConfig(hiden_size=8)), a failed import.
_FILE_ERRORS = (UserError, ValueError, TypeError, ImportError)


def _file_error(path: str, e: Exception) -> Exception:
    """What a config file raised, as a ConfigError naming the file and line (a SyntaxError's own, else the innermost
    frame in the file) when it is the user's to fix: a SyntaxError, anything raised by the file's own code, or one of
    `_FILE_ERRORS`. Anything else was raised inside deepjax: a bug, returned as it is (re-raised with its traceback)."""
    here = os.path.abspath(path)
    if isinstance(e, SyntaxError):  # in the file, or a module it imports (no filename: null bytes in the file)
        file = path if not e.filename or os.path.abspath(e.filename) == here else e.filename
        return ConfigError(f"config file {file}{f':{e.lineno}' if e.lineno else ''}: SyntaxError: {e.msg}")
    tb = traceback.extract_tb(e.__traceback__)
    lines = [f.lineno for f in tb if os.path.abspath(f.filename) == here]
    raised_here = bool(tb) and os.path.abspath(tb[-1].filename) == here
    if not (raised_here or isinstance(e, _FILE_ERRORS)):
        return e
    where = f"{path}:{lines[-1]}" if lines else path
    kind = "" if isinstance(e, UserError) else f"{type(e).__name__}: "
    return ConfigError(f"config file {where}: {kind}{one_line(e)}")


# ---- validation ---------------------------------------------------------------------------------------------------

def validate(cfg: Config) -> None:
    for f in dataclasses.fields(cfg):  # each part checks its own fields' types
        coerce(Config, f.name, getattr(cfg, f.name), "")
    for part in (cfg.model, cfg.mesh, cfg.data, cfg.optim, cfg.train, cfg.rl, cfg.distill):
        part.validate()
    if cfg.data.global_batch % cfg.optim.micro_batches:
        raise ConfigError(f"optim.micro_batches={cfg.optim.micro_batches!r}: does not divide "
                          f"data.global_batch={cfg.data.global_batch}")
    limit, what = context_length(cfg.model)
    if cfg.data.seq_len > limit:
        raise bad("data.seq_len", cfg.data.seq_len, f"longer than the model's context, {what}")
    check_finite(cfg, "")  # last: every float of every part, nested library configs too (NaN / inf name the field)


def context_length(m: ModelConfig) -> tuple[int, str]:
    """(the longest sequence the model is configured for, where that number comes from): max_position_embeddings,
    or YaRN's extended length original_max_position_embeddings x factor when that is longer (DeepSeek's configs have
    the two equal: 4096 x 40 = 163840)."""
    limit, what = m.max_position_embeddings, f"model.max_position_embeddings={m.max_position_embeddings}"
    rs = m.rope_scaling
    if rs is not None and int(rs.original_max_position_embeddings * rs.factor) > limit:
        limit = int(rs.original_max_position_embeddings * rs.factor)
        what = (f"YaRN's extended length model.rope_scaling.original_max_position_embeddings x factor = "
                f"{rs.original_max_position_embeddings} x {rs.factor:g} = {limit}")
    return limit, what


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
    except ValueError as e:  # a nested library config validates itself when built: its errors get the path
        where = prefix.rstrip(".") or "config"
        if isinstance(e, ConfigError) and str(e).startswith(where):
            raise
        raise ConfigError(f"{where}: {e}") from None
    if cls is Config:
        validate(out)
    return out


def to_dict(cfg) -> dict:
    """The resolved config as plain JSON-able data."""
    return dataclasses.asdict(cfg)


__all__ = ["Config", "ConfigError", "ModelConfig", "RopeScaling", "MeshConfig", "DataConfig", "OptimConfig",
           "TrainConfig", "RLConfig", "DistillConfig", "load_config", "apply_overrides", "validate", "from_dict",
           "to_dict", "CONFIG_DIRS"]

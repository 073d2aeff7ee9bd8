"""`deepjax convert`: an HF safetensors checkpoint directory <-> a deepjax run directory, tensor by tensor.

    deepjax convert HF_DIR RUN_DIR [--run-config CONFIG] [--config.FIELD=VALUE ...]      # import
    deepjax convert RUN_DIR HF_DIR [--step N] [--fp8] [--dtype bfloat16] [--shard-size 4GB]   # export

Import writes a run directory (config.json + checkpoints/0/) whose step-0 checkpoint is what `deepjax train` would
have saved right after initializing with these weights: the parameters and router biases from the HF tensors, the
optimizer state at its init (zero moments and counts), the RNG of `seed`, no data iterator state. It is read by
`train.run.load_params` (rl.init_from, `deepjax eval`, `deepjax sample`) and resumed by `deepjax train` / `grpo` with
`--workdir RUN_DIR`; the manifest (deepjax/train/checkpoint.py) is written and verified like any other step's. The
model config is read from HF_DIR/config.json (`--run-config` names a config file or preset to take the other
sections from and to check the model against; `--config.FIELD=VALUE` overrides, e.g. model.param_dtype=bfloat16).

Export reads a step (default the newest, checked against its manifest first) and writes config.json,
model-0000i-of-0000n.safetensors shards and model.safetensors.index.json as hf.save does; with `--fp8` the linear
weights DeepSeek-V3's release keeps in FP8 (hf.fp8_quantized) are written as E4M3 with a float32 `weight_scale_inv`
per 128x128 block, and config.json gets the release's `quantization_config`. Import dequantizes such tensors.

Memory: neither direction holds the model. Import reads one HF tensor at a time (hf.Checkpoint: plain reads at its
offset) and writes it into its slot of the stacked [layers, (experts,)] array with tensorstore, each slot one zarr
chunk of its own. Export reads each array one chunk-aligned block of its leading (layer, expert) dims at a time and
writes each HF tensor at its precomputed offset in its shard (the safetensors headers are known from the shapes).
Measured (bench/convert_rss.py, docs/checkpoints.md): about 2.5 copies of the largest HF tensor above the imports,
either way, at any number of layers; exporting a checkpoint `deepjax train` wrote holds about twice its largest
block instead (Orbax's chunks: per-device shards of at most 2 GiB, spanning the trailing dims).

The checkpoint layout convert writes is Orbax's non-OCDBT zarr one (every array a zarr v2 directory under state/,
uncompressed, `_METADATA` the tree metadata Orbax itself writes for this state): a format Orbax reads like its own
OCDBT checkpoints. The optimizer's zero moments are stored as arrays without chunks (the metadata says unwritten
chunks read as zeros), so they cost no disk and no time; the manifest's file table makes a lost data chunk an
error, never a silent zero.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from flax import nnx
from tqdm import tqdm

from deepjax import model as M
from deepjax.infer import sample as SA
from deepjax.config import Config, apply_overrides, from_dict, to_dict
from deepjax.errors import CheckpointError, ConfigError, UserError
from deepjax.model import hf
from deepjax.model.config import LOCAL_FIELDS
from deepjax.parallel import sharding as S
from deepjax.train.checkpoint import TMP_SUFFIX, list_steps, verify_step, write_manifest
from deepjax.train.run import abstract_train_state

# ModelConfig fields an HF config.json does not carry (LOCAL_FIELDS): taken from --run-config, never compared with
# the checkpoint.
# DeepSeek-V3's release config.json entry for its FP8 weights.
QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                       "weight_block_size": [hf.FP8_BLOCK, hf.FP8_BLOCK]}
ST_NAMES = {np.dtype(v): k for k, v in hf.ST_DTYPES.items()}  # numpy dtype -> safetensors dtype name
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


class ConvertError(UserError, ValueError):
    """SOURCE or DEST cannot be converted as asked; the message names the directory."""


def source_kind(path: str) -> str:
    """"run" (config.json + checkpoints/) or "hf" (config.json + *.safetensors): `deepjax sample`'s rule, with a
    directory that is neither a ConvertError."""
    try:
        return SA.source_kind(path)
    except ValueError as e:
        raise ConvertError(str(e)) from None


def _check_new(path: str) -> str:
    path = os.path.abspath(path)
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise ConvertError(f"{path}: exists and is not an empty directory (convert writes a new one; remove it or "
                           "pick another)")
    return path


@contextlib.contextmanager
def _new_dir(path: str):
    """Creates DEST; on any error (or Ctrl-C) removes what was written, so a failed conversion leaves no
    half-written directory behind."""
    existed = os.path.isdir(path)
    os.makedirs(path, exist_ok=True)
    try:
        yield path
    except BaseException:
        if existed:
            for name in os.listdir(path):
                p = os.path.join(path, name)
                shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
        else:
            shutil.rmtree(path, ignore_errors=True)
        raise


def _bar(total: int, desc: str, progress: bool):
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, dynamic_ncols=True,
                disable=not progress)


# ---- Orbax's view of a state tree --------------------------------------------------------------------------

@dataclass(frozen=True)
class Leaf:
    """One entry of Orbax's tree metadata: a leaf array or an empty node (value None)."""

    keys: tuple  # ((name, key type), ...): 1 a sequence index, 2 a dict key or attribute (Orbax's KeyType)
    value: Any  # jax.ShapeDtypeStruct, or None for an empty node (optax's EmptyState)

    @property
    def name(self) -> str:
        """Orbax's parameter name: the key names joined with "." (the array's directory under state/)."""
        return ".".join(k for k, _ in self.keys)


def _key(k) -> tuple[str, int]:
    if isinstance(k, jax.tree_util.SequenceKey):
        return str(k.idx), 1
    if isinstance(k, jax.tree_util.DictKey):
        return str(k.key), 2
    if isinstance(k, jax.tree_util.GetAttrKey):  # NamedTuple fields: Orbax saves them as a dict
        return k.name, 2
    if isinstance(k, jax.tree_util.FlattenedIndexKey):
        return str(k.key), 1
    raise TypeError(f"unsupported pytree key {k!r}")


def _is_leaf_or_empty(x) -> bool:
    if jax.tree_util.all_leaves([x]):
        return True
    children = jax.tree_util.tree_flatten(x, is_leaf=lambda y: y is not x)[0]
    return not children


def orbax_leaves(tree) -> list[Leaf]:
    """The leaves (and empty nodes) of a state tree with their Orbax key paths, in Orbax's order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_leaf_or_empty)
    return [Leaf(tuple(_key(k) for k in path), v if hasattr(v, "shape") else None) for path, v in flat]


def tree_metadata(leaves: Sequence[Leaf]) -> dict:
    """`state/_METADATA` as Orbax writes it for these leaves (tests/test_convert.py compares it with Orbax's own),
    with `store_array_data_equal_to_fill_value` false: chunks never written read as zeros."""
    entries = {}
    for leaf in leaves:
        value = ({"value_type": "None", "skip_deserialize": True} if leaf.value is None else
                 {"value_type": "jax.Array", "skip_deserialize": False, "write_shape": list(leaf.value.shape)})
        entries[str(tuple(k for k, _ in leaf.keys))] = {
            "key_metadata": [{"key": k, "key_type": t} for k, t in leaf.keys], "value_metadata": value}
    return {"tree_metadata": entries, "use_ocdbt": False, "use_zarr3": False,
            "store_array_data_equal_to_fill_value": False, "custom_metadata": None}


def _zarr_spec(state_dir: str, name: str, meta: dict) -> dict:
    """The tensorstore spec of one array of a checkpoint's state item (OCDBT or not, zarr v2 or v3, per its
    _METADATA)."""
    if meta["use_ocdbt"]:
        kv = {"driver": "ocdbt", "base": {"driver": "file", "path": state_dir + "/"}, "path": name}
    else:
        kv = {"driver": "file", "path": os.path.join(state_dir, name)}
    return {"driver": "zarr3" if meta.get("use_zarr3") else "zarr", "kvstore": kv,
            "fill_missing_data_reads": not meta.get("store_array_data_equal_to_fill_value", False)}


def _handler_name(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _model_paths(state_leaves: Sequence[Leaf], group: str) -> dict[str, Leaf]:
    """{"moe_layers.ffn.w_gate": leaf} of the leaves under `group` (params, router_bias, or an optimizer moment's
    path prefix), the Variable's trailing "value" key dropped."""
    out = {}
    n = len(group.split("."))
    for leaf in state_leaves:
        names = [k for k, _ in leaf.keys]
        if leaf.value is not None and ".".join(names[:n]) == group:
            out[".".join(names[n:-1] if names[-1] == "value" else names[n:])] = leaf
    return out


def _dotted(path: tuple) -> str:
    return ".".join(map(str, path))


# ---- HF -> run directory -----------------------------------------------------------------------------------

def run_config(src: str, base: Optional[Config] = None, overrides: Sequence[str] = ()) -> Config:
    """The run config of an import: `base` (default: the defaults) with the model of SRC/config.json, then the
    overrides. With a base, its model must be the checkpoint's in every field config.json carries."""
    model, _, _ = hf.check(hf.Checkpoint(src))
    if base is None:
        cfg = Config(model=model)
    else:
        described = to_dict(dataclasses.replace(model, **{f: getattr(base.model, f) for f in LOCAL_FIELDS}))
        given = to_dict(base.model)
        diff = [f for f in given if given[f] != described.get(f)]
        if diff:
            f = diff[0]
            raise ConfigError(f"model.{f}={given[f]!r} in --run-config, but {src}/config.json gives "
                              f"{described.get(f)!r}: that config does not describe this checkpoint")
        cfg = base
    return apply_overrides(cfg, overrides)


def hf_to_run(src: str, dst: str, cfg: Config, progress: bool = True, step: int = 0) -> dict:
    """Writes run directory `dst` (config.json, checkpoints/<step>/) from HF checkpoint `src`, one tensor at a time;
    returns {"to", "step", "tensors", "bytes", "seconds", "path"}. cfg.model must describe the checkpoint
    (`run_config`)."""
    t0 = time.perf_counter()
    ckpt = hf.Checkpoint(src)
    _, ents, flat_abs = hf.check(ckpt, cfg.model)  # names and shapes, before anything is written
    mesh = S.make_mesh(S.MeshConfig(fsdp=1), devices=jax.devices()[:1])  # shapes only: no array is allocated
    *_, abstract = abstract_train_state(cfg, mesh, S.rules_for(cfg.mesh.rules))
    leaves = orbax_leaves(abstract)
    targets = {**_model_paths(leaves, "params"), **_model_paths(leaves, "router_bias")}
    missing = sorted(_dotted(p) for p in flat_abs if _dotted(p) not in targets)
    if missing:  # a mapping bug, not a checkpoint problem
        raise RuntimeError(f"deepjax params with no place in the train state: {missing}")
    # Slot chunking: every [layer, (expert)] slot of a stacked array is one zarr chunk, so writing a slot never reads
    # or holds its neighbours. The optimizer moments (never written: zeros) get the same chunks as their params.
    n_index: dict[str, int] = {}
    for e in ents:
        n_index[_dotted(e.path)] = max(n_index.get(_dotted(e.path), 0), len(e.index))
    todo = sorted((e for e in ents if e.copy_of is None), key=lambda e: ckpt.where[e.name])  # file by file
    total = sum(int(np.prod(ckpt.shape(e.name))) * np.dtype(flat_abs[e.path].dtype).itemsize for e in todo)
    dst = _check_new(dst)
    root = os.path.join(dst, "checkpoints")
    tmp = os.path.join(root, f"{step}{TMP_SUFFIX}-convert")  # never listed as a step (checkpoint.py)
    state_dir = os.path.join(tmp, "state")
    with _new_dir(dst):
        os.makedirs(state_dir)
        stores = {}
        for leaf in leaves:
            if leaf.value is None:
                continue
            shape = tuple(leaf.value.shape)
            names = [k for k, _ in leaf.keys]
            path = ".".join(names[:-1]) if names[-1] == "value" else ""
            n = next((n for p, n in n_index.items() if path.endswith("." + p)), 0)
            stores[leaf.name] = ts.open({
                "driver": "zarr", "kvstore": {"driver": "file", "path": os.path.join(state_dir, leaf.name)},
                "dtype": np.dtype(leaf.value.dtype).name,  # tensorstore's names: float32, bfloat16, uint32, ...
                "metadata": {"shape": list(shape), "chunks": list((1,) * n + shape[n:]), "compressor": None},
            }, create=True).result()
        with _bar(total, f"{os.path.basename(src.rstrip('/'))} -> run", progress) as bar:
            for e in todo:
                v = flat_abs[e.path]
                slot = hf._to_slot(ckpt.read(e.name), v.shape[len(e.index):], e.linear).astype(v.dtype, copy=False)
                stores[targets[_dotted(e.path)].name][e.index if e.index else ...].write(slot).result()
                bar.update(slot.nbytes)
                del slot
        stores["rng"].write(np.asarray(jax.random.key_data(jax.random.key(cfg.seed)))).result()
        del stores
        # everything else in the state (step, optimizer counts and moments, non-finite counters) is its init: zeros

        def dump(path, obj):
            with open(path, "w") as f:
                json.dump(obj, f)

        dump(os.path.join(state_dir, "_METADATA"), tree_metadata(leaves))
        for item, obj in (("data", {"iterator": None}), ("config", to_dict(cfg))):
            os.makedirs(os.path.join(tmp, item))
            dump(os.path.join(tmp, item, "metadata"), obj)
        now = time.time_ns()
        json_handler = _handler_name(ocp.JsonCheckpointHandler)
        dump(os.path.join(tmp, "_CHECKPOINT_METADATA"), {
            "item_handlers": {"config": json_handler, "data": json_handler,
                              "state": _handler_name(ocp.StandardCheckpointHandler)},
            "metrics": {}, "performance_metrics": {}, "init_timestamp_nsecs": now, "commit_timestamp_nsecs": now,
            "custom_metadata": {}})
        write_manifest(tmp, step)
        os.rename(tmp, os.path.join(root, str(step)))  # the commit: a step directory is complete or absent
        with open(os.path.join(dst, "config.json"), "w") as f:
            json.dump(to_dict(cfg), f, indent=1)
    return {"to": "run", "step": step, "tensors": len(todo), "bytes": total, "seconds": time.perf_counter() - t0,
            "path": dst}


# ---- run directory -> HF -----------------------------------------------------------------------------------

@dataclass
class Out:
    """One output tensor: what it holds and where it goes."""

    name: str
    dtype: np.dtype
    shape: tuple
    file: str = ""
    offset: int = 0  # absolute, in `file`

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize


class ShardWriter:
    """Writes safetensors shards whose tensors arrive one at a time, in any order.

    The tensors (names, dtypes, shapes, in order) are grouped into shards of at most max_shard_bytes (one tensor at
    least), named as save_pretrained names them; every file's header is written first and each tensor goes to its
    precomputed offset, so nothing is buffered. Within a file the tensors lie by decreasing item size (as
    safetensors' own writer lays them), so each is aligned to its item size. `close` writes the index."""

    def __init__(self, directory: str, outs: Sequence[Out], max_shard_bytes: int):
        self.directory, self.outs = directory, list(outs)
        self.by_name = {o.name: o for o in self.outs}
        groups: list[list[Out]] = [[]]
        size = 0
        for o in self.outs:
            if groups[-1] and size + o.nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(o)
            size += o.nbytes
        self.files = {}
        self.written = 0
        for i, group in enumerate(groups):
            fname = "model.safetensors" if len(groups) == 1 else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            header, pos = {"__metadata__": {"format": "pt"}}, 0
            for o in sorted(group, key=lambda o: -o.dtype.itemsize):
                header[o.name] = {"dtype": ST_NAMES[o.dtype], "shape": list(o.shape),
                                  "data_offsets": [pos, pos + o.nbytes]}
                o.file, o.offset = fname, pos
                pos += o.nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-(8 + len(raw)) % 8)
            for o in group:
                o.offset += 8 + len(raw)
            f = self.files[fname] = open(os.path.join(directory, fname), "w+b")
            f.write(len(raw).to_bytes(8, "little") + raw)
            f.truncate(8 + len(raw) + pos)

    @property
    def nbytes(self) -> int:
        return sum(o.nbytes for o in self.outs)

    def put(self, name: str, x: np.ndarray) -> int:
        """Writes one tensor (of its planned dtype and shape); returns its bytes."""
        o = self.by_name[name]
        if x.dtype != o.dtype or tuple(x.shape) != tuple(o.shape):  # a bug of the caller
            raise RuntimeError(f"{name}: {x.dtype} {x.shape}, planned {o.dtype} {o.shape}")
        f = self.files[o.file]
        f.seek(o.offset)
        f.write(np.ascontiguousarray(x).reshape(-1).view(np.uint8))
        self.written += 1
        return o.nbytes

    def close(self, complete: bool = True) -> None:
        for f in self.files.values():
            f.close()
        if not complete:
            return
        if self.written != len(self.outs):  # a bug of the caller
            raise RuntimeError(f"wrote {self.written} of {len(self.outs)} tensors")
        with open(os.path.join(self.directory, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": self.nbytes},
                       "weight_map": {o.name: o.file for o in self.outs}}, f, indent=1)


@contextlib.contextmanager
def _shards(directory: str, outs: Sequence[Out], max_shard_bytes: int):
    w = ShardWriter(directory, outs, max_shard_bytes)
    try:
        yield w
    except BaseException:
        w.close(complete=False)
        raise
    w.close()


def _blocks(shape: tuple, n_index: int, chunk: tuple) -> Iterator[tuple]:
    """Chunk-aligned boxes over the leading n_index dims (each the whole of the trailing dims)."""
    ranges = [range(0, shape[d], chunk[d]) for d in range(n_index)]
    for start in itertools.product(*ranges):
        yield tuple(slice(s, min(s + chunk[d], shape[d])) for d, s in enumerate(start))


def _hf_config(model, dtype: Optional[str], fp8: bool) -> dict:
    config = model.to_hf()
    if dtype:
        config["torch_dtype"] = dtype
    if fp8:
        config["quantization_config"] = dict(QUANTIZATION_CONFIG)
    return config


def run_to_hf(src: str, dst: str, step: Optional[int] = None, fp8: bool = False, dtype: Optional[str] = None,
              max_shard_bytes: int = 4 << 30, progress: bool = True) -> dict:
    """Writes HF checkpoint directory `dst` from a step of run directory `src` (default the newest), one block of
    each array at a time; returns {"to", "step", "tensors", "bytes", "seconds", "path"}."""
    t0 = time.perf_counter()
    if max_shard_bytes <= 0:
        raise ConvertError(f"shard size {max_shard_bytes}: must be positive")
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"dtype {dtype!r}: choose from {sorted(DTYPES)}")
    path = os.path.join(src, "config.json")
    try:
        with open(path) as f:
            cfg = from_dict(json.load(f))
    except ValueError as e:
        raise ConvertError(f"{path}: {str(e).splitlines()[0]}") from None
    model = cfg.model
    root = os.path.join(src, "checkpoints")
    steps = list_steps(root)
    if not steps:
        raise CheckpointError(f"{root}: no checkpoint saved yet")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise CheckpointError(f"no checkpoint step {step} in {root} (have {steps})")
    step_dir = os.path.join(root, str(step))
    verify_step(step_dir, step)  # sizes and CRC-32s against the manifest, before any of it is read
    state_dir = os.path.join(step_dir, "state")
    with open(os.path.join(state_dir, "_METADATA")) as f:
        meta = json.load(f)
    if meta.get("use_ocdbt") is None:  # older Orbax: OCDBT when its manifest is there
        meta["use_ocdbt"] = os.path.exists(os.path.join(state_dir, "manifest.ocdbt"))
    names = {".".join(k["key"] for k in v["key_metadata"]) for v in meta["tree_metadata"].values()}
    ents = hf.entries(model)
    _, abstract = M.abstract_init(model)
    flat_abs = {tuple(p): v for p, v in nnx.to_flat_state(abstract)}

    def array_name(p: tuple) -> str:
        for group in ("params", "router_bias"):
            name = f"{group}.{_dotted(p)}.value"
            if name in names:
                return name
        raise CheckpointError(f"{state_dir}: no array for parameter {_dotted(p)}: the checkpoint does not match "
                              f"the model of {path}")

    arrays = {p: ts.open(_zarr_spec(state_dir, array_name(p), meta), open=True, read=True).result()
              for p in dict.fromkeys(e.path for e in ents)}
    for p, a in arrays.items():
        if tuple(a.shape) != tuple(flat_abs[p].shape):
            raise CheckpointError(f"{state_dir}: array {array_name(p)} has shape {tuple(a.shape)}, the config "
                                  f"gives {tuple(flat_abs[p].shape)}")
    n_index = {p: max(len(e.index) for e in ents if e.path == p) for p in arrays}

    outs: list[Out] = []
    by_slot: dict[tuple, list[tuple[hf.Entry, bool]]] = {}  # (path, index) -> [(entry, quantized)]
    for e in ents:
        a = arrays[e.path]
        shape = hf._hf_shape(a.shape[len(e.index):], e.linear)
        quantized = fp8 and hf.fp8_quantized(e.name)
        if quantized:
            outs += [Out(e.name, np.dtype(ml_dtypes.float8_e4m3fn), shape),
                     Out(e.name + "_scale_inv", np.dtype(np.float32), tuple(-(-d // hf.FP8_BLOCK) for d in shape))]
        else:
            outs.append(Out(e.name, np.dtype(DTYPES[dtype]) if dtype else np.dtype(a.dtype.numpy_dtype), shape))
        by_slot.setdefault((e.path, e.index), []).append((e, quantized))
    dst = _check_new(dst)
    with _new_dir(dst), _shards(dst, outs, max_shard_bytes) as w, \
            _bar(w.nbytes, f"run step {step} -> {os.path.basename(dst)}", progress) as bar:
        for p, a in arrays.items():
            n = n_index[p]
            for box in _blocks(tuple(a.shape), n, tuple(a.chunk_layout.read_chunk.shape)):
                block = a[box].read().result() if n else a.read().result()
                for idx in itertools.product(*(range(b.start, b.stop) for b in box)):
                    slot = block[tuple(i - b.start for i, b in zip(idx, box))]
                    for e, quantized in by_slot.get((p, idx), ()):
                        x = hf._from_slot(slot, e.linear)
                        if quantized:
                            q, s = hf.quantize_fp8(x)
                            bar.update(w.put(e.name, q) + w.put(e.name + "_scale_inv", s))
                        else:
                            bar.update(w.put(e.name, x.astype(w.by_name[e.name].dtype, copy=False)))
                        del x
                del block, slot  # the last slot is a view of the block: both go before the next block is read
        with open(os.path.join(dst, "config.json"), "w") as f:
            json.dump(_hf_config(model, dtype, fp8), f, indent=1)
    return {"to": "hf", "step": step, "tensors": len(outs), "bytes": w.nbytes, "seconds": time.perf_counter() - t0,
            "path": dst}


def random_hf(directory: str, model, seed: int = 0, dtype: str = "bfloat16", max_shard_bytes: int = 4 << 30,
              progress: bool = False) -> int:
    """Writes a random HF checkpoint of `model`'s shapes (normal(0, 0.02) weights, ones for norms), one tensor at a
    time (benchmarks, tests: a large checkpoint without a model in memory); returns its bytes."""
    _, abstract = M.abstract_init(model)
    flat_abs = {tuple(p): v for p, v in nnx.to_flat_state(abstract)}
    ents = hf.entries(model)
    outs = [Out(e.name, np.dtype(DTYPES[dtype]), hf._hf_shape(flat_abs[e.path].shape[len(e.index):], e.linear))
            for e in ents]
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    with _shards(directory, outs, max_shard_bytes) as w, _bar(w.nbytes, "random HF checkpoint", progress) as bar:
        for o in outs:
            if len(o.shape) == 1:
                x = np.ones(o.shape, np.float32) if o.name.endswith("norm.weight") else \
                    rng.uniform(-0.1, 0.1, o.shape).astype(np.float32)
            else:
                x = rng.standard_normal(o.shape, np.float32) * np.float32(0.02)
            bar.update(w.put(o.name, x.astype(o.dtype)))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(_hf_config(model, dtype, False), f, indent=1)
    return w.nbytes


def convert(src: str, dst: str, to: Optional[str] = None, base: Optional[Config] = None,
            overrides: Sequence[str] = (), step: Optional[int] = None, fp8: bool = False,
            dtype: Optional[str] = None, max_shard_bytes: int = 4 << 30, progress: bool = True) -> dict:
    """`deepjax convert SRC DST`: the direction follows SRC (an HF directory becomes a run directory, a run directory
    an HF one); `to` ("run" / "hf"), when given, must agree. Options of the other direction are refused."""
    kind = source_kind(src)
    want = "run" if kind == "hf" else "hf"
    if to is not None and to != want:
        raise ConvertError(f"--to {to}: {src} is {'an HF checkpoint' if kind == 'hf' else 'a run'} directory, "
                           f"which converts to {'a run' if want == 'run' else 'an HF'} directory")
    if want == "run":
        bad = [n for n, v in (("--step", step is not None), ("--fp8", fp8), ("--dtype", dtype is not None)) if v]
        if bad:
            raise ConvertError(f"{bad[0]}: applies to run -> HF; {src} is an HF checkpoint directory")
        cfg = run_config(src, base, overrides)
        return hf_to_run(src, dst, cfg, progress=progress)
    if base is not None or overrides:
        raise ConvertError(f"{'--run-config' if base is not None else overrides[0]}: applies to HF -> run; {src} is "
                           "a run directory (its config.json is used)")
    return run_to_hf(src, dst, step=step, fp8=fp8, dtype=dtype, max_shard_bytes=max_shard_bytes, progress=progress)

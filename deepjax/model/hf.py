"""HF / DeepSeek safetensors checkpoints <-> deepjax params.

    cfg, graphdef, params = deepjax.model.hf.load("path/to/DeepSeek-V3")      # config.json + *.safetensors
    deepjax.model.hf.save("out/", cfg, params)                                 # the same layout back

Layout (what `save_pretrained` writes and DeepSeek releases): per-expert tensors
`model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight`, linear weights as [out, in], q_b_proj /
kv_b_proj rows head-major ([nope ; rope] per head for q, [k_nope ; v] per head for kv), and the MTP module
k as `model.layers.{num_hidden_layers + k}.*` (with its own copies of the embedding and head, which deepjax
shares with the main model: they are checked for shape and skipped on import, written back on export).

FP8 (E4M3) weights with a `weight_scale_inv` tensor are dequantized per 128x128 block: w = fp8 x scale.

Memory: tensors are read one at a time (plain reads at their offsets, no memory map) and written into
preallocated (optionally sharded) device buffers by a donated in-place update, so host memory never holds more
than one checkpoint tensor beyond what the device buffers themselves occupy. `deepjax convert`
(deepjax/train/convert.py) converts between this layout and a run directory without holding the model at all.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from deepjax.model.config import ModelConfig
from deepjax.model import abstract_init

# safetensors' numpy backend names FP8 as `numpy.float8_e4m3fn`, which numpy lacks; ml_dtypes (a jax
# dependency) provides the type.
for _name in ("float8_e4m3fn", "float8_e5m2"):
    if not hasattr(np, _name):
        setattr(np, _name, getattr(ml_dtypes, _name))

FP8_BLOCK = 128
E4M3_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some older checkpoints carry


from deepjax.errors import CheckpointError  # noqa: E402,F401  (re-exported)


@dataclass(frozen=True)
class Entry:
    """One checkpoint tensor and where it lives in deepjax params."""

    name: str  # HF tensor name
    path: tuple  # deepjax param path
    index: tuple  # leading indices into a stacked param (layer, expert)
    linear: int  # 0: same layout; n: HF [out, in] <-> deepjax [*in dims (n of them), *out dims]
    copy_of: Optional[tuple] = None  # MTP's own embedding/head copies: shared in deepjax


def _block_entries(cfg: ModelConfig, hf: str, path: tuple, idx: tuple, moe: bool) -> Iterator[Entry]:
    yield Entry(f"{hf}.input_layernorm.weight", path + ("attn_norm", "weight"), idx, 0)
    yield Entry(f"{hf}.post_attention_layernorm.weight", path + ("ffn_norm", "weight"), idx, 0)
    a = f"{hf}.self_attn"
    if cfg.q_lora_rank is not None:
        yield Entry(f"{a}.q_a_proj.weight", path + ("attn", "wq_a"), idx, 1)
        yield Entry(f"{a}.q_a_layernorm.weight", path + ("attn", "q_norm", "weight"), idx, 0)
        yield Entry(f"{a}.q_b_proj.weight", path + ("attn", "wq_b"), idx, 1)
    else:
        yield Entry(f"{a}.q_proj.weight", path + ("attn", "wq"), idx, 1)
    yield Entry(f"{a}.kv_a_proj_with_mqa.weight", path + ("attn", "wkv_a"), idx, 1)
    yield Entry(f"{a}.kv_a_layernorm.weight", path + ("attn", "kv_norm", "weight"), idx, 0)
    yield Entry(f"{a}.kv_b_proj.weight", path + ("attn", "wkv_b"), idx, 1)
    yield Entry(f"{a}.o_proj.weight", path + ("attn", "wo"), idx, 2)  # [N, V, D]
    m = f"{hf}.mlp"
    ffn = path + ("ffn",)
    if not moe:
        for p in ("gate", "up", "down"):
            yield Entry(f"{m}.{p}_proj.weight", ffn + (f"w_{p}",), idx, 1)
        return
    yield Entry(f"{m}.gate.weight", ffn + ("gate",), idx, 1)
    if cfg.topk_method == "noaux_tc":
        yield Entry(f"{m}.gate.e_score_correction_bias", ffn + ("bias",), idx, 0)
    for e in range(cfg.n_routed_experts):
        for p in ("gate", "up", "down"):
            yield Entry(f"{m}.experts.{e}.{p}_proj.weight", ffn + (f"w_{p}",), idx + (e,), 1)
    if cfg.n_shared_experts:
        for p in ("gate", "up", "down"):
            yield Entry(f"{m}.shared_experts.{p}_proj.weight", ffn + ("shared", f"w_{p}"), idx, 1)


def entries(cfg: ModelConfig) -> list[Entry]:
    """Every tensor of an HF DeepseekV3/V2ForCausalLM checkpoint for this config, in layer order."""
    out = [Entry("model.embed_tokens.weight", ("embed",), (), 0)]
    for i in range(cfg.num_hidden_layers):
        dense = i < cfg.first_k_dense_replace
        stack, j = ("dense_layers", i) if dense else ("moe_layers", i - cfg.first_k_dense_replace)
        out += _block_entries(cfg, f"model.layers.{i}", (stack,), (j,), moe=not dense)
    out += [Entry("model.norm.weight", ("norm", "weight"), (), 0),
            Entry("lm_head.weight", ("head",), (), 1)]
    for k in range(cfg.num_nextn_predict_layers):
        hf, path = f"model.layers.{cfg.num_hidden_layers + k}", ("mtp", k)
        out += [Entry(f"{hf}.enorm.weight", path + ("enorm", "weight"), (), 0),
                Entry(f"{hf}.hnorm.weight", path + ("hnorm", "weight"), (), 0),
                Entry(f"{hf}.eh_proj.weight", path + ("eh_proj",), (), 1)]
        out += _block_entries(cfg, hf, path + ("block",), (), moe=True)
        out += [Entry(f"{hf}.shared_head.norm.weight", path + ("norm", "weight"), (), 0),
                Entry(f"{hf}.embed_tokens.weight", ("embed",), (), 0, copy_of=("embed",)),
                Entry(f"{hf}.shared_head.head.weight", ("head",), (), 1, copy_of=("head",))]
    return out


def _hf_shape(slot_shape: tuple, linear: int) -> tuple:
    if not linear:
        return tuple(slot_shape)
    return (int(np.prod(slot_shape[linear:])), int(np.prod(slot_shape[:linear])))


def _to_slot(w: np.ndarray, slot_shape: tuple, linear: int) -> np.ndarray:
    return w.T.reshape(slot_shape) if linear else w.reshape(slot_shape)


def _from_slot(x: np.ndarray, linear: int) -> np.ndarray:
    if not linear:
        return x
    n_in = int(np.prod(x.shape[:linear]))
    return np.ascontiguousarray(x.reshape(n_in, -1).T)


def dequantize_fp8(w: np.ndarray, scale_inv: np.ndarray, name: str = "") -> np.ndarray:
    """w [out, in] in E4M3 times one float32 scale per 128x128 block (DeepSeek-V3's release format)."""
    rows, cols = w.shape
    nb = (-(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK))
    if tuple(scale_inv.shape) != nb:
        raise CheckpointError(f"{name}_scale_inv: shape {tuple(scale_inv.shape)}, expected {nb} "
                              f"(one scale per {FP8_BLOCK}x{FP8_BLOCK} block of {w.shape})")
    s = np.repeat(np.repeat(scale_inv.astype(np.float32), FP8_BLOCK, 0), FP8_BLOCK, 1)[:rows, :cols]
    return w.astype(np.float32) * s


def quantize_fp8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(E4M3 weight, float32 `weight_scale_inv`) of w [out, in], one scale per 128x128 block: scale = amax / 448
    (E4M3's largest finite value), so that dequantize_fp8 inverts it up to E4M3 rounding."""
    rows, cols = w.shape
    B = FP8_BLOCK
    nb = (-(-rows // B), -(-cols // B))
    padded = np.zeros((nb[0] * B, nb[1] * B), np.float32)
    padded[:rows, :cols] = w
    blocks = padded.reshape(nb[0], B, nb[1], B)
    amax = np.abs(blocks).max(axis=(1, 3))
    scale = np.where(amax > 0, amax / E4M3_MAX, 1.0).astype(np.float32)
    q = (blocks / scale[:, None, :, None]).astype(ml_dtypes.float8_e4m3fn)
    return np.ascontiguousarray(q.reshape(padded.shape)[:rows, :cols]), scale


def fp8_quantized(name: str) -> bool:
    """Whether DeepSeek-V3's FP8 release stores this tensor in E4M3: the linear weights of the attention and MLP
    blocks (experts, shared experts, dense MLPs; the MTP module's block too), not the router (`mlp.gate`), norms,
    embeddings, heads or the MTP module's eh_proj."""
    return (name.endswith("_proj.weight") or name.endswith("_proj_with_mqa.weight")) and \
        (".self_attn." in name or ".mlp." in name)


# ---- reading ------------------------------------------------------------------------------------

# safetensors dtype names -> numpy (ml_dtypes for bfloat16 / FP8)
ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
             "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64, "I32": np.int32,
             "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_header(path: str) -> tuple[dict, int]:
    """(tensor name -> {"dtype", "shape", "data_offsets"}, offset of the data) of a .safetensors file."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= os.path.getsize(path) - 8:
                raise ValueError(f"header length {n}")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a safetensors file ({e})") from e
    header.pop("__metadata__", None)
    return header, 8 + n


class Checkpoint:
    """The tensors of an HF checkpoint directory by name, read one at a time.

    Tensors are read with plain file reads at their offsets, not through a memory map: resident memory holds the
    tensor being read, never the rest of its (multi-GB) file. `read` dequantizes FP8 tensors that have a
    `weight_scale_inv`."""

    def __init__(self, directory: str):
        self.directory = directory
        files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
        if not files:
            raise CheckpointError(f"{directory}: no *.safetensors files")
        self.where: dict[str, str] = {}  # tensor name -> file
        self._headers: dict[str, tuple[dict, int]] = {}
        for fname in files:
            header, _ = self._headers[fname] = read_header(os.path.join(directory, fname))
            for name in header:
                if name in self.where:
                    raise CheckpointError(f"{name}: in both {self.where[name]} and {fname}")
                self.where[name] = fname

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def shape(self, name: str) -> tuple:
        return tuple(self._headers[self.where[name]][0][name]["shape"])

    def raw(self, name: str) -> np.ndarray:
        """One tensor as stored."""
        fname = self.where[name]
        header, base = self._headers[fname]
        h = header[name]
        if h["dtype"] not in ST_DTYPES:
            raise CheckpointError(f"tensor {name!r} in {fname}: dtype {h['dtype']} is not supported")
        start, end = h["data_offsets"]
        out = np.empty(h["shape"], ST_DTYPES[h["dtype"]])
        if out.nbytes != end - start:
            raise CheckpointError(f"tensor {name!r} in {fname}: {end - start} bytes for shape {h['shape']} "
                                  f"{h['dtype']}")
        with open(os.path.join(self.directory, fname), "rb") as f:
            f.seek(base + start)
            if f.readinto(out.reshape(-1).view(np.uint8)) != out.nbytes:
                raise CheckpointError(f"tensor {name!r} in {fname}: the file is truncated")
        return out

    def read(self, name: str) -> np.ndarray:
        """One tensor, FP8 (with a `_scale_inv`) dequantized to float32."""
        w = self.raw(name)
        if name + "_scale_inv" in self.where:
            w = dequantize_fp8(w, self.raw(name + "_scale_inv"), name)
        return w


def check(ckpt: Checkpoint, cfg: Optional[ModelConfig] = None) -> tuple[ModelConfig, list[Entry], dict]:
    """(cfg, entries, {param path: abstract param}) of a checkpoint, every tensor name and shape checked.

    cfg defaults to the directory's config.json (without MTP when the checkpoint has no MTP tensors, as HF's
    save_pretrained writes it). Raises CheckpointError naming any missing, unexpected or mis-shaped tensor."""
    directory, where = ckpt.directory, ckpt.where
    if cfg is None:
        cfg = ModelConfig.from_hf(directory)
        mtp_probe = f"model.layers.{cfg.num_hidden_layers}.eh_proj.weight"
        if cfg.num_nextn_predict_layers and mtp_probe not in where:
            # HF's save_pretrained drops the MTP layer; DeepSeek's releases keep it.
            warnings.warn(f"{directory}: config.json has num_nextn_predict_layers="
                          f"{cfg.num_nextn_predict_layers} but no MTP tensors ({mtp_probe}); loading without MTP")
            cfg = dataclasses.replace(cfg, num_nextn_predict_layers=0)
    _, abstract = abstract_init(cfg)
    flat_abs = {tuple(p): v for p, v in nnx.to_flat_state(abstract)}
    ents = entries(cfg)
    expected = {e.name for e in ents}
    for e in ents:
        if e.name not in where:
            raise CheckpointError(f"missing tensor {e.name!r} (for deepjax param "
                                  f"{'.'.join(map(str, e.path))}{list(e.index) if e.index else ''})")
    scale_names = {n for n in where if n.endswith("_scale_inv") and n[: -len("_scale_inv")] in expected}
    extra = sorted(n for n in where if n not in expected and n not in scale_names
                   and not n.endswith(IGNORED_SUFFIXES))
    if extra:
        raise CheckpointError(f"unexpected tensor {extra[0]!r} in {where[extra[0]]}"
                              + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                              + ": the checkpoint does not match the config")
    for e in ents:
        want = _hf_shape(flat_abs[e.path].shape[len(e.index):], e.linear)
        got = ckpt.shape(e.name)
        if got != want:
            raise CheckpointError(f"tensor {e.name!r} in {where[e.name]} has shape {got}, expected {want}")
    return cfg, ents, flat_abs


def _set_fn(buf_shape, n_index: int):
    """A jitted in-place write of one slot into a (possibly sharded) buffer, donating the buffer."""

    def set_slot(buf, slot, idx):
        start = tuple(idx) + (0,) * (len(buf_shape) - n_index)
        return jax.lax.dynamic_update_slice(buf, slot.reshape((1,) * n_index + slot.shape), start)

    return jax.jit(set_slot, donate_argnums=0)


def load(directory: str, cfg: Optional[ModelConfig] = None, shardings=None,
         progress: Optional[Callable[[int, int], None]] = None):
    """Reads a checkpoint directory into (cfg, graphdef, params).

    cfg defaults to the directory's config.json (override dtype etc. by passing one). `shardings`, a tree
    like params of `jax.sharding.Sharding`, places each parameter directly into its sharding.
    Raises CheckpointError naming any missing, unexpected or mis-shaped tensor before reading data.
    """
    ckpt = Checkpoint(directory)
    cfg, ents, flat_abs = check(ckpt, cfg)  # everything validated before any data is read
    graphdef, abstract = abstract_init(cfg)
    flat_shard = ({tuple(p): v for p, v in nnx.to_flat_state(shardings)} if shardings is not None else {})
    where = ckpt.where

    # Stacked parameters (layers, experts) are preallocated in their shardings and filled slot by slot;
    # the others are placed whole. Files are read in order, one tensor at a time.
    def sharding_of(path):
        sh = flat_shard.get(path)
        return getattr(sh, "value", sh)

    bufs, setters = {}, {}
    loaded = sorted((e for e in ents if e.copy_of is None), key=lambda e: where[e.name])
    for n, e in enumerate(loaded):
        w = ckpt.read(e.name)
        v = flat_abs[e.path]
        slot = _to_slot(w, v.shape[len(e.index):], e.linear).astype(v.dtype)
        del w
        if e.index:
            if e.path not in bufs:
                bufs[e.path] = jnp.zeros(v.shape, v.dtype, device=sharding_of(e.path))
                setters[e.path] = _set_fn(v.shape, len(e.index))
            bufs[e.path] = setters[e.path](bufs[e.path], slot, np.asarray(e.index, np.int32))
        else:
            bufs[e.path] = jax.device_put(slot, sharding_of(e.path))
        del slot
        if progress is not None:
            progress(n + 1, len(loaded))
    unfilled = sorted(".".join(map(str, p)) for p in flat_abs if p not in bufs)
    if unfilled:  # a mapping bug, not a checkpoint problem
        raise RuntimeError(f"deepjax params with no checkpoint tensor: {unfilled}")
    params = nnx.from_flat_state([(p, v.replace(bufs[tuple(p)])) for p, v in nnx.to_flat_state(abstract)])
    return cfg, graphdef, params


# ---- writing ------------------------------------------------------------------------------------

def save(directory: str, cfg: ModelConfig, params, max_shard_bytes: int = 4 << 30) -> None:
    """Writes config.json, model-0000i-of-0000n.safetensors shards and model.safetensors.index.json,
    one tensor at a time pulled from device, in the parameter dtypes."""
    os.makedirs(directory, exist_ok=True)
    flat = {tuple(p): v for p, v in nnx.to_flat_state(params)}
    ents = entries(cfg)
    size = 0
    # Group the tensors into shards by size first (shapes only), then write each shard.
    names_per_shard: list[list[Entry]] = [[]]
    for e in ents:
        v = flat[e.path]
        nbytes = int(np.prod(v.shape[len(e.index):])) * np.dtype(v.dtype).itemsize
        if size and size + nbytes > max_shard_bytes:
            names_per_shard.append([])
            size = 0
        names_per_shard[-1].append(e)
        size += nbytes
    n = len(names_per_shard)
    weight_map, total = {}, 0
    for i, group in enumerate(names_per_shard):
        fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        tensors = {}
        for e in group:
            arr = flat[e.path][...]
            x = np.asarray(arr[e.index] if e.index else arr)
            tensors[e.name] = _from_slot(x, e.linear)
            total += tensors[e.name].nbytes
            weight_map[e.name] = fname
        save_file(tensors, os.path.join(directory, fname), metadata={"format": "pt"})
        del tensors
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg.to_hf(), f, indent=1)

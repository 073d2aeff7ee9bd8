"""The device mesh and the one table from logical axis names to mesh axes.

Mesh axes: `data` (pure data parallel: replicated params), `fsdp` (data parallel with params, grads and
optimizer state sharded, ZeRO-3), `expert` (routed experts spread over devices; tokens reach them by
all-to-all, and these devices also split the batch), `tensor` (heads / FFN width split, Megatron style).
Pods add `dcn_data`: data parallel across slices over the data-center network, folded into `data`.

Parameters name their dims where they are created (`axes=(...)` in deepjax/model/layers.py, mla.py, moe.py);
activations are constrained at block boundaries with the same vocabulary (`constrain`). A preset is a
small dict of changes to BASE_RULES; each says why it exists.

Axis types are chosen on purpose: Auto. deepjax states shardings at parameter creation and block
boundaries and lets XLA's propagation fill in the rest (the nanodo / MaxText model); Explicit mode would
put a sharding in every array's type and need annotations on every op, and MoE dispatch is a manual
`shard_map` either way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import contextvars
import math
from typing import Optional, Sequence

import jax
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from deepjax.errors import MeshError
from deepjax.schema import ConfigError, check_types

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# logical name -> mesh axis (or tuple of axes, or None = replicated)
BASE_RULES: dict[str, object] = {
    "batch": ("data", "fsdp", "expert"),  # every non-tensor device takes its own slice of the batch
    "length": None,
    "act_embed": None,  # activations keep the hidden dim whole
    "embed": "fsdp",  # ZeRO-3: each param's hidden dim split over fsdp, gathered per layer
    "vocab": "tensor",
    "heads": "tensor",
    "head_dim": None,
    "q_lora": "fsdp",  # wq_b / wkv_b have no embed dim: their low-rank input dim carries the fsdp split
    "kv_lora": "fsdp",
    "mlp": "tensor",
    "exp": "expert",
    "moe_mlp": "tensor",
    "layers": None,
}

RULE_PRESETS: dict[str, tuple[str, dict]] = {
    "fsdp": ("weights sharded over fsdp only; experts stay whole on each device (no all-to-all): "
             "simplest, best when the model fits comfortably",
             {"exp": None, "vocab": None, "heads": None, "mlp": None, "moe_mlp": None}),
    "fsdp_tensor": ("adds tensor parallelism: heads and FFN widths split, for layers too wide for fsdp alone",
                    {"exp": None}),
    "fsdp_expert": ("adds expert parallelism: routed experts spread over `expert`, tokens all-to-all'd to "
                    "them; DeepSeek-V3's own layout (64-way EP, no TP)",
                    {"vocab": None, "heads": None, "mlp": None, "moe_mlp": None}),
    "fsdp_expert_tensor": ("all three: for meshes that use every axis", {}),
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; one of them may be -1 (fill with the remaining devices), and the rule preset."""

    data: int = 1
    fsdp: int = -1
    expert: int = 1
    tensor: int = 1
    dcn_data: int = 1  # slices (multi-slice pods): multiplies the data axis over DCN
    rules: str = "fsdp_expert_tensor"  # a key of RULE_PRESETS

    def validate(self) -> None:
        check_types(self, "mesh.")
        sizes = [self.data, self.fsdp, self.expert, self.tensor]
        for axis, n in zip(MESH_AXES, sizes):
            if n == 0 or n < -1:
                raise ConfigError(f"mesh.{axis}={n}: must be positive, or -1 (the remaining devices)")
        if self.dcn_data < 1:
            raise ConfigError(f"mesh.dcn_data={self.dcn_data}: must be positive")
        if sum(s == -1 for s in sizes) > 1:
            raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1 (the remaining "
                              "devices)")
        if self.rules not in RULE_PRESETS:
            raise ConfigError(f"mesh.rules={self.rules!r}: unknown; choose from {sorted(RULE_PRESETS)}")


def rules_for(preset: str) -> dict[str, object]:
    if preset not in RULE_PRESETS:
        raise ValueError(f"sharding preset {preset!r}: unknown; choose from {sorted(RULE_PRESETS)}")
    return {**BASE_RULES, **RULE_PRESETS[preset][1]}


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, ...]:
    """The axis sizes of `cfg` on `n_devices` devices (-1 filled); MeshError naming the mesh fields when they do not
    fit the devices."""
    cfg.validate()
    sizes = [cfg.data, cfg.fsdp, cfg.expert, cfg.tensor]
    fields = " x ".join(f"mesh.{a}={s}" for a, s in zip(MESH_AXES, sizes) if s != -1)
    if n_devices % cfg.dcn_data:
        raise MeshError(f"mesh.dcn_data={cfg.dcn_data}: does not divide the {n_devices} devices")
    n_fill = sum(s == -1 for s in sizes)
    per_slice = n_devices // cfg.dcn_data
    known = math.prod(s for s in sizes if s != -1)
    if n_fill:
        if per_slice % known:
            raise MeshError(f"{fields} = {known}: does not divide the {per_slice} devices"
                            f"{' per slice' if cfg.dcn_data > 1 else ''} (the -1 axis takes the rest)")
        sizes[sizes.index(-1)] = per_slice // known
    if math.prod(sizes) * cfg.dcn_data != n_devices:
        raise MeshError(f"{fields} x mesh.dcn_data={cfg.dcn_data} needs {math.prod(sizes) * cfg.dcn_data} devices, "
                        f"have {n_devices} (set one axis to -1 to take the rest)")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: Optional[Sequence] = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(cfg, len(devices))
    types = (AxisType.Auto,) * len(MESH_AXES)
    if cfg.dcn_data > 1:
        ici = shape
        dcn = (cfg.dcn_data, 1, 1, 1)
        arr = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
        return Mesh(arr, MESH_AXES, axis_types=types)
    return jax.make_mesh(shape, MESH_AXES, axis_types=types, devices=devices)


# ---- logical -> physical ------------------------------------------------------------------------

def logical_to_spec(axes: Sequence[Optional[str]], rules: dict, mesh: Optional[Mesh] = None) -> P:
    """PartitionSpec for logical axes. A mesh axis is used at most once per array (first dim wins);
    with a mesh given, axes of size 1 are left out (they shard nothing)."""
    used: set[str] = set()
    out = []
    for name in axes:
        target = rules.get(name) if name is not None else None
        if name is not None and name not in rules:
            raise KeyError(f"logical axis {name!r} has no sharding rule")
        phys = (target,) if isinstance(target, str) else tuple(target or ())
        phys = tuple(a for a in phys if a not in used and (mesh is None or mesh.shape[a] > 1))
        used.update(phys)
        out.append(None if not phys else phys[0] if len(phys) == 1 else phys)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def param_specs(axes, rules: dict, mesh: Optional[Mesh] = None):
    """PartitionSpec per leaf of `axes`, a tree of logical axis-name tuples (the model's `logical_axes(params)`)."""
    return jax.tree.map(lambda a: logical_to_spec(a, rules, mesh), axes, is_leaf=lambda x: isinstance(x, tuple))


def _path_name(path) -> str:
    return ".".join(str(getattr(p, "key", p)) for p in path)


def check_divisible(params, specs, mesh: Mesh) -> None:
    """Every sharded dim must divide by its mesh axes; the MeshError names the parameter, dim and axis."""
    shapes = {_path_name(p): v.shape for p, v in jax.tree_util.tree_leaves_with_path(
        params, is_leaf=lambda x: isinstance(x, nnx.Variable))}
    spec_leaves = jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, P))
    for path, spec in spec_leaves:
        name = _path_name(path)
        shape = shapes[name]
        for dim, part in enumerate(spec):
            axes = (part,) if isinstance(part, str) else tuple(part or ())
            n = math.prod(mesh.shape[a] for a in axes)
            if n > 1 and shape[dim] % n:
                raise MeshError(f"parameter {name} dim {dim} (size {shape[dim]}) is not divisible by mesh "
                                f"axis {'x'.join(axes)} (size {n}): change mesh.{axes[-1]} or mesh.rules")


def param_shardings(params, axes, mesh: Mesh, rules: dict):
    """NamedSharding per variable of `params` from its logical axes (`axes`, the same tree of name tuples), after
    checking that every sharded dim divides."""
    specs = param_specs(axes, rules, mesh)
    check_divisible(params, specs, mesh)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def shardings_like_params(tree, params, shardings, mesh: Mesh):
    """Shardings for a tree that mirrors params inside (optimizer state: mu, nu, ...): a leaf whose path
    ends with a parameter's path and has its shape gets that parameter's sharding; the rest (step counts)
    are replicated. Needed because XLA does not carry a sharding into `zeros_like`."""
    by_path = {}
    for (path, v), (_, sh) in zip(jax.tree_util.tree_leaves_with_path(params),
                                  jax.tree_util.tree_leaves_with_path(shardings)):
        by_path[jax.tree_util.keystr(path)] = (v.shape, sh)
    replicated = NamedSharding(mesh, P())

    def pick(path, leaf):
        key = jax.tree_util.keystr(path)
        for p, (shape, sh) in by_path.items():
            if key.endswith(p) and tuple(leaf.shape) == tuple(shape):
                return sh
        return replicated

    return jax.tree_util.tree_map_with_path(pick, tree)


def abstract_with_shardings(tree, shardings):
    """jax.ShapeDtypeStructs carrying shardings (for lowering, or as an Orbax restore target); `shardings` may be a
    prefix of `tree` (one sharding per nnx.Variable)."""

    def one(s, x):
        if isinstance(x, nnx.Variable):
            return x.replace(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s))
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

    return jax.tree.map(one, shardings, tree)


# ---- activations --------------------------------------------------------------------------------

_CURRENT: contextvars.ContextVar = contextvars.ContextVar("deepjax_sharding", default=None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: dict):
    """Within this context, `constrain` pins activations and MoE layers dispatch over `expert`."""
    token = _CURRENT.set((mesh, rules))
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current() -> Optional[tuple[Mesh, dict]]:
    return _CURRENT.get()


def context_key():
    """A hashable stand-in for the active `use_mesh` context. Pass it as a static argument to a jit that
    may run both inside and outside a mesh context: jit's trace cache does not see context variables."""
    ctx = _CURRENT.get()
    if ctx is None:
        return None
    mesh, rules = ctx
    return mesh, tuple(sorted((k, v if not isinstance(v, list) else tuple(v)) for k, v in rules.items()))


def constrain(x: jax.Array, axes: Sequence[Optional[str]]) -> jax.Array:
    """with_sharding_constraint by logical names; a no-op outside `use_mesh`."""
    ctx = _CURRENT.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, rules, mesh)))


def batch_spec(mesh: Mesh, rules: dict, ndim: int = 2) -> NamedSharding:
    """Sharding of a [B, T, ...] input batch."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, mesh))


def batch_shards(mesh: Mesh, rules: dict) -> int:
    """How many slices the batch axis is split into (a batch's row count must be a multiple of it)."""
    return mesh.size // batch_spec(mesh, rules, ndim=1).shard_shape((mesh.size,))[0]


def check_batch(rows: int, mesh: Mesh, rules: dict, what: str = "batch") -> None:
    """A batch of `rows` rows splits evenly over the mesh's batch shards; MeshError naming `what` (the config
    field, e.g. "data.global_batch=3") and the mesh axes otherwise."""
    n = batch_shards(mesh, rules)
    if rows % n:
        part = logical_to_spec(("batch",), rules, mesh)[0]
        axes = " x ".join(f"{a}={mesh.shape[a]}" for a in ((part,) if isinstance(part, str) else part))
        raise MeshError(f"{what}: {rows} rows do not split evenly over the {n} batch shards of the mesh ({axes}); "
                        f"use a multiple of {n}, or fewer devices on the batch axes")


def spec_table(axes, rules: dict) -> dict[str, list]:
    """param path -> PartitionSpec as a JSON list (mesh-independent), for golden dumps and docs."""
    specs = param_specs(axes, rules)
    return {_path_name(p): [list(e) if isinstance(e, tuple) else e for e in s]
            for p, s in jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, P))}


__all__ = ["MeshConfig", "make_mesh", "mesh_shape", "batch_shards", "check_batch", "rules_for", "RULE_PRESETS",
           "param_specs", "param_shardings",
           "shardings_like_params", "abstract_with_shardings",
           "use_mesh", "constrain", "batch_spec", "spec_table", "logical_to_spec"]

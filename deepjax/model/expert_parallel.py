"""Expert parallelism: routed experts spread over the `expert` mesh axis, tokens sent to them by all-to-all.

Shape key (per device, inside shard_map): T local tokens, K experts per token, X = T*K assignments,
D hidden, E_l = experts on this device, I_l = moe_intermediate_size on this device (split over `tensor`),
P = expert-parallel size, C = slots per (source, destination) pair.

Per MoE layer, on every device:
  1. sort the X (token, expert) assignments by expert; destination device = expert // E_l;
  2. all-to-all the tokens: each destination gets a [C, D] block from every source;
  3. a dropless grouped matmul (`ops.grouped_matmul`: tokamax's kernel, or XLA's ragged_dot) over the received
     tokens, sorted by local expert;
  4. all-to-all the results back, weight them by the gate and add them into their tokens;
  5. with `tensor` > 1, each device held an I-slice of every expert: psum the partial outputs.
Steps 1-4 run per block of TOKEN_CHUNK local tokens. Without expert parallelism (P = 1) the layer is
`moe.routed_experts` on the local tokens, in one piece.

Dropless by default: C = X, so no token is ever dropped (the buffer is sized for the worst case, every
assignment going to one device). `capacity_factor` c sets C = ceil(c X / P) as DeepSeek-V2 did: an
assignment past its destination's C slots is dropped (contributes zero) and counted.

The exchange is `ragged_all_to_all` where the backend implements it (GPU, TPU): only real assignments
travel. XLA:CPU lacks it, so there the same exchange runs on a padded `all_to_all` ([P, C, D] blocks);
both give the same result. Load counts are computed outside, on the global arrays, so balancing sees the
global batch.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh, PartitionSpec as P

from deepjax.model import moe, ops
from deepjax.model.moe import inverse_permutation, routed_experts, sorted_tokens, unsort_sum

ragged_all_to_all = jax.lax.ragged_all_to_all  # module-level so tests can stand in an emulation on CPU
# Local tokens per exchange. Longer local batches go through in blocks (lax.map, rematerialized): the
# dropless receive buffer is P x (block x K) rows, so at V3 shape (P = 8, 4096 tokens) blocks of 1024 cut
# it from 3.5 GiB to 0.9 GiB per copy. Capacity, when set, applies per block.
TOKEN_CHUNK = 1024
from deepjax.parallel.sharding import logical_to_spec


def _axes(spec_entry) -> tuple[str, ...]:
    return (spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry or ())


def _local_experts(xs, local_e, E_l, wg, wu, wd, kernels: str):
    """Dropless grouped matmul over received rows; rows with id E_l (empty slots, sorted last and outside every
    group) give zeros."""
    # the names: what `model.remat=save_experts` keeps (moe.routed_experts_dropless); with several token blocks
    # (TOKEN_CHUNK) each block is rematerialized whole anyway
    o2 = checkpoint_name(jnp.argsort(local_e, stable=True), "moe_order")
    inv2 = checkpoint_name(inverse_permutation(o2), "moe_order")
    sizes = checkpoint_name(jnp.bincount(local_e, length=E_l + 1)[:E_l].astype(jnp.int32), "moe_order")
    xs = checkpoint_name(moe.permute_rows(xs, o2, inv2), "moe_rows")  # a permutation: its gradient gathers too
    ys = moe.grouped_swiglu(xs, wg, wu, wd, lambda x, w: ops.grouped_matmul(x, w, sizes, kernels), pairs=True)
    ys = jnp.where((local_e[o2] < E_l)[:, None], ys, 0)
    return moe.permute_rows(ys, inv2, o2)


class _Plan(NamedTuple):
    """Step 1 for X = T*K assignments, sorted by expert (hence by destination device)."""

    order: jax.Array  # [X] assignment index (t*K + k) in sorted position
    inv: jax.Array  # [X] sorted position of each assignment (order's inverse)
    local_e: jax.Array  # [X] expert id on its destination device
    dest: jax.Array  # [X] destination device
    counts: jax.Array  # [P] assignments per destination
    starts: jax.Array  # [P] where each destination's block starts in sorted order
    pos: jax.Array  # [X] place within its destination's block
    keep: jax.Array  # [X] within capacity


def _plan(idx_TK, E_l: int, ep: int, capacity: int) -> _Plan:
    flat_e = idx_TK.reshape(-1)
    order = jnp.argsort(flat_e, stable=True)
    e_sorted = flat_e[order]
    dest = e_sorted // E_l
    counts = jnp.bincount(dest, length=ep).astype(jnp.int32)
    starts = jnp.cumsum(counts) - counts
    pos = jnp.arange(flat_e.shape[0]) - starts[dest]
    return _Plan(order, inverse_permutation(order), (e_sorted % E_l).astype(jnp.int32), dest, counts, starts, pos,
                 pos < capacity)


def _combine(y_X, w_TK, plan: _Plan, T: int, K: int):
    """Step 4's end: gate-weight the returned rows (dropped ones weigh 0), back to tokens."""
    keep_TK = plan.keep.at[plan.inv].get(unique_indices=True).reshape(T, K)
    return unsort_sum(y_X, plan.order, plan.inv, jnp.where(keep_TK, w_TK, 0.0)), T * K - plan.keep.sum()


def _exchange_ragged(x_TD, w_TK, idx_TK, wg, wu, wd, *, ep: int, capacity: int, axis: str, kernels: str):
    """Steps 1-4 with `ragged_all_to_all` (GPU, TPU): only the assignments travel, no padding.
    The receive buffer is sized for the worst case (ep x capacity rows)."""
    T, K = idx_TK.shape
    E_l, D = wg.shape[0], x_TD.shape[-1]
    plan = _plan(idx_TK, E_l, ep, capacity)
    send = jnp.minimum(plan.counts, capacity)  # the first `capacity` of each destination's block travel
    me = jax.lax.axis_index(axis)
    table = jax.lax.all_gather(send, axis)  # [source, destination] rows sent
    at_receiver = jnp.cumsum(table, axis=0) - table  # where source s's rows land on destination d
    at_sender = jax.lax.all_gather(plan.starts, axis)  # replies land where each source's block began
    recv = table[:, me]
    R = ep * capacity
    rows = ragged_all_to_all(sorted_tokens(x_TD, plan.order, plan.inv, K), jnp.zeros((R, D), x_TD.dtype),
                             plan.starts, send, at_receiver[me], recv, axis_name=axis)
    ids = ragged_all_to_all(plan.local_e, jnp.full((R,), E_l, jnp.int32), plan.starts, send,
                            at_receiver[me], recv, axis_name=axis)
    ys = _local_experts(rows, ids, E_l, wg, wu, wd, kernels).astype(x_TD.dtype)
    back = ragged_all_to_all(ys, jnp.zeros((T * K, D), x_TD.dtype), at_receiver[:, me], recv,
                             at_sender[:, me], send, axis_name=axis)
    return _combine(back, w_TK, plan, T, K)


def _exchange(x_TD, w_TK, idx_TK, wg, wu, wd, *, ep: int, capacity: int, axis: str, kernels: str):
    """Steps 1-4 on one device with a padded all_to_all (every backend). Returns (y_TD float32, dropped)."""
    T, K = idx_TK.shape
    E_l, D = wg.shape[0], x_TD.shape[-1]
    plan = _plan(idx_TK, E_l, ep, capacity)
    slot = jnp.where(plan.keep, plan.pos, capacity)  # out of range: dropped by mode="drop"
    send_x = jnp.zeros((ep, capacity, D), x_TD.dtype).at[plan.dest, slot].set(
        sorted_tokens(x_TD, plan.order, plan.inv, K), mode="drop")
    send_e = jnp.full((ep, capacity), E_l, jnp.int32).at[plan.dest, slot].set(plan.local_e, mode="drop")
    recv_x = jax.lax.all_to_all(send_x, axis, 0, 0, tiled=True).reshape(ep * capacity, D)
    recv_e = jax.lax.all_to_all(send_e, axis, 0, 0, tiled=True).reshape(ep * capacity)
    back = _local_experts(recv_x, recv_e, E_l, wg, wu, wd, kernels).reshape(ep, capacity, D)
    ret = jax.lax.all_to_all(back, axis, 0, 0, tiled=True)
    return _combine(ret.at[plan.dest, slot].get(mode="fill", fill_value=0), w_TK, plan, T, K)


class ShardedExperts:
    """An `experts_fn` for MoE that runs inside shard_map on `mesh` (hashable: usable as a static arg)."""

    def __init__(self, mesh: Mesh, rules: dict, capacity_factor: Optional[float] = None,
                 exchange: str = "auto", kernels: str = "auto"):
        """exchange: "ragged" (ragged_all_to_all), "padded" (all_to_all), or "auto": ragged where the
        backend implements it (GPU, TPU), padded on CPU. kernels: `ModelConfig.kernels`."""
        self.mesh, self.rules, self.capacity_factor, self.kernels = mesh, rules, capacity_factor, kernels
        if exchange == "auto":
            exchange = "padded" if mesh.devices.flat[0].platform == "cpu" else "ragged"
        if exchange not in ("ragged", "padded"):
            raise ValueError(f"exchange={exchange!r}: choose ragged, padded or auto")
        self.exchange = exchange
        self.batch_axes = _axes(logical_to_spec(("batch",), rules, mesh)[0] if logical_to_spec(
            ("batch",), rules, mesh) else None)
        exp_spec = logical_to_spec(("exp",), rules, mesh)
        self.exp_axes = _axes(exp_spec[0] if exp_spec else None)
        mlp_spec = logical_to_spec(("moe_mlp",), rules, mesh)
        self.mlp_axes = _axes(mlp_spec[0] if mlp_spec else None)
        if len(self.exp_axes) > 1:
            raise ValueError(f"experts may be sharded over one mesh axis, got {self.exp_axes}")
        if self.exp_axes and self.exp_axes[0] not in self.batch_axes:
            raise ValueError(f"expert axis {self.exp_axes[0]!r} must also split the batch "
                             f"(batch axes: {self.batch_axes}) for all-to-all dispatch")

    def _key(self):
        return (id(self.mesh), tuple(sorted((k, str(v)) for k, v in self.rules.items())), self.capacity_factor,
                self.exchange, self.kernels)

    def __hash__(self):
        return hash(self._key())

    def __eq__(self, other):
        return isinstance(other, ShardedExperts) and self._key() == other._key() and self.mesh == other.mesh

    def __call__(self, x_TD, w_TK, idx_TK, wg_EDI, wu_EDI, wd_EID):
        mesh = self.mesh
        ep = math.prod(mesh.shape[a] for a in self.exp_axes) if self.exp_axes else 1
        n_tok = math.prod(mesh.shape[a] for a in self.batch_axes) if self.batch_axes else 1
        T_local = x_TD.shape[0] // n_tok
        if x_TD.shape[0] % n_tok:
            raise ValueError(f"{x_TD.shape[0]} tokens do not split over batch axes {self.batch_axes} ({n_tok})")
        n_chunks = T_local // TOKEN_CHUNK if ep > 1 and T_local > TOKEN_CHUNK and T_local % TOKEN_CHUNK == 0 else 1
        X = T_local // n_chunks * idx_TK.shape[1]
        capacity = X if self.capacity_factor is None else max(1, math.ceil(self.capacity_factor * X / ep))
        tok = P(self.batch_axes or None)
        e_ax = self.exp_axes[0] if self.exp_axes else None
        m_ax = self.mlp_axes or None
        in_specs = (tok, tok, tok, P(e_ax, None, m_ax), P(e_ax, None, m_ax), P(e_ax, m_ax, None))

        def chunk(x, w, idx, wg, wu, wd):
            if ep == 1:
                y = routed_experts(x, w, idx, wg, wu, wd, self.kernels)
                return y.astype(jnp.float32), jnp.zeros((), jnp.int32)
            fn = _exchange_ragged if self.exchange == "ragged" else _exchange
            return fn(x, w, idx, wg, wu, wd, ep=ep, capacity=capacity, axis=e_ax, kernels=self.kernels)

        def inner(x, w, idx, wg, wu, wd):
            if n_chunks == 1:
                y, dropped = chunk(x, w, idx, wg, wu, wd)
            else:  # token blocks one after another, each rematerialized: buffers scale with the block
                split = lambda a: a.reshape(n_chunks, a.shape[0] // n_chunks, *a.shape[1:])
                body = jax.checkpoint(lambda xs: chunk(*xs, wg, wu, wd))
                y, dropped = jax.lax.map(body, (split(x), split(w), split(idx)))
                y, dropped = y.reshape(-1, y.shape[-1]), dropped.sum()
            if self.mlp_axes:
                y = jax.lax.psum(y, self.mlp_axes)
            if self.batch_axes:  # identical across the other axes, where tokens are replicated
                dropped = jax.lax.psum(dropped, self.batch_axes)
            return y.astype(x.dtype), dropped

        fn = jax.shard_map(inner, mesh=mesh, in_specs=in_specs, out_specs=(tok, P()), check_vma=False)
        return fn(x_TD, w_TK, idx_TK, wg_EDI, wu_EDI, wd_EID)

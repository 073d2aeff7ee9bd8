"""The DeepSeek-V3 MoE-MLA transformer, with multi-token prediction. NNX modules, used functionally:

    graphdef, params = init(cfg, jax.random.key(0))       # split once
    out = forward(graphdef, params, tokens_BT)             # pure; jit it (graphdef is static)

Shape key: B batch, T length, D hidden, V vocab, E routed experts, L layers, M MTP depth.

Layout: embed -> `first_k_dense_replace` dense blocks (scanned) -> MoE blocks (scanned) -> norm -> head.
MTP module k (V3 section 2.2): h_k = Block(eh_proj([RMSNorm_e(Emb(t_{i+k})) ; RMSNorm_h(h_{k-1})])),
logits_k = head(norm_k(h_k)) predicts t_{i+k+1}; embedding and head are shared with the main model,
h_0 is the main model's last hidden state before its final norm.

Departures: none in the math. Router statistics (per-layer expert loads, sequence-wise balance loss)
are returned with the logits rather than accumulated in module state, to keep forward pure.
"""

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from deepjax.held_jit import held_jit
from deepjax.model.config import REMAT_POLICIES, ModelConfig
from deepjax.parallel import sharding
from deepjax.model.expert_parallel import ShardedExperts
from deepjax.model.mla import MLA
from deepjax.model import ops
from deepjax.model.moe import MoE, routed_experts
from deepjax.model.layers import MLP, Param, RMSNorm, dtype_of, normal_init
from deepjax.model.rope import rope_tables


ACT_AXES = ("batch", "length", "act_embed")  # the residual stream between blocks


class Output(NamedTuple):
    logits: Optional[jnp.ndarray]  # [B, T, V] float32 (None when the forward was given targets)
    mtp_logits: Optional[jnp.ndarray]  # [M, B, T, V] float32; depth k at index k-1 predicts t_{i+k+1}
    expert_load: jnp.ndarray  # [L_moe, E] tokens per expert per MoE layer (valid tokens only)
    balance_loss: jnp.ndarray  # [L_moe] sequence-wise balance loss per MoE layer (without alpha)
    mtp_expert_load: Optional[jnp.ndarray]  # [M, E]
    mtp_balance_loss: Optional[jnp.ndarray]  # [M]
    dropped_tokens: jnp.ndarray  # (token, expert) assignments dropped by a capacity limit, all layers
    hidden: jnp.ndarray  # [B, T, D] last hidden state before the final norm
    ce: Optional[jnp.ndarray] = None  # [1 + M] weighted cross-entropy sums, when the forward was given targets
    routes: Optional[jnp.ndarray] = None  # [L_moe, B, T, K] int32: the experts each token used in each MoE layer
    route_diff: Optional[jnp.ndarray] = None  # [L_moe]: tokens with given routes whose own routing differs


# model.layer_loop=auto takes the Python loop on GPUs for models of at most this many layers: each layer is then
# compiled on its own (the bench preset's 12 layers: 175 s against the scan's 39 s on an H100).
AUTO_PYTHON_LOOP_MAX_LAYERS = 16


def python_layer_loop(cfg: ModelConfig) -> bool:
    """Whether training runs the layer stacks as a Python loop (`ModelConfig.layer_loop`): "python", or "auto" on
    a GPU with at most AUTO_PYTHON_LOOP_MAX_LAYERS layers. With `lax.scan` XLA:GPU stacks every residual the
    backward keeps into a zero-filled [L, ...] buffer, updates it each layer and slices it again: at the bench
    preset (remat none, H100) 101 ms a step as a loop against 139 ms as a scan (docs/LOG.md, session 17)."""
    if cfg.layer_loop == "auto":
        return ops.platform() in ("gpu", "cuda") and cfg.num_hidden_layers <= AUTO_PYTHON_LOOP_MAX_LAYERS
    return cfg.layer_loop == "python"


def _split(a):
    return [p.reshape(p.shape[1:]) for p in jax.lax.split(a, (1,) * a.shape[0], axis=0)]


@jax.custom_vjp
def _split_dus(a):
    """`_split`, whose gradient writes each layer's cotangent into its slice of one stack (`_stack_buffer`)
    (dynamic_update_slice, in place) instead of the split's transpose (one concatenation of the L cotangents).
    On an H100 (bench/stack_grads.py, 11 x [64, 1024, 512] bf16) 0.91 ms against the concatenation's 1.75 ms
    for each of the bench preset's three expert stacks (docs/LOG.md, session 19)."""
    return _split(a)


def _split_dus_fwd(a):
    return _split(a), jax.ShapeDtypeStruct(a.shape, a.dtype)


def _stack_buffer(shape, dtype):
    """The stack `_split_dus_bwd` writes every layer's slice of: uninitialized (`lax.empty`: on GPU a buffer with
    no fill pass, ~2.4 GB of writes a step at the bench preset) outside a mesh or on a one-device mesh (`deepjax
    train` and bench/train_bench.py on one GPU); zeros on a larger mesh, where a buffer without a sharding would
    be partitioned as replicated and resharded."""
    ctx = sharding.current()
    return jnp.zeros(shape, dtype) if ctx is not None and ctx[0].devices.size > 1 else jax.lax.empty(shape, dtype)


def _split_dus_bwd(like, cts):
    buf = _stack_buffer(like.shape, like.dtype)
    for l, ct in enumerate(cts):
        buf = jax.lax.dynamic_update_slice_in_dim(buf, ct[None], l, axis=0)
    return (buf,)


_split_dus.defvjp(_split_dus_fwd, _split_dus_bwd)


def _unrolled(body, x, state, routes_LBTK):
    """`lax.scan(body, x, (state, None, routes))` as a Python loop over the layers (`python_layer_loop`): each
    layer's residuals are arrays of their own. The stacks are split with `_split_dus`, whose gradient writes the
    layers' gradients into one stack in place (a slice's transpose would pad each to the whole stack)."""
    leaves, treedef = jax.tree.flatten(state)
    L = leaves[0].shape[0]
    if routes_LBTK is not None and routes_LBTK.shape[0] != L:
        raise ValueError(f"routes for {routes_LBTK.shape[0]} layers, the stack has {L}")
    parts = [_split_dus(a) for a in leaves]
    # One jitted layer: traced and lowered once, called L times (XLA inlines the calls, so the compiled step is the
    # same). At the bench preset on the GPU paths (lowered for CUDA on a 2-core CPU) the step traced in 24.5 s and
    # lowered in 31.1 s with the layers written out L times, 4.0 s and 4.4 s this way; on an H100 the B 8 x T 2048
    # step compiled in 87.5 s (session 19: 155.6 s) (docs/LOG.md, session 22).
    body = jax.jit(body)
    outs = []
    for l in range(L):
        layer = jax.tree.unflatten(treedef, [p[l] for p in parts])
        x, out = body(x, (layer, None, None if routes_LBTK is None else routes_LBTK[l]))
        outs.append(out)
    return x, jax.tree.map(lambda *v: jnp.stack(v), *outs)


def remat_policy(name: str):
    """The `jax.checkpoint` policy of a `ModelConfig.remat` name, or False for no rematerialization:
      none          keep every intermediate of the layer for the backward (fastest, most memory)
      full          keep only the layer's input; recompute the whole layer in the backward
      save_dots     keep the outputs of matmuls without batch dimensions (the projections); recompute the rest
      save_outputs  keep the attention and FFN / MoE outputs of each layer; recompute inside them
      save_experts  keep the routed experts' rows (dispatched inputs, gate/up and down products, the SwiGLU
                    product) and their sort; recompute attention and the dense parts. The expert matmuls and
                    the row gathers are not recomputed: ~7.7 GB more than `full` at the bench preset, B 8 x T 2048"""
    if name == "none":
        return False
    if name == "full":
        return None
    if name == "save_dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    if name == "save_outputs":
        return jax.checkpoint_policies.save_only_these_names("attn_out", "ffn_out")
    if name == "save_experts":
        return jax.checkpoint_policies.save_only_these_names("moe_rows", "moe_order")
    raise ValueError(f"remat={name!r}: choose from {REMAT_POLICIES}")


class Block(nnx.Module):
    """Pre-norm residual block: x + MLA(norm(x)), then x + FFN(norm(x)); FFN is an MLP or a MoE."""

    def __init__(self, cfg: ModelConfig, moe: bool, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg)
        self.attn = MLA(cfg, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg)
        self.ffn = MoE(cfg, rngs=rngs) if moe else MLP(cfg, cfg.intermediate_size, rngs=rngs)

    def __call__(self, x_BTD, cos, sin, start_BT, valid_BT, experts_fn, kv_BSc=None, pos_BT=None,
                 attn_impl: str = "naive", routes_BTK=None, replay: bool = True):
        """(x, aux, kv_BSc): aux is the MoE's `MoEAux` or None; kv_BSc the layer's cache with the new tokens' rows
        written (`MLA.__call__`; None in training). routes_BTK / replay: routing replay (`MoE.__call__`)."""
        h_BTD = self.attn_norm(x_BTD)
        if kv_BSc is None:
            a_BTD = self.attn(h_BTD, cos, sin, start_BT)
        else:
            a_BTD, kv_BSc = self.attn(h_BTD, cos, sin, start_BT, kv_BSc, pos_BT, attn_impl)
        x_BTD = x_BTD + checkpoint_name(a_BTD, "attn_out")
        h_BTD = self.ffn_norm(x_BTD)
        if isinstance(self.ffn, MoE):
            y_BTD, aux = self.ffn(h_BTD, valid_BT, experts_fn, routes_BTK, replay)
            return x_BTD + checkpoint_name(y_BTD, "ffn_out"), aux, kv_BSc
        return x_BTD + checkpoint_name(self.ffn(h_BTD), "ffn_out"), None, kv_BSc


class Cache(NamedTuple):
    """The decode cache (`MLA.__call__`): per stack (dense, MoE), one array per layer: rows [B, S, C + R] =
    [normalized latent c ; rotated k_pe]. Separate buffers per layer, not one stacked [L, ...] array: the decode
    loop updates each in place, where reading a layer out of a stacked cache copies it at every step on GPU."""
    dense: tuple
    moe: tuple


class MTPModule(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D = cfg.hidden_size
        self.enorm = RMSNorm(D, cfg)
        self.hnorm = RMSNorm(D, cfg)
        self.eh_proj = Param(normal_init(cfg)(rngs.params(), (2 * D, D), dtype_of(cfg.param_dtype)),
                             axes=(None, "embed"))
        self.block = Block(cfg, moe=cfg.n_routed_experts > 0, rngs=rngs)
        self.norm = RMSNorm(D, cfg)  # shared_head.norm in DeepSeek's weights


def _stack(n: int, make, rngs: nnx.Rngs):
    """n copies of a module with a leading layer axis on every variable, for `lax.scan`."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(r):
        return make(r)

    return create(rngs)


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        V, D, pdt, init = cfg.vocab_size, cfg.hidden_size, dtype_of(cfg.param_dtype), normal_init(cfg)
        self.embed = Param(init(rngs.params(), (V, D), pdt), axes=("vocab", "embed"))
        self.dense_layers = (
            _stack(cfg.n_dense_layers, lambda r: Block(cfg, moe=False, rngs=r), rngs)
            if cfg.n_dense_layers else None)
        self.moe_layers = (
            _stack(cfg.n_moe_layers, lambda r: Block(cfg, moe=True, rngs=r), rngs)
            if cfg.n_moe_layers else None)
        self.norm = RMSNorm(D, cfg)
        self.head = Param(init(rngs.params(), (D, V), pdt), axes=("embed", "vocab"))
        self.mtp = nnx.List([MTPModule(cfg, rngs=rngs) for _ in range(cfg.num_nextn_predict_layers)])

    def _scan(self, stack, x_BTD, cos, sin, start_BT, valid_BT, experts_fn, kv_LBSc=None, routes_LBTK=None,
              replay: bool = True):
        graphdef, state = nnx.split(stack)

        def body(x, xs):
            layer_state, kv, routes = xs
            x, aux, kv = nnx.merge(graphdef, layer_state)(x, cos, sin, start_BT, valid_BT, experts_fn, kv,
                                                          routes_BTK=routes, replay=replay)
            return sharding.constrain(x, ACT_AXES), (aux, kv)

        policy = remat_policy(self.cfg.remat)
        if policy is not False and kv_LBSc is None:
            body = jax.checkpoint(body, policy=policy)
        if kv_LBSc is not None or not python_layer_loop(self.cfg):
            return jax.lax.scan(body, x_BTD, (state, kv_LBSc, routes_LBTK))
        return _unrolled(body, x_BTD, state, routes_LBTK)

    def embed_tokens(self, tokens_BT):
        # Cast before the lookup: the table's gradient (a scatter-add, full [V, D] per device under FSDP)
        # is then built in the compute dtype.
        dt = dtype_of(self.cfg.dtype)
        return sharding.constrain(jnp.take(self.embed[...].astype(dt), tokens_BT, axis=0), ACT_AXES)

    def mtp_input(self, mod: "MTPModule", h_BTD, next_BT):
        """MTP module `mod`'s block input from the previous depth's hidden states and the embeddings of the tokens one
        further ahead: eh_proj([RMSNorm_e(Emb(next)) ; RMSNorm_h(h)])."""
        dt = h_BTD.dtype
        e_BTD = jnp.take(self.embed[...].astype(dt), next_BT, axis=0)
        return jnp.concatenate([mod.enorm(e_BTD), mod.hnorm(h_BTD)], axis=-1) @ mod.eh_proj[...].astype(dt)

    def blocks(self, x_BTD, cos, sin, start_BT, valid_BT, experts_fn, cache: Optional[Cache] = None, pos_BT=None,
               attn_impl: str = "naive", layers: Optional[dict] = None, routes=None, replay: bool = True):
        """The dense then the MoE blocks: (x [B, T, D], the MoE layers' `MoEAux` stacked over layers or None, cache).

        cache None: training (each stack scanned, under the remat policy). With a `Cache`, every block writes its new
        rows and attends as `MLA.__call__` says for pos_BT and attn_impl (a prefill: pos_BT None). layers: the stacks
        as lists of per-layer modules (`deepjax.infer.sampling.unstack_layers`), run as a Python loop (the decoder's
        form); else the stacks are scanned. routes: [L_moe, B, T, K] expert choices to replay (-1: the router's own;
        `MoE.__call__`), or None."""
        caches, aux = [None, None], None
        for i, name in enumerate(("dense_layers", "moe_layers")):
            stack = getattr(self, name)
            if stack is None:
                caches[i] = () if cache is None else cache[i]
                continue
            if layers is not None:
                kvs, out = list(cache[i]), []
                for l, blk in enumerate(layers[name]):
                    r = routes[l] if routes is not None and name == "moe_layers" else None
                    x_BTD, a, kvs[l] = blk(x_BTD, cos, sin, start_BT, valid_BT, experts_fn, kvs[l], pos_BT, attn_impl,
                                           r, replay)
                    out.append(a)
                a = None if out[0] is None else jax.tree.map(lambda *v: jnp.stack(v), *out)
                caches[i] = tuple(kvs)
            else:
                kv_LBSc = None if cache is None else jnp.stack(cache[i])
                if cache is not None and pos_BT is not None:
                    raise ValueError("Transformer.blocks: decoding at pos_BT takes per-layer `layers`")
                x_BTD, (a, kv_LBSc) = self._scan(stack, x_BTD, cos, sin, start_BT, valid_BT, experts_fn, kv_LBSc,
                                                 routes if name == "moe_layers" else None, replay)
                caches[i] = () if kv_LBSc is None else tuple(kv_LBSc)
            if name == "moe_layers":
                aux = a
        return x_BTD, aux, None if cache is None else Cache(*caches)

    def logits(self, h_BTD, norm: RMSNorm):
        logits_BTV = (norm(h_BTD) @ self.head[...].astype(h_BTD.dtype)).astype(jnp.float32)
        return sharding.constrain(logits_BTV, ("batch", "length", "vocab"))

    def token_logprobs(self, h_BTD, tokens_BT, temperature: float = 1.0):
        """(logp, entropy) [B, T] float32 from the main head on h (`Output.hidden`, before the final norm): at t >= 1
        log softmax(logits[t-1] / temperature)[tokens[t]] and that distribution's entropy (no gradient); 0 at t = 0.
        The same numbers as from `logits` (`ops.lm_head_logprobs`: by chunks of positions, no [B, T, V] array)."""
        lp, ent = ops.lm_head_logprobs(self.norm(h_BTD[:, :-1]), self.head[...].astype(h_BTD.dtype), tokens_BT[:, 1:],
                                       float(temperature))
        pad = lambda x: jnp.pad(x, ((0, 0), (1, 0)))  # noqa: E731
        return pad(lp), pad(ent)

    def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, experts_fn=None, targets=None,
                 routes=None, replay_routes: bool = True) -> Output:
        """targets: None, or one (targets_BT, weights_BT) pair per prediction depth (main head, then each MTP
        module): then the output holds `ce` (each depth's weighted cross-entropy sum, `ops.lm_head_ce`) instead of
        logits, and no [B, T, V] logits are formed. routes: [L_moe, B, T, K] expert choices (e.g. the sampler's,
        -1 where none) that the main model's MoE layers use (replay_routes) or only compare with their own."""
        cfg = self.cfg
        if experts_fn is None:
            experts_fn = default_experts_fn(cfg)
        B, T = tokens_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if segment_ids_BT is None:
            segment_ids_BT = jnp.ones((B, T), jnp.int32)
        cos, sin = rope_tables(cfg, positions_BT)
        # Causal within a document (a run of equal segment ids); padding (segment 0) attends only to padding.
        start_BT = ops.doc_starts(segment_ids_BT)
        valid_BT = segment_ids_BT > 0

        x_BTD, aux, _ = self.blocks(self.embed_tokens(tokens_BT), cos, sin, start_BT, valid_BT, experts_fn,
                                    routes=routes, replay=replay_routes)
        E = cfg.n_routed_experts
        load_LE, bal_L = jnp.zeros((0, E), jnp.float32), jnp.zeros((0,), jnp.float32)
        dropped = jnp.zeros((), jnp.int32)
        used_routes = route_diff = None
        if aux is not None:
            load_LE, bal_L, dropped, used_routes, route_diff = aux.load, aux.balance, aux.dropped.sum(), aux.routes, \
                aux.route_diff
        heads = [(x_BTD, self.norm)]

        mtp_load, mtp_bal = [], []
        h_BTD = x_BTD
        for k, mod in enumerate(self.mtp, start=1):
            h_BTD = self.mtp_input(mod, h_BTD, jnp.pad(tokens_BT[:, k:], ((0, 0), (0, k))))
            _, mtp_valid_BT = mtp_targets(tokens_BT, segment_ids_BT, k - 1)
            h_BTD, aux, _ = mod.block(h_BTD, cos, sin, start_BT, valid_BT & mtp_valid_BT, experts_fn)
            heads.append((h_BTD, mod.norm))
            mtp_load.append(aux[0])
            mtp_bal.append(aux[1])
            dropped = dropped + aux[2]
        stack = lambda xs: jnp.stack(xs) if xs else None  # noqa: E731
        logits, mtp_logits, ce = None, None, None
        if targets is None:
            logits = self.logits(*heads[0])
            mtp_logits = stack([self.logits(h, n) for h, n in heads[1:]])
        else:
            if len(targets) != len(heads):
                raise ValueError(f"targets: {len(targets)} (targets, weights) pairs for {len(heads)} prediction "
                                 "depths (the main head and each MTP module)")
            w_DV = self.head[...].astype(dtype_of(cfg.dtype))
            ce = jnp.stack([ops.lm_head_ce(n(h), w_DV, t, w) for (h, n), (t, w) in zip(heads, targets)])
        return Output(logits, mtp_logits, load_LE, bal_L, stack(mtp_load), stack(mtp_bal), dropped, x_BTD, ce,
                      used_routes, route_diff)


def default_experts_fn(cfg: ModelConfig):
    """Local dropless experts on one device; under a mesh (`sharding.use_mesh`), the shard_map path:
    all-to-all over `expert` when experts are sharded, a capacity limit when cfg.capacity_factor is set."""
    ctx = sharding.current()
    if ctx is None:
        return functools.partial(routed_experts, kernels=cfg.kernels)
    return ShardedExperts(*ctx, capacity_factor=cfg.capacity_factor, kernels=cfg.kernels)


def mtp_targets(tokens_BT, segment_ids_BT, k: int):
    """Targets t_{i+k+1} for prediction depth k (0 = the main head) and where they exist in the same document."""
    B, T = tokens_BT.shape
    s = k + 1
    targets_BT = jnp.pad(tokens_BT[:, s:], ((0, 0), (0, s)))
    seg_next_BT = jnp.pad(segment_ids_BT[:, s:], ((0, 0), (0, s)))
    in_range_T = jnp.arange(T) < T - s
    return targets_BT, in_range_T[None] & (seg_next_BT == segment_ids_BT) & (segment_ids_BT > 0)


# ---- the functional interface -------------------------------------------------------------------

def init(cfg: ModelConfig, key: jax.Array):
    """(graphdef, params): params is an nnx.State holding Param and RouterBias variables.
    Created under one jit (NNX's eager init would dispatch op by op)."""
    graphdef, _ = abstract_init(cfg)
    params = jax.jit(lambda k: nnx.split(Transformer(cfg, rngs=nnx.Rngs(params=k)))[1])(key)
    return graphdef, params


def abstract_init(cfg: ModelConfig):
    """Shapes only (nothing allocated): works for the full 671B model."""
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(params=0)))
    return nnx.split(model)


def forward(graphdef, params, tokens_BT, positions_BT=None, segment_ids_BT=None, experts_fn=None,
            targets=None, routes=None, replay_routes: bool = True) -> Output:
    """The pure forward pass. Jit with `jax.jit(forward, static_argnums=0)` (see `jit_forward`).
    Inside `deepjax.parallel.sharding.use_mesh(...)` the MoE layers dispatch tokens over the mesh.
    With `targets` (see `Transformer.__call__`) it returns per-depth cross-entropy sums instead of logits."""
    return nnx.merge(graphdef, params)(tokens_BT, positions_BT, segment_ids_BT, experts_fn, targets, routes,
                                       replay_routes)


@held_jit(static_argnums=(0, 5, 6))
def _jit_forward(graphdef, params, tokens_BT, positions_BT, segment_ids_BT, experts_fn, mesh_context):
    del mesh_context  # only keys the cache: a trace made under one mesh is never reused under another
    return forward(graphdef, params, tokens_BT, positions_BT, segment_ids_BT, experts_fn)


def jit_forward(graphdef, params, tokens_BT, positions_BT=None, segment_ids_BT=None, experts_fn=None) -> Output:
    """`forward` under jax.jit, retraced when the `sharding.use_mesh` context changes."""
    return _jit_forward(graphdef, params, tokens_BT, positions_BT, segment_ids_BT, experts_fn, sharding.context_key())


# ---- parameter inventory ------------------------------------------------------------------------

def path_str(path) -> str:
    return ".".join(str(getattr(p, "key", p)) for p in path)


def param_table(params) -> list[tuple[str, tuple, str]]:
    """[(path, shape, dtype)] for every variable, in tree order."""
    flat = nnx.to_flat_state(params)
    return [(path_str(path), tuple(v.shape), str(v.dtype)) for path, v in flat]


ROUTED_EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")  # `MoE`'s routed expert stacks


def precast_experts(params, dtype):
    """params with the MoE layers' routed expert stacks (`moe_layers.ffn.w_gate / w_up / w_down`) cast to `dtype`, the
    compute dtype, which is all the forward ever reads of them (`MoE.__call__` casts them before the experts), so
    the forward, its values and its gradients are the same; the gradient with respect to a cast stack comes in that
    dtype (the value the float32 stack's gradient would hold, before its cast back to float32). For a gradient
    accumulation loop: one cast and one bf16 split of the stacks per update instead of per micro-batch, and each
    micro-batch's stack gradients written in bf16 (`rl.update.make_grpo_step`)."""
    def one(path, x):
        keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        routed = keys[:1] == ["moe_layers"] and keys[-2:-1] == ["ffn"] and keys[-1] in ROUTED_EXPERT_WEIGHTS
        return x.astype(dtype) if routed else x

    return jax.tree_util.tree_map_with_path(one, params)


def count_params(params, include_mtp: bool = True) -> int:
    total = 0
    for path, shape, _ in param_table(params):
        if not include_mtp and path.startswith("mtp."):
            continue
        total += int(np.prod(shape))
    return total


def count_active_params(cfg: ModelConfig, params) -> int:
    """Parameters touched per token by the main model: all but the (E - K) unchosen experts per MoE layer."""
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    unchosen = cfg.n_moe_layers * (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert
    return count_params(params, include_mtp=False) - unchosen


def param_shardings(params, mesh, rules: dict):
    """NamedSharding per parameter from the axes it was created with (`sharding.param_shardings`)."""
    return sharding.param_shardings(params, logical_axes(params), mesh, rules)


def spec_table(params, rules: dict) -> dict[str, list]:
    """param path -> PartitionSpec as a JSON list (`sharding.spec_table`), for golden dumps and docs."""
    return sharding.spec_table(logical_axes(params), rules)


def init_sharded(cfg: ModelConfig, key: jax.Array, mesh, rules: dict):
    """(graphdef, params, shardings): params created directly in their shardings under one jit, so the
    full model never exists on one device."""
    graphdef, abstract = abstract_init(cfg)
    shardings = param_shardings(abstract, mesh, rules)

    def create(k):
        return nnx.split(Transformer(cfg, rngs=nnx.Rngs(params=k)))[1]

    params = jax.jit(create, out_shardings=shardings)(key)
    return graphdef, params, shardings


def logical_axes(params):
    """Tree of logical axis-name tuples; scanned stacks get a leading "layers" axis."""

    def axes_of(v):
        axes = tuple(v.get_metadata().get("axes", (None,) * v.ndim))
        if len(axes) == v.ndim - 1:
            axes = ("layers",) + axes
        if len(axes) != v.ndim:
            raise ValueError(f"variable of shape {v.shape} has axes {axes}")
        return axes

    return jax.tree.map(axes_of, params, is_leaf=lambda x: isinstance(x, nnx.Variable))

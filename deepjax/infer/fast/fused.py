"""The one-device decode step with its weights fused once per `generate` call: fewer, larger kernels per step.

At batch 1 the decode step is bound by many small kernels, not bytes (docs/LOG.md: ~44 kernels per layer on the
bench preset before this, ~2 us each). `sampling.fuse_layers` rewrites each layer's weights once, outside the
decode loop, so that a layer needs fewer matmuls and no sorts (on one H100, batch 1: 721 -> 1,231 tokens/s):

    w_in   [Q + C + R, D]   wq_a and wkv_a side by side: one matmul reads x for the query and the latent
    w_q    [N, C + R, Q]    the key up-projection absorbed into the query weights (q_nope W_uk, computed in
                            float32 once), beside the rope part: one matmul gives the query in latent space
    w_uv   [N, V, C + R]    the value up-projection with R zero columns, so the output reads the whole cache
                            row [c ; k_pe] and never a sliced copy of c
    w_gu   [E + S, 2 I, D]  routed experts' gate and up side by side, the S shared experts appended as
    w_down [E + S, D, I]    experts of weight 1 (a SwiGLU of width S*I is the sum of S SwiGLUs of width I);
                            or, for the grouped decode with kernel tuning grouped.shared_dense, the routed ones
                            only and the shared experts apart as the model's one MLP (shared_gu, shared_down)

and routing ranks the experts by comparisons (`route_by_rank`) instead of three top-k sorts. Every fused matrix
is stored output-major (the contracted axis last): at batch 1 XLA:GPU lowers a matrix-vector product to a
reduction, and a reduction over the minor axis (a row reduction) streams memory far better than one over the
major axis (measured: 892 -> 1,119 tokens/s at batch 1). The math is that of the module path
(`sampling.decode_tokens` with per-layer modules); only summation order and the rounding of the absorbed query
weights differ (tests/test_sampling.py checks both against the full forward).

The cache row of a token is [c ; k_pe] (C + R values), one buffer per layer, so absorbed attention is one score
matmul over the whole row: s = [q_c ; q_pe] . [c ; k_pe].

On GPU the step also calls Pallas kernels (`deepjax.infer.fast.kernels`, chosen per block by `fuse_block`): attention over
the latent cache with the new row written in place, the router, the gathered experts, and for a few tokens the
norms, projections and rope around attention and the router (a block may then return its experts' output
unsummed, `Pending`, for the next block's first kernel to sum), and for more tokens the query's and the row's
last steps inside the attention kernel, with the norm weights folded into w_in and w_q and w_uv . wo merged into
w_o [N * C, D] ("attn_pre", fuse_block's "folded"). With `prefill=True`, `fused_block` runs the
prompts: the routed experts as grouped matmuls (`deepjax.infer.fast.grouped`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from deepjax.infer.fast import kernels as KN
from deepjax.infer.fast import grouped as KG
from deepjax.model.config import ModelConfig
from deepjax.model.moe import (MoE, gate_weights, router_logits, router_logits_from_parts, router_parts,
                               router_scores, splits_router)
from deepjax.model.moe import route as moe_route
from deepjax.model.layers import rms_norm
from deepjax.model.mla import absorbed_attention, write_rows  # noqa: F401  (the model's absorbed step; re-exported)
from deepjax.model.rope import apply_rope
from deepjax.schema import bad

NEG = float(jnp.finfo(jnp.float32).min)
# The routers `route_by_rank` implements (`moe.route`'s). The scores and gate weights are the model's own
# (`moe.router_scores`, `moe.gate_weights`), so every scoring_func and norm_topk_prob the model has is the fused
# step's too; a topk_method outside this tuple is refused by name (`check_supported`), never routed as plain top-k.
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


def check_supported(cfg: ModelConfig) -> None:
    """Raises ConfigError naming the field when the fused decode step does not implement `cfg` (`fuse_block` and
    `route_by_rank` call it: a config the step does not know is an error, never a silent difference from the
    model). tests/test_decode_contract.py holds every decode path to this."""
    if cfg.topk_method not in TOPK_METHODS:
        raise bad("model.topk_method", cfg.topk_method,
                  f"the fused decode step (deepjax/infer/fast/fused.py, route_by_rank) implements {TOPK_METHODS}; "
                  "implement it there, or decode with sampling.decoder='model' (the model's own moe.route)")
    if cfg.topk_method != "greedy" and cfg.n_group > 1:
        kept = cfg.topk_group * (cfg.n_routed_experts // cfg.n_group)
        if kept < cfg.num_experts_per_tok:  # (ModelConfig.validate refuses it too; a replaced config may skip that)
            raise bad("model.topk_group", cfg.topk_group,
                      f"the kept groups hold {kept} experts < num_experts_per_tok={cfg.num_experts_per_tok}: "
                      "route_by_rank ranks the kept experts first and needs K of them")


# ---------------------------------------------------------------------------------------------------- routing


def _rank_desc(v, first=None):
    """Rank of each entry along the last axis in descending order, ties to the lower index (lax.top_k's order).
    first (bool, v's shape, or None): entries with it set rank before every entry without it, each class ordered
    as above; for finite v the ranks of the first class are those of v with every other entry -inf (one fused
    comparison instead of a select and a comparison)."""
    n = v.shape[-1]
    i = jnp.arange(n)
    lower = (i[None, :] < i[:, None]).reshape((1,) * (v.ndim - 1) + (n, n))  # f < e
    a, b = v[..., :, None], v[..., None, :]  # entry e (rows) against entry f (columns)
    beats = (b > a) | ((b == a) & lower)
    if first is not None:
        fa, fb = first[..., :, None], first[..., None, :]
        beats = (fb & ~fa) | ((fb == fa) & beats)
    return beats.sum(-1)


def _top2_sum(v):
    """The sum of the two largest entries along the last axis, counted with multiplicity, as one variadic reduction:
    `lax.top_k(v, 2)[0].sum(-1)`, the same float32 sum of the same two values (up to the sign of a zero sum).
    (largest, second) pairs combine as (max(a1, b1), max(min(a1, b1), max(a2, b2))): associative and commutative."""
    neg = jnp.asarray(-jnp.inf, v.dtype)

    def top2(x, y):
        (a1, a2), (b1, b2) = x, y
        return jnp.maximum(a1, b1), jnp.maximum(jnp.minimum(a1, b1), jnp.maximum(a2, b2))

    m1, m2 = jax.lax.reduce((v, jnp.full_like(v, neg)), (neg, neg), top2, (v.ndim - 1,))
    return m1 + m2


def route_by_rank(logits_TE, bias_E, cfg: ModelConfig):
    """`moe.route` (same weights and indices, same order) by pairwise comparisons instead of sorts: a few fused
    kernels on GPU where lax.top_k costs a sort each. For decoding (T small); memory is T x E x E booleans.
    A topk_method outside TOPK_METHODS raises (`check_supported`)."""
    check_supported(cfg)
    E, K, G = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group
    scores_TE, choice_TE = router_scores(logits_TE, bias_E, cfg)
    keep_TE = None
    if cfg.topk_method in ("group_limited_greedy", "noaux_tc") and G > 1:
        grouped_TGe = choice_TE.reshape(*choice_TE.shape[:-1], G, E // G)
        if cfg.topk_method == "noaux_tc":
            group_TG = _top2_sum(grouped_TGe)
        else:
            group_TG = grouped_TGe.max(-1)
        keep_TG = _rank_desc(group_TG) < cfg.topk_group
        # the kept groups' experts rank first: their ranks are those with every other expert -inf, and the
        # config's check (kept groups hold at least K experts) keeps the others out of the top K
        keep_TE = jnp.repeat(keep_TG, E // G, axis=-1)
    lead = (1,) * (choice_TE.ndim - 1)
    rank_TE = _rank_desc(choice_TE, keep_TE)
    pick_TKE = rank_TE[..., None, :] == jnp.arange(K).reshape(*lead, K, 1)  # e is the k-th choice
    idx_TK = jnp.where(pick_TKE, jnp.arange(E, dtype=jnp.int32).reshape(*lead, 1, E), 0).sum(-1)
    w_TK = jnp.where(pick_TKE, scores_TE[..., None, :], 0.0).sum(-1)
    return gate_weights(w_TK, cfg), idx_TK


# ---------------------------------------------------------------------------------------------------- experts
# Routed (and appended shared) experts on a few tokens, gate and up side by side, contracted axis last:
# w_gu [E, 2I, D], w_down [E, D, I].


def _swiglu(gu_XJ):
    I = gu_XJ.shape[-1] // 2
    return jax.nn.silu(gu_XJ[..., :I]) * gu_XJ[..., I:]


def experts_gathered(x_TD, w_TK, idx_TK, w_gu_EJD, w_down_EDI):
    """Each token through its K experts by slicing those experts' weights: reads T*K experts, not E."""
    T, K = idx_TK.shape
    flat = idx_TK.reshape(-1)
    # A gather of the chosen experts' (contracted-axis-last) matrices: at batch 1 on the H100 it decodes 9% faster
    # than one dynamic slice per assignment stacked (1,231 vs 1,125 tokens/s, docs/LOG.md), which XLA fuses into
    # the reduction as a select over the X slices.
    take = lambda w: jnp.take(w, flat, axis=0)  # noqa: E731
    x_XD = jnp.repeat(x_TD, K, axis=0)
    h_XI = _swiglu(jnp.einsum("xd,xjd->xj", x_XD, take(w_gu_EJD)))
    y_XD = jnp.einsum("xi,xdi->xd", h_XI, take(w_down_EDI)).astype(jnp.float32)
    return (y_XD.reshape(T, K, -1) * w_TK[..., None]).sum(1).astype(x_TD.dtype)


def experts_all(x_TD, w_TK, idx_TK, w_gu_EJD, w_down_EDI):
    """Every expert on every token as batched matmuls over the expert axis, combined with the routing weights:
    when nearly every expert is chosen by some token, all weights are read anyway."""
    E = w_gu_EJD.shape[0]
    x_ETD = jnp.broadcast_to(x_TD[None], (E, *x_TD.shape))
    y_ETD = jnp.einsum("eti,edi->etd", _swiglu(jnp.einsum("etd,ejd->etj", x_ETD, w_gu_EJD)), w_down_EDI)
    comb_ET = jnp.einsum("tk,tke->et", w_TK, jax.nn.one_hot(idx_TK, E, dtype=jnp.float32))
    return jnp.einsum("etd,et->td", y_ETD.astype(jnp.float32), comb_ET).astype(x_TD.dtype)


def experts_all_flat(x_TD, comb_TX, w_gu_KD, w_down_DK):
    """Every expert on every token as two plain matmuls over all experts side by side, the routing weights
    folded into the SwiGLU output: w_gu [X * 2I, D] (per expert: gate rows, then up rows), w_down [D, X * I],
    comb [T, X] (zero for an unchosen expert). No [X, T, D] intermediate and no separate combine: at batch 64 on
    the bench preset the weighted sum over experts is the down matmul's own reduction."""
    T, X = comb_TX.shape
    gu_TXJ = jnp.einsum("td,kd->tk", x_TD, w_gu_KD).reshape(T, X, -1)
    h_TXI = (_swiglu(gu_TXJ).astype(jnp.float32) * comb_TX[..., None]).astype(x_TD.dtype)
    return jnp.einsum("tk,dk->td", h_TXI.reshape(T, -1), w_down_DK)


def experts_fn_for(cfg: ModelConfig, n_tokens: int):
    """Gathered when the n_tokens x (K + shared) assignments are no more than the experts, else all experts."""
    S = cfg.n_shared_experts
    return experts_gathered if n_tokens * (cfg.num_experts_per_tok + S) <= cfg.n_routed_experts + S else experts_all


# ---------------------------------------------------------------------------------------------- fused weights


def _swap_pairs(w, axis: int):
    """Rows (along axis) of adjacent rope pairs (x0, x1) turned into (-x1, x0): a projection with these rows gives
    the second operand of rope, rope(x) = x * cos + swap(x) * sin, so a kernel needs no pair shuffles."""
    w = jnp.moveaxis(w, axis, -1)
    p = w.reshape(*w.shape[:-1], -1, 2)
    return jnp.moveaxis(jnp.stack([-p[..., 1], p[..., 0]], -1).reshape(w.shape), -1, axis)


def _fuse_attention(attn, dt, attn_in: bool = False, fold_norm=None):
    """The attention weights of the module docstring; with attn_in (the `kernels.attn_in` / `attn_q` kernels),
    w_in and w_q also carry their rope rows with pairs swapped (`_swap_pairs`) after the others. fold_norm (the
    block's attention-norm weight [D], for the `kernels.latent_attention_pre` kernel, "attn_pre"): that weight
    multiplied into w_in's columns and q_norm's into w_q's (both RMS scales applied after the products, `_folded_qkv`),
    and w_o [N * C, D] = w_uv . wo for one output matmul per step (w_uv and wo stay for the prefill)."""
    cfg = attn.cfg
    H, R = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
    f32 = jnp.float32
    wkv_b = attn.wkv_b[...].astype(f32)  # [C, N, H + V]
    wq = attn.wq_b[...] if cfg.q_lora_rank is not None else attn.wq[...]  # [Q or D, N, H + R]
    q_c = jnp.einsum("qnh,cnh->ncq", wq[..., :H].astype(f32), wkv_b[..., :H])
    q_pe = jnp.einsum("qnr->nrq", wq[..., H:].astype(f32))
    w_uv = jnp.pad(jnp.einsum("cnv->nvc", wkv_b[..., H:]), ((0, 0), (0, 0), (0, R)))  # [N, V, C + R]
    q_parts = [q_c, q_pe] + ([_swap_pairs(q_pe, 1)] if attn_in else [])
    w_q = jnp.concatenate(q_parts, 1)
    w = {"w_uv": w_uv.astype(dt), "wo": jnp.einsum("nvd->dnv", attn.wo[...]).astype(dt),
         "kv_norm": attn.kv_norm.weight[...].astype(dt)}
    fold = fold_norm is not None
    if fold:
        C = cfg.kv_lora_rank
        w_q = w_q * attn.q_norm.weight[...].astype(f32)[None, None, :]
        w["w_o"] = jnp.einsum("nvc,nvd->ncd", w_uv[..., :C], attn.wo[...].astype(f32)).reshape(-1, cfg.hidden_size
                                                                                            ).astype(dt)
    w["w_q"] = w_q.astype(dt)
    if cfg.q_lora_rank is not None:
        w_in = [attn.wq_a[...], attn.wkv_a[...]]
        if not fold:
            w["q_norm"] = attn.q_norm.weight[...].astype(dt)
    else:
        w_in = [attn.wkv_a[...]]
    if attn_in:
        w_in.append(_swap_pairs(attn.wkv_a[...][:, cfg.kv_lora_rank:], 1))
    w_in = jnp.concatenate(w_in, -1).T
    w["w_in"] = (w_in.astype(f32) * fold_norm.astype(f32)[None, :] if fold else w_in).astype(dt)
    return w


def _fuse_mlp(mlp, dt) -> dict:
    """A SwiGLU MLP's fused weights: w_gu [2F, D] (gate rows, then up rows), w_down [D, F] (`_mlp`)."""
    return {"w_gu": jnp.concatenate([mlp.w_gate[...], mlp.w_up[...]], -1).T.astype(dt),
            "w_down": mlp.w_down[...].T.astype(dt)}


def _mlp(h_TD, w_gu_FD, w_down_DF):
    """The model's `MLP` on fused weights: two products (float32 accumulation, outputs in h's dtype) and SwiGLU."""
    return jnp.einsum("tf,df->td", _swiglu(jnp.einsum("td,fd->tf", h_TD, w_gu_FD)), w_down_DF)


def _fuse_ffn(ffn, dt, gathered: bool, shared_dense: bool = False):
    """shared_dense: the shared experts kept apart as the model's one MLP of width S*I ("shared_gu",
    "shared_down"; `_mlp`), not appended to the expert stacks (the grouped decode's layout, `fuse_block`)."""
    if not isinstance(ffn, MoE):
        return _fuse_mlp(ffn, dt)
    cfg = ffn.cfg
    w_gu = jnp.concatenate([ffn.w_gate[...], ffn.w_up[...]], -1)  # [E, D, 2I]
    w_down = ffn.w_down[...]  # [E, I, D]
    shared = {}
    if ffn.shared is not None and shared_dense:
        shared = {k.replace("w_", "shared_"): v for k, v in _fuse_mlp(ffn.shared, dt).items()}
    elif ffn.shared is not None:
        S, I = cfg.n_shared_experts, cfg.moe_intermediate_size
        split = lambda w: jnp.moveaxis(w.reshape(w.shape[0], S, I), 1, 0)  # noqa: E731  [D, S*I] -> [S, D, I]
        s_gu = jnp.concatenate([split(ffn.shared.w_gate[...]), split(ffn.shared.w_up[...])], -1)
        w_gu = jnp.concatenate([w_gu, s_gu], 0)
        w_down = jnp.concatenate([w_down, ffn.shared.w_down[...].reshape(S, I, -1)], 0)
    w_gu = jnp.swapaxes(w_gu, 1, 2).astype(dt)  # [X, 2I, D]
    if gathered:
        w_down = jnp.swapaxes(w_down, 1, 2)  # [X, D, I]
    else:  # experts_all_flat: [X * 2I, D] and [D, X * I]
        w_gu, w_down = w_gu.reshape(-1, w_gu.shape[-1]), jnp.moveaxis(w_down, 2, 0).reshape(w_down.shape[-1], -1)
    out = {"router": ffn.gate[...].T.astype(jnp.float32), "w_gu": w_gu, "w_down": w_down.astype(dt),
           "bias": None if ffn.bias is None else ffn.bias[...].astype(jnp.float32), **shared}
    if splits_router(dt):  # XLA's router product in bf16 parts (`moe.router_logits`), built here, not every step
        out["router_parts"] = router_parts(ffn.gate[...].astype(jnp.float32))
    return out


def fuse_block(blk, dt, n_tokens: int = 1, kernels: str | None = None, cache_len: int = 0,
               kernel_set=KN.KERNELS, tokens_per_row: int = 1, tuning: dict | None = None) -> dict:
    """One block's decode weights (see the module docstring) for steps of n_tokens tokens: a dict of arrays, with
    static entries "cfg" (the model config), "gathered" (which experts function; it sets the expert weights'
    layout), "grouped_decode" (the all-experts layout decoded as grouped matmuls: `kernels.TUNING["grouped"]`),
    "kernels" ({kernel: mode or None}: the Pallas kernels this block uses, `kernels.supported`;
    "grouped" is the prefill's), "folded" (norm weights folded into w_in / w_q, merged w_o: with "attn_pre") and
    "tuning" (the kernels' block sizes: `kernels.tuning()`'s table, or the one passed).
    Made once per generate call inside the jitted generate. The arrays pass an optimization barrier: without it
    XLA:GPU sinks the cheap concatenations and slices into the decode loop and redoes them at every step.
    Raises ConfigError naming the field for a config the fused step does not implement (`check_supported`)."""
    cfg = blk.attn.cfg
    check_supported(cfg)
    gathered = experts_fn_for(cfg, n_tokens) is experts_gathered
    table = KN.tuning() if tuning is None else tuning
    ok = KN.supported(cfg, cache_len, kernels, n_tokens, table) if kernels else {}
    use = {k: kernels if ok.get(k) and k in kernel_set else None for k in KN.KERNELS}
    if not gathered:
        use["experts"] = None
    if not (use["experts"] and table["down"]["split"]):
        use["moe_in"] = None  # it routes inside the gathered experts' gate/up kernel
    if tokens_per_row > 1:  # (MTP verification) the attn_in / moe_in / attn_pre kernels: one-token steps only
        use["attn_in"] = use["moe_in"] = use["attn_pre"] = None
    if use["attn_in"] or not use["attention"]:  # attn_q finishes the query for few tokens; attn_pre is in attention
        use["attn_pre"] = None
    folded = bool(use["attn_pre"])
    at = table["grouped"]["decode_min_tokens"]
    grouped_decode = (isinstance(blk.ffn, MoE) and not gathered and bool(use["grouped"])  # (the kernels)
                      and 0 < at <= n_tokens)
    shared_dense = grouped_decode and bool(table["grouped"]["shared_dense"])
    w = {"ffn_norm": blk.ffn_norm.weight[...].astype(dt), "ffn": _fuse_ffn(blk.ffn, dt, gathered, shared_dense),
         "attn": _fuse_attention(blk.attn, dt, bool(use["attn_in"]) or folded,
                                 blk.attn_norm.weight[...] if folded else None)}
    if not folded:
        w["attn_norm"] = blk.attn_norm.weight[...].astype(dt)
    return {"cfg": cfg, "gathered": gathered, "kernels": use, "folded": folded, "tuning": table,
            "grouped_decode": grouped_decode, **jax.lax.optimization_barrier(w)}


# ----------------------------------------------------------------------------------------------------- the step


def _with_shared(w_TK, idx_TK, cfg: ModelConfig):
    """The routed choices with the S shared experts appended as experts E .. E+S-1 of weight 1 (the fused layout)."""
    E, S = cfg.n_routed_experts, cfg.n_shared_experts
    if not S:
        return w_TK, idx_TK
    T = idx_TK.shape[0]
    idx = jnp.concatenate([idx_TK, jnp.broadcast_to(jnp.arange(E, E + S, dtype=idx_TK.dtype), (T, S))], -1)
    return jnp.concatenate([w_TK, jnp.ones((T, S), w_TK.dtype)], -1), idx


class Pending(NamedTuple):
    """A residual stream whose last MoE output is not summed yet: x = res + sum_a w[:, a] * parts[:, a] (float32).
    The next block's `kernels.attn_in` sums it on its way (one kernel fewer per layer); `settle` sums it in XLA."""
    res: jax.Array  # [B, T, D]
    parts: jax.Array  # [B * T, A, D] float32
    w: jax.Array  # [B * T, A] float32


def settle(x):
    if not isinstance(x, Pending):
        return x
    y = (x.parts * x.w[..., None]).sum(1).reshape(x.res.shape)
    return (x.res.astype(jnp.float32) + y).astype(x.res.dtype)


def _cos_sin(cos_BT, sin_BT):
    """[B, 2, R] cos and sin of one token per row, each pair's angle twice (the step kernels' rope operand)."""
    return jnp.stack([jnp.repeat(cos_BT[:, 0], 2, -1), jnp.repeat(sin_BT[:, 0], 2, -1)], 1)


def fused_block(w: dict, x_BTD, kv_BSc, pos_BT, cos, sin, mask_BTS, prefill: bool = False):
    """One block on T new tokens per row with fused weights (`fuse_block`); returns (x, cache rows with the new
    ones written, the routed experts each token used [B, T, K] int32, None for a dense block). Uses the Pallas kernels `w["kernels"]` names. x may be `Pending` (from the previous block's
    "moe_in" kernels) and so may the result: `settle` gives the array.

    prefill: the tokens are positions [0, T) of each row (the prompts; kv_BSc and pos_BT unused): the cache rows
    returned are the new rows alone [B, T, C + R], and the routed experts run as grouped matmuls
    (`grouped.experts_grouped`, w["kernels"]["grouped"] set)."""
    res = x_BTD.res if isinstance(x_BTD, Pending) else x_BTD
    B, T, D = res.shape
    cfg, a = w["cfg"], w["attn"]
    C, eps = cfg.kv_lora_rank, cfg.rms_norm_eps
    use = {} if prefill else w["kernels"]
    if use.get("attn_in") and T == 1:  # norms, projections and rope in two kernels (the Pending sum in the first)
        pend = x_BTD if isinstance(x_BTD, Pending) else Pending(res, None, None)
        x_BD, z = KN.attn_in(res.reshape(B, D), w["attn_norm"], a["w_in"], eps, use["attn_in"], pend.parts, pend.w,
                          w["tuning"])
        x_BTD = x_BD.reshape(B, T, D)
        cs = _cos_sin(cos, sin)
        q, row = KN.attn_q(z, a["q_norm"], a["kv_norm"], a["w_q"], cs, cfg, use["attn_in"], w["tuning"])
        q, row = q[:, None], row[:, None]
    elif use.get("attn_pre") and T == 1:  # XLA's two products, then the attention kernel finishes q and the row
        x_BTD = settle(x_BTD)
        zu = jnp.einsum("bd,kd->bk", x_BTD[:, 0], a["w_in"])  # the norms' weights folded in (w["folded"])
        qu = jnp.einsum("bq,nkq->bnk", zu[:, :cfg.q_lora_rank], a["w_q"])
        cs = _cos_sin(cos, sin)
        o_BNc, kv_BSc = KN.latent_attention_pre(x_BTD[:, 0], zu, qu, cs, a["kv_norm"], kv_BSc, pos_BT[:, 0], cfg,
                                                use["attn_pre"], w["tuning"])
        return _ffn_step(w, x_BTD + jnp.einsum("bk,kd->bd", o_BNc.reshape(B, -1), a["w_o"])[:, None], kv_BSc, use,
                         prefill)
    else:
        x_BTD = settle(x_BTD)
        Q, R = cfg.q_lora_rank or 0, cfg.qk_rope_head_dim
        if w["folded"]:
            q, kv = _folded_qkv(x_BTD, a, eps, Q, C + R)
        else:
            h = rms_norm(x_BTD, w["attn_norm"], eps)
            z = jnp.einsum("btd,kd->btk", h, a["w_in"])
            kv = z[..., Q:Q + C + R]  # (without the swapped rope rows that the attn_in kernels' weights carry)
            q_in = rms_norm(z[..., :Q], a["q_norm"], eps) if Q else h
            # The barrier keeps XLA:GPU from fusing this matrix-vector product into the rope / concatenation
            # below, which recomputed it per output element (150 us per layer at batch 1, measured).
            q = jax.lax.optimization_barrier(jnp.einsum("btq,nkq->btnk", q_in, a["w_q"]))
        q = jnp.concatenate([q[..., :C], apply_rope(q[..., C:C + R], cos, sin)], -1)
        row = jnp.concatenate([rms_norm(kv[..., :C], a["kv_norm"], eps), apply_rope(kv[..., C:], cos, sin)], -1)
    if use.get("attention") and T == 1:  # one kernel: scores, softmax, o . c, and the row written in place
        o_BNc, kv_BSc = KN.latent_attention(q[:, 0], row[:, 0], kv_BSc, pos_BT[:, 0], cfg, use["attention"],
                                            w["tuning"])
        o = jnp.einsum("bnv,dnv->bd", jnp.einsum("bnc,nvc->bnv", o_BNc, a["w_uv"]), a["wo"])[:, None]
    else:
        kv_BSc = row.astype(q.dtype) if prefill else write_rows(kv_BSc, pos_BT, row)
        o = absorbed_attention(q, kv_BSc, mask_BTS, a["w_uv"], a["wo"], cfg.softmax_scale)
    return _ffn_step(w, x_BTD + o, kv_BSc, use, prefill)


def _rms_inv(v, eps: float):
    v = v.astype(jnp.float32)
    return jax.lax.rsqrt(jnp.mean(v * v, -1, keepdims=True) + eps)


def _folded_qkv(x_BTD, a: dict, eps: float, Q: int, CR: int):
    """(absorbed query [B, T, N, C + R (+ R)], kv latent [B, T, C + R] before its norm and rope) from weights with
    the norms' weights folded in (`_fuse_attention(fold_norm=...)`): RMSNorm(x) W = s W'x with s = rsqrt(mean(x^2)
    + eps), so the products take x and the q latent unscaled, and the scales follow, in float32:
    z = s zu, q = rsqrt(mean(z_q^2) + eps) W_q' z_q = s rsqrt(s^2 mean(zu_q^2) + eps) (W_q' zu_q).
    `kernels.latent_attention_pre` computes the same in its prologue (same roundings: each product rounded to the
    model dtype, then each scaled value)."""
    dt = x_BTD.dtype
    zu = jnp.einsum("btd,kd->btk", x_BTD, a["w_in"])
    s = _rms_inv(x_BTD, eps)  # [B, T, 1]
    zq = zu[..., :Q].astype(jnp.float32)
    scale = s * jax.lax.rsqrt(s * s * jnp.mean(zq * zq, -1, keepdims=True) + eps)
    qu = jax.lax.optimization_barrier(jnp.einsum("btq,nkq->btnk", zu[..., :Q], a["w_q"]))  # (as fused_block's)
    q = (qu.astype(jnp.float32) * scale[..., None]).astype(dt)
    return q, (zu[..., Q:Q + CR].astype(jnp.float32) * s).astype(dt)


def _ffn_step(w: dict, x_BTD, kv_BSc, use: dict, prefill: bool):
    """fused_block's feed-forward half (after attention's residual add): (x, cache rows, routes [B, T, K] or None)."""
    B, T, D = x_BTD.shape
    cfg, eps = w["cfg"], w["cfg"].rms_norm_eps
    f = w["ffn"]
    routes = lambda idx_TX: idx_TX[:, :cfg.num_experts_per_tok].reshape(B, T, -1).astype(jnp.int32)  # noqa: E731
    if use.get("moe_in") and T == 1 and "router" in f:  # norm + router logits; routing inside gate/up
        h, logits_TE = KN.moe_in(x_BTD.reshape(B, D), w["ffn_norm"], f["router"], eps, use["moe_in"], w["tuning"])
        parts, idx_TX, w_TX = KN.experts_routed(h, logits_TE, f["bias"], f["w_gu"], f["w_down"], cfg, use["moe_in"],
                                                w["tuning"])
        return Pending(x_BTD, parts, w_TX), kv_BSc, routes(idx_TX)
    h = rms_norm(x_BTD, w["ffn_norm"], eps).reshape(B * T, D)
    if "router" not in f:
        return x_BTD + _mlp(h, f["w_gu"], f["w_down"]).reshape(B, T, D), kv_BSc, None
    E = cfg.n_routed_experts
    # the experts in the stacks (the shared ones appended, or kept apart as one MLP: "shared_gu", `fuse_block`)
    apart = "shared_gu" in f
    X = E if apart else E + cfg.n_shared_experts
    add_shared = (lambda y: y + _mlp(h, f["shared_gu"], f["shared_down"])) if apart else (lambda y: y)  # noqa: E731
    with_shared = (lambda w, i: (w, i)) if apart else (lambda w, i: _with_shared(w, i, cfg))  # noqa: E731
    if use.get("route") and w["tuning"]["route"]["logits"]:  # the K routed experts, then the S shared ones (weight
        # 1), dense weights [T, E]; the kernel computes the norm and the router logits itself from x: it runs
        # beside gate/up (see `kernels.route`)
        idx_TX, w_TX, dense_TE = KN.route(None, f["bias"], cfg, use["route"], x_BTD.reshape(B * T, D),
                                          w["ffn_norm"], f["router"], w["tuning"], shared=not apart)
    else:
        logits_TE = (router_logits_from_parts(h, f["router_parts"]) if "router_parts" in f
                     else router_logits(h, f["router"].T))
        if prefill:  # top-k routing (sorts are cheap next to T tokens' experts), then grouped matmuls
            w_TX, idx_TX = with_shared(*moe_route(logits_TE, f["bias"], cfg)[:2])
            w_gu = f["w_gu"].reshape(X, -1, D)  # the flat layout [X * 2I, D] is the same array
            y = KG.experts_grouped(h, w_TX, idx_TX, w_gu, f["w_down"], w["kernels"]["grouped"],
                                   flat=not w["gathered"], distinct=True, **KG.options(w["tuning"]["grouped"]))
            return x_BTD + add_shared(y).reshape(B, T, D), kv_BSc, routes(idx_TX)
        if use.get("route"):
            idx_TX, w_TX, dense_TE = KN.route(logits_TE, f["bias"], cfg, use["route"], table=w["tuning"],
                                              shared=not apart)
        else:
            (w_TX, idx_TX), dense_TE = with_shared(*route_by_rank(logits_TE, f["bias"], cfg)), None
    if use.get("experts"):  # gate/up + SwiGLU, then the down projection (kernels), weighted sum + residual
        x_TD = KN.experts_gathered(h, x_BTD.reshape(B * T, D), idx_TX, w_TX, f["w_gu"], f["w_down"], use["experts"],
                                   w["tuning"])
        return x_TD.reshape(B, T, D), kv_BSc, routes(idx_TX)
    if w["gathered"]:
        y = experts_gathered(h, w_TX, idx_TX, f["w_gu"], f["w_down"])
    elif w.get("grouped_decode"):  # many tokens a step: sorted rows and grouped matmuls, as the prefill
        bm = w["tuning"]["grouped"]["decode_bm"] or KG.decode_block_rows(idx_TX.size, X)
        y = add_shared(KG.experts_grouped(h, w_TX, idx_TX, f["w_gu"].reshape(X, -1, D), f["w_down"],
                                          w["kernels"]["grouped"], flat=True, bm=bm, distinct=True,
                                          **KG.options(w["tuning"]["grouped"])))
    else:  # (the shared experts appended: shared_dense is only taken with grouped_decode)
        if dense_TE is None:
            comb_TX = jnp.einsum("tk,tke->te", w_TX, jax.nn.one_hot(idx_TX, X, dtype=jnp.float32))
        else:
            comb_TX = jnp.concatenate([dense_TE, jnp.ones((B * T, X - E), jnp.float32)], -1)
        y = experts_all_flat(h, comb_TX, f["w_gu"], f["w_down"])
    return x_BTD + y.reshape(B, T, D), kv_BSc, routes(idx_TX)


__all__ = ["Pending", "settle", "TOPK_METHODS", "check_supported",
           "route_by_rank", "experts_gathered", "experts_all", "experts_all_flat", "experts_fn_for", "fuse_block",
           "fused_block", "absorbed_attention", "write_rows"]

"""DeepSeekMoE: shared experts + fine-grained routed experts, the three DeepSeek routers, load statistics.

Shape key: B batch, T length, D hidden, E routed experts, K experts per token, G expert groups,
I moe_intermediate_size, X = T*K (token, expert) assignments.

Routers (docs/deepseek.md, Routing), all in float32:
  greedy               (V2-Lite) softmax, plain top-K.
  group_limited_greedy (V2)      softmax, group score = max in group, keep topk_group groups, top-K.
  noaux_tc             (V3)      sigmoid; selection on s + b (b = correction bias, never trained by the
                                 optimizer); group score = sum of the group's top-2; masked experts are -inf
                                 (with 0, a negative bias could pick a masked expert); gate weights use s
                                 without b.
Weights are renormalized over the chosen K when norm_topk_prob, then scaled by routed_scaling_factor.

Departures: none from DeepSeek's math. The routed experts run dropless (every token reaches all K of its
experts), `routed_experts`: with kernels, a sort + grouped matmuls (`ops.grouped_matmul`, tokamax, with the
grouped backward); on XLA, the sorted rows padded into blocks of one expert each and one batched matmul (XLA's
own ragged_dot multiplies every row by every expert on CPU and GPU). Either way the FLOPs are those of the chosen
experts only. V2's capacity-factor token dropping belongs to the expert-parallel path.
"""

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from deepjax.model import gmm_grad, ops
from deepjax.model.config import ModelConfig
from deepjax.model.layers import MLP, Param, RouterBias, dtype_of, normal_init


def router_logits(x_TD: jnp.ndarray, gate_DE: jnp.ndarray, split: bool | None = None) -> jnp.ndarray:
    """The router's float32 logits x . gate at full float32 precision. XLA:GPU's default float32 matmul rounds
    its inputs to TF32 (10-bit mantissa) on A100/H100, which flips near-tied routing choices against DeepSeek's
    and HF's float32 router (torch does not use TF32 for matmuls by default).

    Two implementations of the same product: precision HIGHEST (float32 FMAs, no tensor cores), or `split`: bf16
    activations times the float32 gate as three bf16 parts (`router_logits_split`, tensor cores, the same values up
    to float32 summation order). split None: `splits_router` (the split form on a GPU for bf16 activations: at the
    bench preset's GRPO update the HIGHEST products took ~37 ms an iteration on an H100, docs/LOG.md)."""
    if split is None:
        split = splits_router(x_TD.dtype)
    if split:
        return router_logits_split(x_TD.astype(jnp.bfloat16), gate_DE.astype(jnp.float32))
    return jnp.einsum("...d,de->...e", x_TD.astype(jnp.float32), gate_DE.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)


def splits_router(dtype) -> bool:
    """Whether `router_logits` takes the split form for activations of `dtype`: bf16 on a GPU."""
    return jnp.dtype(dtype) == jnp.bfloat16 and ops.platform() in ("gpu", "cuda")


def router_parts(gate_DE: jnp.ndarray) -> jnp.ndarray:
    """The float32 gate [D, E] as its three bf16 parts side by side, [D, 3E] (`bf16_parts`): what
    `router_logits_from_parts` multiplies. The fused decoder builds it once per `generate` call, outside its loop."""
    return jnp.concatenate(bf16_parts(gate_DE, 3), axis=-1)


def router_logits_from_parts(x_TD: jnp.ndarray, parts_DN: jnp.ndarray) -> jnp.ndarray:
    """`router_logits_split`'s forward from `router_parts`: x [..., D] bf16 -> [..., E] float32 (no gradient rule:
    the decoder's)."""
    n = parts_DN.shape[-1] // 3
    y = jnp.einsum("...k,kn->...n", x_TD.astype(jnp.bfloat16), parts_DN, preferred_element_type=jnp.float32)
    return sum(y[..., i * n:(i + 1) * n] for i in reversed(range(3)))  # the small parts first


def bf16_parts(a: jnp.ndarray, n: int) -> list:
    """n bf16 arrays whose float32 sum is `a` (float32) to 8n significant bits: three parts hold every float32
    value exactly, short of the few whose low parts underflow bf16's exponent range. Each part is the rest's top 8
    significant bits cut by a bit mask (exact in bf16), not a round trip through bf16: XLA:GPU folds
    convert(convert(f32 -> bf16) -> f32) into its input (`SimplifyFPConversions`, on by default), which would leave
    every part past the first zero."""
    parts, rest = [], a.astype(jnp.float32)
    for _ in range(n):
        bits = jax.lax.bitcast_convert_type(rest, jnp.uint32) & jnp.uint32(0xFFFF0000)
        hi = jax.lax.bitcast_convert_type(bits, jnp.float32)
        parts.append(hi.astype(jnp.bfloat16))
        rest = rest - hi
    return parts


@jax.custom_vjp
def router_logits_split(x_TD, gate_DE):
    """x [..., D] bf16 . gate [D, E] float32 -> [..., E] float32 on bf16 tensor cores: the gate as three bf16 parts
    (`bf16_parts`: exact), each product of two bf16 values exact in float32, sums in float32. The gradients: the
    gate's x^T . ct with ct in three parts (float32 products and sums as above); x's ct . gate^T from two parts of
    each (within 3 * 2^-16 of sum |ct| |gate|, then rounded to bf16 as x is)."""
    return router_logits_from_parts(x_TD, router_parts(gate_DE))


def _router_split_fwd(x_TD, gate_DE):
    parts_DN = router_parts(gate_DE)
    return router_logits_from_parts(x_TD, parts_DN), (x_TD, parts_DN, jnp.zeros((), gate_DE.dtype))


def _router_split_bwd(res, ct_TE):
    x_TD, parts_DN, gate_like = res
    E = parts_DN.shape[1] // 3
    ct_TE = ct_TE.astype(jnp.float32)
    c1, c2, c3 = bf16_parts(ct_TE, 3)
    g1, g2 = parts_DN[:, :E], parts_DN[:, E:2 * E]  # the forward's parts (the gate's first two)
    # d x = ct . gate^T as c1 g1 + c1 g2 + c2 g1 in one product over [3E]: the terms left out (c1 g3, c2 g2, c3 g)
    # are each below 2^-16 of sum |ct| |gate| (truncated parts), far below x's bf16 rounding (2^-9)
    dx = jnp.einsum("...e,de->...d", jnp.concatenate([c1, c1, c2], axis=-1), jnp.concatenate([g1, g2, g1], axis=-1),
                    preferred_element_type=jnp.float32).astype(x_TD.dtype)
    # d gate = x^T . ct over every leading axis, ct in three parts side by side
    dg = jnp.einsum("...d,...n->dn", x_TD, jnp.concatenate([c1, c2, c3], axis=-1), preferred_element_type=jnp.float32)
    dg = sum(dg[:, i * E:(i + 1) * E] for i in reversed(range(3)))
    return dx, dg.astype(gate_like.dtype)


router_logits_split.defvjp(_router_split_fwd, _router_split_bwd)


def router_scores(logits_TE: jnp.ndarray, bias_E: jnp.ndarray | None, cfg: ModelConfig):
    """(scores_TE, choice_TE) in float32: the gate scores, and the scores plus the correction bias that selection
    uses (the same array without a bias)."""
    logits_TE = logits_TE.astype(jnp.float32)
    if cfg.scoring_func == "sigmoid":
        scores_TE = jax.nn.sigmoid(logits_TE)
    else:
        scores_TE = jax.nn.softmax(logits_TE, axis=-1)
    if bias_E is None:
        return scores_TE, scores_TE
    return scores_TE, scores_TE + bias_E.astype(jnp.float32).reshape((1,) * (scores_TE.ndim - 1) + (-1,))


def gate_weights(w_TK: jnp.ndarray, cfg: ModelConfig):
    """The chosen experts' scores renormalized over the K (norm_topk_prob) and scaled by routed_scaling_factor."""
    if cfg.norm_topk_prob:
        w_TK = w_TK / (w_TK.sum(-1, keepdims=True) + 1e-20)
    return w_TK * cfg.routed_scaling_factor


def route(logits_TE: jnp.ndarray, bias_E: jnp.ndarray | None, cfg: ModelConfig):
    """Returns (weights_TK float32, indices_TK int32, scores_TE float32 before any bias)."""
    E, K, G = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group
    scores_TE, choice_TE = router_scores(logits_TE, bias_E, cfg)
    if cfg.topk_method in ("group_limited_greedy", "noaux_tc") and G > 1:
        grouped_TGe = choice_TE.reshape(*choice_TE.shape[:-1], G, E // G)
        if cfg.topk_method == "noaux_tc":
            group_score_TG = jax.lax.top_k(grouped_TGe, 2)[0].sum(-1)
        else:
            group_score_TG = grouped_TGe.max(-1)
        _, keep_idx = jax.lax.top_k(group_score_TG, cfg.topk_group)
        keep_TG = jax.nn.one_hot(keep_idx, G, dtype=jnp.bool_).any(-2)
        keep_TE = jnp.repeat(keep_TG, E // G, axis=-1)
        choice_TE = jnp.where(keep_TE, choice_TE, -jnp.inf)
    _, idx_TK = jax.lax.top_k(choice_TE, K)
    w_TK = jnp.take_along_axis(scores_TE, idx_TK, axis=-1)
    return gate_weights(w_TK, cfg), idx_TK.astype(jnp.int32), scores_TE


def replay_route(logits_TE, bias_E, routes_TK, cfg: ModelConfig):
    """`route` with the expert choice given (routing replay, DeepSeek-V3.2's "Keep Routing"): where routes_TK >= 0
    the K experts are those, else the router's own choice; the gate weights are always the current scores at the
    experts used (so the router's gradient flows as in `route`). Returns (weights_TK, indices_TK, scores_TE,
    own_TK): own_TK is the router's own choice, for the share of routes that differ."""
    w_own, own_TK, scores_TE = route(logits_TE, bias_E, cfg)
    given = routes_TK[..., :1] >= 0
    idx_TK = jnp.where(given, routes_TK, own_TK).astype(jnp.int32)
    w_TK = jnp.where(given, gate_weights(jnp.take_along_axis(scores_TE, idx_TK, axis=-1), cfg), w_own)
    return w_TK, idx_TK, scores_TE, own_TK


def routes_differ(a_TK, b_TK):
    """Whether two expert choices of each token differ as sets (bool [T])."""
    return jnp.any(jnp.sort(a_TK, axis=-1) != jnp.sort(b_TK, axis=-1), axis=-1)


def expert_load(idx_BTK: jnp.ndarray, valid_BT: jnp.ndarray, n_experts: int) -> jnp.ndarray:
    """Tokens routed to each expert, over valid tokens: [E] float32."""
    onehot_BTKE = jax.nn.one_hot(idx_BTK, n_experts, dtype=jnp.float32)
    return jnp.einsum("btke,bt->e", onehot_BTKE, valid_BT.astype(jnp.float32))


def sequence_balance_loss(scores_BTE, idx_BTK, valid_BT, cfg: ModelConfig) -> jnp.ndarray:
    """Complementary sequence-wise balance loss (V3 paper eq. 17-20) without alpha, averaged over rows:
    sum_i f_i P_i, f_i = E/(K T) sum_t 1[i in topK(t)], P_i = (1/T) sum_t s'_{i,t}, s' = s / sum_j s_j."""
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    v_BT = valid_BT.astype(jnp.float32)
    T_B = jnp.maximum(v_BT.sum(-1), 1.0)
    count_BE = jnp.einsum("btke,bt->be", jax.nn.one_hot(idx_BTK, E, dtype=jnp.float32), v_BT)
    f_BE = count_BE * E / (K * T_B[:, None])
    s_norm_BTE = scores_BTE / scores_BTE.sum(-1, keepdims=True)
    P_BE = jnp.einsum("bte,bt->be", s_norm_BTE, v_BT) / T_B[:, None]
    has_tokens_B = (v_BT.sum(-1) > 0).astype(jnp.float32)
    per_row_B = (f_BE * P_BE).sum(-1)
    return (per_row_B * has_tokens_B).sum() / jnp.maximum(has_tokens_B.sum(), 1.0)


def inverse_permutation(order_X):
    return jnp.zeros_like(order_X).at[order_X].set(jnp.arange(order_X.shape[0], dtype=order_X.dtype),
                                                   unique_indices=True)


@jax.custom_vjp
def permute_rows(x_XD, perm_X, inv_X):
    """x_XD[perm_X] for a permutation perm_X whose inverse is inv_X. Its gradient is the gather by the inverse,
    g[inv_X], where autodiff of the gather would scatter g into zeros (even with unique indices a scatter kernel:
    two a MoE layer in the H100 profile of the training step, docs/LOG.md session 18). Exact: both move each row
    once. A custom VJP: reverse mode, vmap (per-example gradients too, where the grouped matmul has a vmap rule) and
    remat work; forward mode (jax.jvp) through the routed experts does not (nor through tokamax's kernels, custom VJPs
    too). jax.custom_derivatives.linear_call would allow it, but then not vmap of a gradient."""
    return x_XD.at[perm_X].get(unique_indices=True)


def _permute_rows_fwd(x_XD, perm_X, inv_X):
    return permute_rows(x_XD, perm_X, inv_X), inv_X


def _permute_rows_bwd(inv_X, g_XD):
    return g_XD.at[inv_X].get(unique_indices=True), None, None


permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


def unsort_sum(y_XD, order_X, inv_X, w_TK):
    """Rows in expert-sorted order -> each token's sum over its K experts weighted by w_TK, in float32: a gather by
    the inverse permutation and a reduction, not a scatter-add into [T, D] (scatters of activations are slow and
    memory-hungry on TPU). Its gradient gathers too (`permute_rows`), and it moves the rows in their own dtype: the
    weights apply after it, in float32. inv_X: inverse_permutation(order_X)."""
    T, K = w_TK.shape
    return weighted_sum(permute_rows(y_XD, inv_X, order_X).reshape(T, K, y_XD.shape[-1]), w_TK)


def weighted_sum(y_TKD, w_TK):
    """Each token's K expert rows weighted and summed, in float32."""
    return jnp.sum(y_TKD.astype(jnp.float32) * w_TK.astype(jnp.float32)[..., None], axis=1)


def sorted_tokens(x_TD, order_X, inv_X, K: int):
    """x_TD[order_X // K]: each (token, expert) assignment's token row, in expert-sorted order, taken as a
    permutation of x repeated K times. Autodiff of x[order // K] scatter-adds into [T, D] with colliding
    indices (the scatters were 10% of the bench preset's training step on an H100, docs/LOG.md session 15);
    here the gradient is a gather by the inverse permutation inv_X (`permute_rows`) and a sum over each token's K
    rows."""
    return permute_rows(jnp.repeat(x_TD, K, axis=0), order_X, inv_X)


def routed_experts_dropless(x_TD, w_TK, idx_TK, w_gate_EDI, w_up_EDI, w_down_EID, ragged_dot=jax.lax.ragged_dot,
                            pairs: bool = False, rows_product=None, unsorted_product=None):
    """Every token to each of its K experts: sort the T*K assignments by expert, grouped matmuls, unsort. pairs:
    ragged_dot takes a pair of weights for joined products (`grouped_swiglu`). rows_product(x, rows, inv, sizes):
    the joined gate / up product of the sorted rows read from x itself (`gmm_grad.grouped_matmul_rows`: rows = each
    sorted assignment's token), instead of a sorted copy of x. unsorted_product(h, w_down, sizes, order): the down
    product with its rows stored in the assignments' order (`gmm_grad.grouped_matmul_unsorted`), instead of an
    unsort."""
    T, K = idx_TK.shape
    E = w_gate_EDI.shape[0]
    flat_X = idx_TK.reshape(-1)
    # the names are what `model.remat=save_experts` keeps for the backward (transformer.remat_policy)
    order_X = checkpoint_name(jnp.argsort(flat_X, stable=True), "moe_order")
    group_sizes_E = checkpoint_name(jnp.bincount(flat_X, length=E).astype(jnp.int32), "moe_order")
    inv_X = checkpoint_name(inverse_permutation(order_X), "moe_order")
    gmm = lambda x, w: ragged_dot(x, w, group_sizes_E)  # noqa: E731
    down = None if unsorted_product is None else (
        lambda h, w: unsorted_product(h, w, group_sizes_E, order_X.astype(jnp.int32)))
    if rows_product is not None:
        rows_X = (order_X // K).astype(jnp.int32)
        gu_XI2 = checkpoint_name(rows_product(x_TD, rows_X, inv_X, group_sizes_E), "moe_rows")
        y_XD = grouped_swiglu(None, w_gate_EDI, w_up_EDI, w_down_EID, gmm, gu_XI2=gu_XI2, down=down)
    else:
        xs_XD = checkpoint_name(sorted_tokens(x_TD, order_X, inv_X, K), "moe_rows")
        y_XD = grouped_swiglu(xs_XD, w_gate_EDI, w_up_EDI, w_down_EID, gmm, pairs=pairs, down=down)
    y_XD = checkpoint_name(y_XD, "moe_rows")
    if down is not None:  # rows already in the assignments' order
        return weighted_sum(y_XD.reshape(T, K, -1), w_TK).astype(x_TD.dtype)
    return unsort_sum(y_XD, order_X, inv_X, w_TK).astype(x_TD.dtype)


def grouped_swiglu(xs_XD, w_gate_EDI, w_up_EDI, w_down_EID, gmm, pairs: bool = False, gu_XI2=None, down=None):
    """silu(x W_gate) * (x W_up) W_down over rows sorted by expert, with `gmm(x, w)` a grouped matmul. With
    ops.LARGE_GROUP_ROWS rows per expert or more on average (training, prefill), gate and up are one grouped
    matmul against [E, D, 2I]: the rows are read once, one kernel of twice the width, and in the backward one
    input gradient instead of two summed. pairs: gmm takes the pair (W_gate, W_up) for that product
    (`ops.grouped_matmul`, which may compute it without concatenating the weights); else they are concatenated
    here. With fewer rows (decode steps) the weights' reads dominate and joining them would copy them every step:
    two grouped matmuls. gu_XI2: the joined gate / up product already made (xs_XD unused). down(h, w_down): the
    down product (default gmm)."""
    E, _, I = w_gate_EDI.shape
    if gu_XI2 is not None:
        g_XI, u_XI = gu_XI2[:, :I], gu_XI2[:, I:]
    elif xs_XD.shape[0] < ops.LARGE_GROUP_ROWS * E:
        g_XI, u_XI = (checkpoint_name(gmm(xs_XD, w), "moe_rows") for w in (w_gate_EDI, w_up_EDI))
    else:
        w_gu = (w_gate_EDI, w_up_EDI) if pairs else jnp.concatenate([w_gate_EDI, w_up_EDI], axis=-1)
        gu_XI2 = checkpoint_name(gmm(xs_XD, w_gu), "moe_rows")
        g_XI, u_XI = gu_XI2[:, :I], gu_XI2[:, I:]
    return (down or gmm)(checkpoint_name(jax.nn.silu(g_XI) * u_XI, "moe_rows"), w_down_EID)


def block_rows(X: int, E: int) -> int:
    """Rows per block of `routed_experts_blocked`: the power of two nearest below the mean rows per expert, in
    [8, 128] (padding costs at most E x (block - 1) rows)."""
    return int(min(128, max(8, 2 ** max(0, (max(X // E, 1)).bit_length() - 1))))


def routed_experts(x_TD, w_TK, idx_TK, w_gate_EDI, w_up_EDI, w_down_EID, kernels: str = "auto"):
    """The routed experts on one device, by `ModelConfig.kernels` (`ops.resolve`): tokamax grouped matmuls, or
    the XLA blocked form. Both compute only the chosen experts."""
    if ops.resolve(kernels, x_TD.dtype) == "tokamax":
        # every (token, expert) assignment is a row of some group: no rows past the groups to zero
        gmm = lambda x, w, g: ops.grouped_matmul(x, w, g, "tokamax", all_rows=True)  # noqa: E731
        rows = unsorted = None
        if ops.gathers_rows(x_TD, idx_TK.size, w_gate_EDI, w_up_EDI, "tokamax"):  # (the GPU's Triton pair)
            rows = lambda x, r, i, g: gmm_grad.grouped_matmul_rows(x, r, i, w_gate_EDI, w_up_EDI, g)  # noqa: E731
        if ops.scatters_rows(x_TD, idx_TK.size, w_down_EID, "tokamax"):
            unsorted = gmm_grad.grouped_matmul_unsorted
        return routed_experts_dropless(x_TD, w_TK, idx_TK, w_gate_EDI, w_up_EDI, w_down_EID, ragged_dot=gmm,
                                       pairs=True, rows_product=rows, unsorted_product=unsorted)
    block = block_rows(idx_TK.size, w_gate_EDI.shape[0])
    return routed_experts_blocked(x_TD, w_TK, idx_TK, w_gate_EDI, w_up_EDI, w_down_EID, block=block)


def routed_experts_blocked(x_TD, w_TK, idx_TK, w_gate_EDI, w_up_EDI, w_down_EID, block: int = 128):
    """Dropless grouped matmul without `ragged_dot`: the T*K assignments sorted by expert, each expert's rows padded
    to a multiple of `block`, then one batched matmul over blocks with each block's expert weights gathered.
    Rows: at most X + E*(block-1), a static bound. For backends whose ragged_dot is slow (XLA:GPU runs it about as
    slowly as a dense matmul over all groups, docs/LOG.md); same result as `routed_experts_dropless`."""
    T, K = idx_TK.shape
    E, D, _ = w_gate_EDI.shape
    X = T * K
    flat_X = idx_TK.reshape(-1)
    order_X = jnp.argsort(flat_X, stable=True)
    e_X = flat_X[order_X]
    counts_E = jnp.bincount(flat_X, length=E)
    padded_E = (counts_E + block - 1) // block * block
    start_E = jnp.cumsum(padded_E) - padded_E  # first padded row of each expert
    first_E = jnp.cumsum(counts_E) - counts_E  # first sorted assignment of each expert
    dest_X = start_E[e_X] + jnp.arange(X) - first_E[e_X]  # padded row of each sorted assignment
    n_blocks = -(-(X + E * (block - 1)) // block)
    R = n_blocks * block
    inv_X = checkpoint_name(inverse_permutation(order_X), "moe_order")
    xs_RD = jnp.zeros((R, D), x_TD.dtype).at[dest_X].set(sorted_tokens(x_TD, order_X, inv_X, K), unique_indices=True,
                                                        indices_are_sorted=True)
    block_e = jnp.searchsorted(jnp.cumsum(padded_E), jnp.arange(n_blocks) * block, side="right")
    block_e = jnp.minimum(block_e, E - 1)  # blocks past the last expert's rows hold zeros
    # the names: what `model.remat=save_experts` keeps, as in routed_experts_dropless
    order_X, dest_X, block_e = (checkpoint_name(a, "moe_order") for a in (order_X, dest_X, block_e))
    xb = checkpoint_name(xs_RD.reshape(n_blocks, block, D), "moe_rows")
    g, u = (checkpoint_name(jnp.einsum("nbd,ndi->nbi", xb, w[block_e]), "moe_rows") for w in (w_gate_EDI, w_up_EDI))
    h = checkpoint_name(jax.nn.silu(g) * u, "moe_rows")
    y_RD = checkpoint_name(jnp.einsum("nbi,nid->nbd", h, w_down_EID[block_e]).reshape(R, D), "moe_rows")
    y_XD = y_RD.at[dest_X].get(unique_indices=True, indices_are_sorted=True)
    return unsort_sum(y_XD, order_X, inv_X, w_TK).astype(x_TD.dtype)


def routed_experts_dense(x_TD, w_TK, idx_TK, w_gate_EDI, w_up_EDI, w_down_EID):
    """Reference: every expert on every token, combined with the routing weights (tests only)."""
    E = w_gate_EDI.shape[0]
    h_TEI = jax.nn.silu(jnp.einsum("td,edi->tei", x_TD, w_gate_EDI)) * jnp.einsum(
        "td,edi->tei", x_TD, w_up_EDI)
    y_TED = jnp.einsum("tei,eid->ted", h_TEI, w_down_EID).astype(jnp.float32)
    comb_TE = jnp.einsum("tk,tke->te", w_TK, jax.nn.one_hot(idx_TK, E, dtype=jnp.float32))
    return jnp.einsum("ted,te->td", y_TED, comb_TE).astype(x_TD.dtype)


class MoEAux(NamedTuple):
    """What a MoE layer reports beside its output."""
    load: jax.Array  # [E] tokens per expert (valid tokens)
    balance: jax.Array  # sequence-wise balance loss (without alpha)
    dropped: jax.Array  # (token, expert) assignments past capacity (0 when dropless)
    routes: jax.Array  # [B, T, K] int32: the experts each token used
    route_diff: jax.Array  # float32: valid tokens with given routes whose own routing differs (0 without routes)


class MoE(nnx.Module):
    """Shared experts (one SwiGLU of width n_shared_experts x I) plus routed experts."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        E, D, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        init = normal_init(cfg)
        pdt = dtype_of(cfg.param_dtype)
        self.gate = Param(init(rngs.params(), (D, E), jnp.float32), axes=("embed", None))
        self.bias = RouterBias(jnp.zeros((E,), jnp.float32), axes=(None,)) if cfg.topk_method == "noaux_tc" else None
        self.w_gate = Param(init(rngs.params(), (E, D, I), pdt), axes=("exp", "embed", "moe_mlp"))
        self.w_up = Param(init(rngs.params(), (E, D, I), pdt), axes=("exp", "embed", "moe_mlp"))
        self.w_down = Param(init(rngs.params(), (E, I, D), pdt), axes=("exp", "moe_mlp", "embed"))
        self.shared = MLP(cfg, cfg.n_shared_experts * I, rngs=rngs) if cfg.n_shared_experts else None

    def __call__(self, x_BTD, valid_BT, experts_fn=None, routes_BTK: Optional[jax.Array] = None,
                 replay: bool = True):
        """Returns (y_BTD, MoEAux). experts_fn may return y or (y, dropped). routes_BTK: the experts a sampler chose
        (-1: none recorded): with replay they are used (`replay_route`), without they are only compared with the
        router's own choice (MoEAux.route_diff)."""
        cfg = self.cfg
        if experts_fn is None:
            experts_fn = functools.partial(routed_experts, kernels=cfg.kernels)
        B, T, D = x_BTD.shape
        logits_BTE = router_logits(x_BTD, self.gate[...])
        bias = None if self.bias is None else self.bias[...]
        route_diff = jnp.zeros((), jnp.float32)
        if routes_BTK is None:
            w_BTK, idx_BTK, scores_BTE = route(logits_BTE, bias, cfg)
        else:
            w_BTK, idx_BTK, scores_BTE, own_BTK = replay_route(logits_BTE, bias, routes_BTK, cfg)
            given_BT = (routes_BTK[..., 0] >= 0) & valid_BT
            route_diff = jnp.sum((given_BT & routes_differ(routes_BTK, own_BTK)).astype(jnp.float32))
            if not replay:
                w_BTK, idx_BTK, scores_BTE = route(logits_BTE, bias, cfg)
        # kept under `model.remat=save_experts` with the experts' own sort: a backward that recomputed the choices
        # could break a near-tie the other way than the kept rows did
        idx_BTK = checkpoint_name(idx_BTK, "moe_order")
        dt = x_BTD.dtype
        y_TD = experts_fn(x_BTD.reshape(B * T, D), w_BTK.reshape(B * T, -1), idx_BTK.reshape(B * T, -1),
                          self.w_gate[...].astype(dt), self.w_up[...].astype(dt), self.w_down[...].astype(dt))
        dropped = jnp.zeros((), jnp.int32)
        if isinstance(y_TD, tuple):
            y_TD, dropped = y_TD
        y_BTD = y_TD.reshape(B, T, D)
        if self.shared is not None:
            y_BTD = y_BTD + self.shared(x_BTD)
        load_E = expert_load(idx_BTK, valid_BT, cfg.n_routed_experts)
        bal = sequence_balance_loss(scores_BTE, idx_BTK, valid_BT, cfg)
        return y_BTD, MoEAux(load_E, bal, dropped, idx_BTK, route_diff)

"""Pallas kernels for the one-device decode step on GPU (Triton), checked on CPU in interpret mode.

At small batch the fused decode step (`deepjax.infer.fast.fused`) is bound by kernel count and by XLA:GPU's
matrix-vector reductions, not by bytes: on one H100 at batch 1, ~32 kernels per layer at ~2 us each, and the
gathered experts' weights read at ~1.2 TB/s (docs/LOG.md). These kernels each replace several of XLA's:

    latent_attention   absorbed attention over the latent cache for one new token per row, with that token's
                       cache row written in place (scores, masked online softmax, o = p . c: one kernel, the
                       cache read once and only up to each row's position)
    route              the DeepSeek routers (all three) for a few tokens: pairwise ranks, no sorts; returns the
                       chosen experts with the shared ones appended (weight 1), and the dense weights [T, E]
    experts_gathered   each token through its chosen experts, reading only those experts' rows: gate/up with
                       SwiGLU, then the down projection per expert (the weighted sum and residual add in XLA)
    attn_in, attn_q    for a few tokens: the previous layer's experts summed into the residual, RMSNorm, the
                       input projections, the query norm, the absorbed query projection with rope, and the cache
                       row (kv norm, rope): ~7 XLA kernels become 2 ("attn_in" in kernel_set)
    moe_in, experts_routed   for a few tokens: RMSNorm and the router logits, then the routing inside the
                       gathered experts' gate/up kernel ("moe_in"); the experts' weighted sum is left to the
                       next layer's attn_in
    latent_attention_pre     for more tokens (batch 64): latent_attention with the RMS scales, the query's rope
                       and the row's norm and rope in its prologue, on weights with the norms folded in
                       ("attn_pre"; ~41 -> ~36 us per layer of attention-side kernels at batch 64)

On one H100 at batch 1 on the bench preset these took the decode step from 16 to 9 kernels per MoE layer
(1,339 -> 1,512 tokens/s, docs/LOG.md).

`mode` selects how a kernel runs: "gpu" (compiled through Triton), "interpret" (Pallas' interpreter: any
backend, for tests). Triton blocks are powers of two: `supported(cfg, ...)` says whether a shape qualifies.
"""

from __future__ import annotations

import ast
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from deepjax.infer.fast import grouped as KG
from deepjax.infer.fast.common import call, chunk, pow2
from deepjax.model.config import ModelConfig
from deepjax.schema import bad

NEG = float(jnp.finfo(jnp.float32).min)
# the kernels a decode step can use (`supported`, kernel_set): "attn_in" is the norm + projections + rope before
# attention (`attn_in`, `attn_q`), "moe_in" the norm + router logits (`moe_in`) with the routing done inside the
# experts' gate/up kernel (it needs "experts"), "grouped" the prefill's grouped-matmul experts (`grouped`),
# "attn_pre" the query's scale and rope and the row's norm and rope inside the attention kernel
# (`latent_attention_pre`, for steps of more tokens than "attn_in" takes; it needs "attention")
KERNELS = ("attention", "route", "experts", "attn_in", "moe_in", "grouped", "attn_pre")
STEP_MAX_TOKENS = 8  # "attn_in" / "moe_in": one program per token and row block, for a few tokens per step
# The routers the kernels implement in their own code (`_route_vec`: the "route" kernel and "moe_in"'s routing inside
# the experts' gate/up kernel). For any other topk_method or scoring_func `supported` turns those two kernels off
# (the XLA routing, `fused.route_by_rank` on the model's scores, runs instead) and `route` / `experts_routed` raise
# naming the field: never a silent fallback to plain top-k or softmax.
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING_FUNCS = ("softmax", "sigmoid")
ROUTING_KERNELS = ("route", "moe_in")


def routes(cfg: ModelConfig) -> bool:
    """Whether the kernels' own routing (`_route_vec`) implements cfg's router."""
    return cfg.topk_method in TOPK_METHODS and cfg.scoring_func in SCORING_FUNCS


def check_router(cfg: ModelConfig) -> None:
    """Raises ConfigError naming the field when the kernels' routing does not implement cfg's router."""
    for field, value, known in (("topk_method", cfg.topk_method, TOPK_METHODS),
                                ("scoring_func", cfg.scoring_func, SCORING_FUNCS)):
        if value not in known:
            raise bad(f"model.{field}", value, f"the Pallas routing (deepjax/infer/fast/kernels.py, _route_vec) "
                                               f"implements {known}; implement it there, or leave {ROUTING_KERNELS} "
                                               "out of sampling.kernel_set")


# Block sizes and warps per kernel (`bench/tune.py kernels` times the choices on the GPU): the defaults. The product
# passes its table as an argument (`tuning`: `SamplingConfig.kernel_tuning` overrides, `fused.fuse_block` keeps the
# table in the block's weights dict); nothing reads settings from global state while tracing. A kernel function
# called without a table (tests, bench/tune.py's single-kernel sweeps) uses these.
TUNING = {
    # attention: bs cache rows per loop step, num_stages Triton's software pipelining of the loop's loads
    "attention": {"bs": 128, "num_warps": 4, "num_stages": 2},
    # route: 5.0 us at 64 tokens with 8 warps against 6.1 with 4 (`bench/tune.py kernels`; one H100); bt tokens per
    # program; logits: the kernel computes the norm and the router logits (`route` from x) in chunks of bd columns,
    # else XLA does
    # max_tokens: above this many tokens a step XLA routes instead (`fused.route_by_rank`): at 128 and 256 rows a
    # step that decoded 1.5% faster than the kernel (68,331 vs 67,339 and 110,451 vs 108,882 tokens/s), at GRPO's
    # 512 rows the sampler call took the same time (1.579 vs 1.563 s; bench preset, one H100, docs/LOG.md session 24)
    "route": {"num_warps": 8, "bt": 1, "bd": 128, "logits": True, "max_tokens": 64},
    "gate_up": {"bi": 8, "num_warps": 8},
    "down": {"bo": 16, "num_warps": 8, "split": True},
    "attn_in": {"br": 16, "num_warps": 4},
    "attn_q": {"bc": 32, "num_warps": 4},
    "moe_in": {"be": 4, "num_warps": 4},
    # decode_min_tokens: from this many tokens a step the fused decode runs its routed experts as the prefill's
    # grouped matmuls over sorted rows (`grouped.experts_grouped`) instead of every expert on every token; 0: never.
    # At GRPO's 512 rows it beat every-expert by 2.5% on an H200 (141,455 vs 137,962 tokens/s, bench preset,
    # bench/sampling_bench.py --tuning, docs/LOG.md session 20); smaller steps were not timed: every-expert.
    # decode_bm: rows per block of those grouped matmuls (a power of two >= 16; 0: `grouped.decode_block_rows`, about
    # one block per expert): at 512 rows, bench preset, one H100, 64 (the rule's) took 0.298 ms a layer, 32 0.311,
    # 16 (the prefill's `block_rows`) 0.336 (bench/tune.py grouped 512, docs/LOG.md session 24).
    # gather_in_kernel, down_out: `grouped.options`, for the fused prefill's and decode's grouped experts alike.
    # gather_in_kernel: the gate/up kernel gathers its rows of x by source token, no padded [R, D] copy (at 512 rows,
    # bench preset, one H100: XLA's row gather took 11 us a layer, 17 MB written and read back); False: that copy.
    # down_out: the down kernel's output rows in "x" (the activations' dtype, as training's ragged_dot) or "float32"
    # (34 MB at 512 rows, written and read back by the combine, which weights and sums in float32 either way).
    # GRPO's 512-row sampler call on one H100 (docs/LOG.md session 26): 1.416 s with both, 1.464 with the XLA
    # copy, 1.511 with the copy and float32 rows.
    # shared_dense: with the grouped decode, the shared experts run apart as the model's one MLP of width S*I (two
    # XLA products that read their weights once and do not wait on the routing) instead of as S more experts of the
    # grouped kernels (bench preset at 512 rows: 16 of the ~81 live 64-row blocks, each re-reading a shared
    # expert's weights). The sum is the model's: the routed experts' output plus the MLP's, each rounded (untimed).
    # dispatch_kernel: the grouped experts' layout (distinct experts a token) from one Pallas program
    # (`grouped.dispatch_kernel`) instead of XLA's one-hot, running sum, scatter and reductions (untimed).
    "grouped": {"decode_min_tokens": 512, "decode_bm": 0, "gather_in_kernel": True, "down_out": "x",
                "shared_dense": False, "dispatch_kernel": False},
}


def _triple(item):
    """A "kernel.setting=value" string (value a Python literal: 256, True) as its (kernel, setting, value) triple;
    anything else as given."""
    if not isinstance(item, str):
        return item
    key, eq, value = item.partition("=")
    kernel, dot, setting = key.strip().partition(".")
    try:
        if not (eq and dot):
            raise ValueError
        return kernel, setting, ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        if eq and dot and isinstance(TUNING.get(kernel, {}).get(setting), str) and value.strip():
            return kernel, setting, value.strip()  # a text setting unquoted (a shell strips the quotes)
        raise ValueError(f"kernel tuning {item!r}: KERNEL.SETTING=VALUE, e.g. grouped.decode_min_tokens=256") from None


def tuning(overrides=()) -> dict:
    """A fresh table: TUNING with `overrides`, (kernel, setting, value) triples or "kernel.setting=value" strings
    (`SamplingConfig.kernel_tuning`), applied (ValueError naming an unknown one or a value of the wrong type)."""
    out = {k: dict(v) for k, v in TUNING.items()}
    for item in map(_triple, overrides):
        if not (isinstance(item, tuple) and len(item) == 3 and item[0] in out and item[1] in out[item[0]]):
            raise ValueError(f"kernel tuning {item!r}: a (kernel, setting, value) triple of "
                             f"{ {k: sorted(v) for k, v in TUNING.items()} }")
        want = type(TUNING[item[0]][item[1]])
        if type(item[2]) is not want:  # (an int setting takes no bool or float, a bool setting no int)
            raise ValueError(f"kernel tuning {item!r}: {item[0]}.{item[1]} takes a {want.__name__}")
        if item[:2] == ("grouped", "decode_bm") and item[2] and not (item[2] >= 16 and item[2] & (item[2] - 1) == 0):
            raise ValueError(f"kernel tuning {item!r}: grouped.decode_bm is 0 (automatic) or a power of two >= 16")
        if item[:2] == ("grouped", "down_out") and item[2] not in KG.DOWN_OUT:
            raise ValueError(f"kernel tuning {item!r}: grouped.down_out is one of {sorted(KG.DOWN_OUT)}")
        out[item[0]][item[1]] = item[2]
    return out


def _tu(table, kernel: str) -> dict:
    return (TUNING if table is None else table)[kernel]


def _cache_block(cfg: ModelConfig, cache_len: int, table=None) -> int:
    """Cache rows per attention step: TUNING's, at most 32768 latent values (64 KB in bf16), dividing the cache
    length (1 when the length is unknown: no kernel)."""
    if cache_len <= 0:
        return 1
    return chunk(cache_len, min(_tu(table, "attention")["bs"], 32768 // cfg.kv_lora_rank))


def supported(cfg: ModelConfig, cache_len: int, mode: str = "gpu", n_tokens: int = 1, table=None) -> dict:
    """Which kernels the shapes allow ({kernel: bool} over KERNELS) for steps of n_tokens tokens. On GPU: Triton's
    power-of-two blocks and tl.dot's 16-row minimum; "attn_in" needs a query compression (q_lora_rank), and
    "attn_in" and "moe_in" at most STEP_MAX_TOKENS tokens. The interpreter takes any shape. Either way "route" and
    "moe_in" need a router the kernels implement (`routes`), and "route" at most TUNING's route.max_tokens tokens."""
    ok = _supported_shapes(cfg, cache_len, mode, n_tokens, table)
    ok["route"] = ok["route"] and n_tokens <= _tu(table, "route")["max_tokens"]
    return ok if routes(cfg) else {**ok, **dict.fromkeys(ROUTING_KERNELS, False)}


def _supported_shapes(cfg: ModelConfig, cache_len: int, mode: str, n_tokens: int, table=None) -> dict:
    N, C, R = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    E, D, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    few = n_tokens <= STEP_MAX_TOKENS
    if mode == "interpret":
        return {**dict.fromkeys(KERNELS, True), "attn_in": few and cfg.q_lora_rank is not None, "moe_in": few,
                "attn_pre": cfg.q_lora_rank is not None}
    Q = cfg.q_lora_rank or 0
    z = Q + C + 2 * R  # attn_in's outputs: [q latent ; kv latent ; k_pe ; k_pe pairs swapped]
    return {
        "attention": (N % 16 == 0 and pow2(C) and pow2(R) and C >= 16 and R >= 16
                      and _cache_block(cfg, cache_len, table) >= 16),
        "route": pow2(E) and E >= 2 and chunk(D, _tu(table, "route")["bd"]) >= 16,
        "experts": chunk(D, 1024) >= 16 and chunk(I, 1024) >= 16,
        "attn_in": (few and Q > 0 and chunk(Q, 128) >= 16 and chunk(z, _tu(table, "attn_in")["br"]) >= 4
                    and pow2(C) and pow2(R) and chunk(D, 512) >= 16 and chunk(C, _tu(table, "attn_q")["bc"]) >= 16),
        "moe_in": few and pow2(E) and E >= 4 and chunk(D, 512) >= 16 and chunk(I, 1024) >= 16,
        "grouped": KG.supported(D, I, 16, E + cfg.n_shared_experts),
        "attn_pre": Q > 0 and chunk(Q, 128) >= 16 and chunk(D, 1024) >= 16,
    }


# -------------------------------------------------------------------------------------------------- attention


def _make_attention_kernel(C: int, R: int, bn: int, bs: int, scale: float, pre: tuple | None = None):
    """pre = (Q, eps, dtype): the query and the row come unfinished (`latent_attention_pre`)."""
    f32 = jnp.float32

    def kernel(*refs):
        if pre:
            pos_ref, q_ref, x_ref, z_ref, cs_ref, kvn_ref, kv_ref, o_ref, kv_out_ref = refs
        else:
            pos_ref, q_ref, row_ref, kv_ref, o_ref, kv_out_ref = refs
        b, h = pl.program_id(0), pl.program_id(1)
        heads = pl.ds(h * bn, bn)
        pos = pos_ref[b]  # the new token's position: the cache holds positions [0, pos)
        if pre:
            qc, qr, rc, rr = _finish_query_and_row(b, heads, x_ref, q_ref, z_ref, cs_ref, kvn_ref, C, R, *pre)
        else:
            qc = q_ref[b, heads, pl.ds(0, C)]  # [bn, C]
            qr = q_ref[b, heads, pl.ds(C, R)]  # [bn, R]
            rc = row_ref[b, pl.ds(0, C)]  # [C]  the new token's row, attended to as position pos
            rr = row_ref[b, pl.ds(C, R)]
        # float32 operands: full-precision products (Triton's default for a float32 dot is tf32)
        prec = jax.lax.Precision.HIGHEST if q_ref.dtype == jnp.float32 else None
        dot = functools.partial(jnp.dot, preferred_element_type=f32, precision=prec)
        s_new = (jnp.sum(qc.astype(f32) * rc.astype(f32)[None, :], axis=1)
                 + jnp.sum(qr.astype(f32) * rr.astype(f32)[None, :], axis=1)) * scale  # [bn]
        acc0 = jnp.broadcast_to(rc.astype(f32)[None, :], (bn, C))
        l0 = jnp.ones((bn,), f32)

        def body(i, carry):
            m, l, acc = carry
            rows = pl.ds(i * bs, bs)
            kc = kv_ref[b, rows, pl.ds(0, C)]  # [bs, C]
            kr = kv_ref[b, rows, pl.ds(C, R)]  # [bs, R]
            s = dot(qc, kc.T) + dot(qr, kr.T)
            s = jnp.where((i * bs + jnp.arange(bs))[None, :] < pos, s * scale, NEG)  # [bn, bs]
            m_new = jnp.maximum(m, jnp.max(s, axis=1))
            p = jnp.exp(s - m_new[:, None])
            alpha = jnp.exp(m - m_new)
            acc = acc * alpha[:, None] + dot(p.astype(kc.dtype), kc)
            return m_new, l * alpha + jnp.sum(p, axis=1), acc

        m, l, acc = jax.lax.fori_loop(0, (pos + bs - 1) // bs, body, (s_new, l0, acc0))
        o_ref[b, heads, pl.ds(0, C)] = (acc / l[:, None]).astype(o_ref.dtype)
        if o_ref.shape[-1] > C:
            o_ref[b, heads, pl.ds(C, R)] = jnp.zeros((bn, R), o_ref.dtype)  # w_uv is zero there
        kv_out_ref[b, pos, pl.ds(0, C)] = rc
        kv_out_ref[b, pos, pl.ds(C, R)] = rr
        del m

    return kernel


def latent_attention(q_BNc, row_Bc, kv_BSc, pos_B, cfg: ModelConfig, mode: str, table=None):
    """Absorbed attention for one new token per row: q [B, N, C + R] (= [q_c ; q_pe]), the token's cache row
    [B, C + R] (= [c ; k_pe]), the cache [B, S, C + R] holding positions [0, pos_B). Returns (o [B, N, C + R]
    with o[..., :C] = softmax(q . kv * scale) . c and zeros in the last R columns, the cache with the new row
    written at pos_B). Softmax and sums in float32; the cached rows' unnormalized weights are rounded to the cache
    dtype before p . c (the new row's weight is not), close to `fused.absorbed_attention`, which rounds the
    normalized p."""
    return _attention_call("latent_attention", cfg, mode, table, q_BNc.shape[-1], None, pos_B, q_BNc,
                           row_Bc.astype(kv_BSc.dtype), kv_BSc)


def _attention_call(name: str, cfg: ModelConfig, mode: str, table, o_cols: int, pre, pos_B, q_BNx, *rest):
    """The attention kernel over grid (row, block of 16 heads) on (pos, q, ..., kv), the cache (last operand)
    aliased to the second output; o [B, N, o_cols] in q's dtype."""
    kv_BSc = rest[-1]
    B, N, _ = q_BNx.shape
    bn = 16 if N % 16 == 0 else N
    bs = _cache_block(cfg, kv_BSc.shape[1], table)
    if mode == "gpu" and bs < 16:
        raise ValueError(f"{name}: cache length {kv_BSc.shape[1]} has no power-of-two block of 16+ rows "
                         "(kernels.supported says which shapes the GPU kernel takes)")
    kernel = _make_attention_kernel(cfg.kv_lora_rank, cfg.qk_rope_head_dim, bn, bs, cfg.softmax_scale, pre)
    out_shape = (jax.ShapeDtypeStruct((B, N, o_cols), q_BNx.dtype), jax.ShapeDtypeStruct(kv_BSc.shape, kv_BSc.dtype))
    tu = _tu(table, "attention")
    return call(kernel, mode, out_shape, (B, N // bn), name, tu["num_warps"], tu["num_stages"],
                input_output_aliases={len(rest) + 1: 1})(pos_B.astype(jnp.int32), q_BNx, *rest)


def _finish_query_and_row(b, heads, x_ref, q_ref, z_ref, cs_ref, kvn_ref, C: int, R: int, Q: int, eps: float, dt):
    """`latent_attention_pre`'s prologue for batch row b: the RMS scales of x and of the q latent, the query's rope,
    the row's norm and rope (roundings as `fused._folded_qkv` and fused_block's XLA branch)."""
    f32 = jnp.float32
    cos, sin = cs_ref[b, 0, :], cs_ref[b, 1, :]  # [R]: each pair's angle twice
    D = x_ref.shape[1]
    bd, bq = chunk(D, 1024), chunk(Q, 128)  # (Triton loads power-of-two blocks: Q = 384 in three)
    s = _rms_inv([x_ref[b, pl.ds(k * bd, bd)].astype(f32) for k in range(D // bd)], D, eps)  # the input's RMS
    zq = [z_ref[b, pl.ds(k * bq, bq)].astype(f32) for k in range(Q // bq)]
    a = s * jax.lax.rsqrt(s * s * sum(jnp.sum(v * v) for v in zq) / Q + eps)  # the q latent's (z_q = s zu_q)
    q = lambda j, n: _rnd(q_ref[b, heads, pl.ds(j, n)].astype(f32) * a, dt)  # noqa: E731
    qc = q(0, C).astype(dt)
    qr = (q(C, R) * cos[None, :] + q(C + R, R) * sin[None, :]).astype(dt)
    z = lambda j, n: _rnd(z_ref[b, pl.ds(j, n)].astype(f32) * s, dt)  # noqa: E731
    c = z(Q, C)
    rc = (kvn_ref[...].astype(f32) * _rnd(c * _rms_inv([c], C, eps), dt)).astype(dt)
    return qc, qr, rc, (z(Q + C, R) * cos + z(Q + C + R, R) * sin).astype(dt)


def latent_attention_pre(x_BD, zu_BK, qu_BNJ, cs_B2R, kv_norm_C, kv_BSc, pos_B, cfg: ModelConfig, mode: str,
                         table=None):
    """`latent_attention` with the RMSNorm scales, the rope and the row's norm inside ("attn_pre", for steps of more
    tokens than `attn_q` takes), for weights with the norms' weights folded in (`fused._fuse_attention`):
    x [B, D] the block's input, zu [B, Q + C + 2R] = x . w_in^T (= [q latent ; c ; k_pe ; k_pe swapped] before the
    input's RMS scale), qu [B, N, C + 2R] = zu[:, :Q] . w_q^T (rows: absorbed q_c, q_pe, q_pe with pairs swapped),
    cs [B, 2, R] cos and sin (each pair's angle twice). In the kernel, with s = rsqrt(mean(x^2) + eps): z = s zu,
    q = qu * s * rsqrt(mean(z_q^2) + eps) with rope on its pe part, row = [rms_norm(z_c) * kv_norm ; rope(z_pe)]
    (`fused._folded_qkv` in XLA). Returns (o [B, N, C], the cache with the row written at pos_B). On one H100
    at batch 64 this replaced six XLA kernels per layer (norms, rope, concatenations; docs/LOG.md)."""
    dt = kv_BSc.dtype
    return _attention_call("latent_attention_pre", cfg, mode, table, cfg.kv_lora_rank, (cfg.q_lora_rank, cfg.rms_norm_eps, dt),
                           pos_B, qu_BNJ.astype(dt), x_BD, zu_BK.astype(dt), cs_B2R.astype(jnp.float32), kv_norm_C.astype(dt),
                           kv_BSc)


# ---------------------------------------------------------------------------------------------------- routing


def _route_vec(logits_E, bias_E, cfg: ModelConfig):
    """One token's routing in a kernel, by pairwise comparisons over [E, E]: (dense gate weights [E] float32,
    zero where unchosen; rank [E] int32 of each expert among the chosen, K or more where unchosen). Same choices
    and order as `moe.route` (ties to the lower index, as lax.top_k); routers outside TOPK_METHODS / SCORING_FUNCS
    raise (`check_router`)."""
    check_router(cfg)
    E, K, G = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group
    x = logits_E.astype(jnp.float32)
    if cfg.scoring_func == "sigmoid":
        scores = 1.0 / (1.0 + jnp.exp(-x))
    else:
        ex = jnp.exp(x - jnp.max(x))
        scores = ex / jnp.sum(ex)
    choice = scores if bias_E is None else scores + bias_E
    e = jnp.arange(E)
    lower = e[None, :] < e[:, None]  # [e, f]: f < e

    def rank(v, among):  # rank of each e among the f where among[e, f], descending, ties to the lower index
        a, b = v[:, None], v[None, :]
        return jnp.sum(((b > a) | ((b == a) & lower)) & among, axis=1)

    if cfg.topk_method in ("group_limited_greedy", "noaux_tc") and G > 1:
        grp = e // (E // G)
        same = grp[None, :] == grp[:, None]
        if cfg.topk_method == "noaux_tc":
            top2 = rank(choice, same) < 2
            gscore = jnp.sum(jnp.where(same & top2[None, :], choice[None, :], 0.0), axis=1)
        else:
            gscore = jnp.max(jnp.where(same, choice[None, :], -jnp.inf), axis=1)
        leader = (e % (E // G)) == 0
        keep = rank(gscore, leader[None, :] & ~same) < cfg.topk_group  # each other group once, by its leader
        choice = jnp.where(keep, choice, -jnp.inf)
    r = rank(choice, jnp.ones((E, E), jnp.bool_))
    w = jnp.where(r < K, scores, 0.0)
    if cfg.norm_topk_prob:
        w = w / (jnp.sum(w) + 1e-20)
    return w * cfg.routed_scaling_factor, r


def _make_route_kernel(cfg: ModelConfig, has_bias: bool, bt: int = 1, bd: int = 0, eps: float = 0.0, dt=None,
                       shared: bool = True):
    """Programs of bt tokens. bd > 0: the first operands are the residual stream x [T, D], the norm weight [D] and
    the router [E, D]; each program computes its tokens' normalized rows (`rms_norm`'s roundings) and their
    float32 logits in chunks of bd columns (the router chunk read once for the bt tokens) before routing."""
    E, K, S = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_shared_experts if shared else 0
    f32 = jnp.float32

    def kernel(*refs):
        refs = list(refs)
        base = pl.program_id(0) * bt
        if bd:
            x_ref, norm_ref, r_ref = refs.pop(0), refs.pop(0), refs.pop(0)
            n_chunks = x_ref.shape[1] // bd
            hs = [_normed_chunks(x_ref, base + i, norm_ref, n_chunks, bd, eps, dt) for i in range(bt)]
            logits = [jnp.zeros((E,), f32) for _ in range(bt)]
            for k in range(n_chunks):
                r = r_ref[:, pl.ds(k * bd, bd)].astype(f32)
                logits = [lg + jnp.sum(r * h[k][None, :], axis=1) for lg, h in zip(logits, hs)]
        else:
            logits_ref = refs.pop(0)
            logits = [logits_ref[base + i, :] for i in range(bt)]
        bias = refs.pop(0)[...] if has_bias else None
        idx_ref, w_ref, dense_ref = refs
        e = jnp.arange(E)
        for i in range(bt):
            t = base + i
            w, r = _route_vec(logits[i], bias, cfg)
            dense_ref[t, :] = w
            for k in range(K):  # the k-th choice: the expert of rank k
                idx_ref[t, k] = jnp.sum(jnp.where(r == k, e, 0))
                w_ref[t, k] = jnp.sum(jnp.where(r == k, w, 0.0))
            for s in range(S):  # shared experts: appended experts E + s, weight 1
                idx_ref[t, K + s] = jnp.int32(E + s)
                w_ref[t, K + s] = jnp.float32(1.0)

    return kernel


def route(logits_TE, bias_E, cfg: ModelConfig, mode: str, x_TD=None, norm_D=None, router_ED=None, table=None,
          shared: bool = True):
    """(idx [T, K + S] int32, w [T, K + S] float32, dense [T, E] float32): each token's K routed experts in
    `moe.route`'s order followed by the S shared experts (indices E .. E + S - 1, weight 1), and the routed
    gate weights as a dense [T, E] array (zero where unchosen).

    Or, with logits_TE None, from the block's residual stream x [T, D], the FFN norm's weight [D] and the router
    [E, D]: the kernel computes h = rms_norm(x) and the float32 logits h . router itself (as `fused`'s XLA
    path: h rounded to x's dtype, products and sums in float32). It then depends on x only, not on XLA's norm,
    so it is launched before the experts' gate/up matmul (which waits for that norm) and runs beside it (at 64
    tokens on an H100 XLA put its router matmul, its reduction and this kernel after gate/up: ~10 us a layer;
    docs/LOG.md, session 7). Raises ConfigError naming the field for a router it does not implement (`check_router`).
    shared=False: the K routed experts only (idx, w [T, K]; the shared experts run apart, `fused.fuse_block`)."""
    check_router(cfg)
    E = cfg.n_routed_experts
    X = cfg.num_experts_per_tok + (cfg.n_shared_experts if shared else 0)
    tu = _tu(table, "route")
    if logits_TE is None:
        T, D = x_TD.shape
        assert router_ED.shape == (E, D) and norm_D.shape == (D,), (x_TD.shape, norm_D.shape, router_ED.shape)
        args, bd = (x_TD, norm_D, router_ED), chunk(D, tu["bd"])
        eps, dt = cfg.rms_norm_eps, x_TD.dtype
    else:
        T = logits_TE.shape[0]
        args, bd, eps, dt = (logits_TE.astype(jnp.float32),), 0, 0.0, None
    bt = chunk(T, tu["bt"])
    out_shape = (jax.ShapeDtypeStruct((T, X), jnp.int32), jax.ShapeDtypeStruct((T, X), jnp.float32),
                 jax.ShapeDtypeStruct((T, E), jnp.float32))
    args += () if bias_E is None else (bias_E.astype(jnp.float32),)
    kernel = _make_route_kernel(cfg, bias_E is not None, bt, bd, eps, dt, shared)
    return call(kernel, mode, out_shape, (T // bt,), "route", tu["num_warps"])(*args)


# ----------------------------------------------------------------------------------------------- step kernels
# For a few tokens per step, the small XLA kernels around attention and the router (norms, projections, rope,
# router logits, routing: ~10 kernels of 1-6 us per layer at batch 1 on an H100) become three kernels, one program
# per (token, block of output rows). Each program recomputes the RMS statistics of its input row (a few KB read
# from L2) instead of waiting on another kernel. Roundings follow the XLA path (`fused.fused_block`): the
# norms' outputs, the projections' outputs and the roped values are rounded to the model dtype where XLA's are.


def _rnd(v, dt):
    return v.astype(dt).astype(jnp.float32)


def _rms_inv(chunks, n: int, eps: float):
    return jax.lax.rsqrt(sum(jnp.sum(c * c) for c in chunks) / n + eps)


def _make_attn_in_kernel(D: int, A: int, br: int, bd: int, eps: float, dt):
    f32 = jnp.float32

    def kernel(*refs):
        if A:
            res_ref, parts_ref, pw_ref, norm_ref, w_ref, x_ref, z_ref = refs
        else:
            res_ref, norm_ref, w_ref, x_ref, z_ref = refs
        t, j = pl.program_id(0), pl.program_id(1)
        xs = []
        for k in range(D // bd):
            cols = pl.ds(k * bd, bd)
            xk = res_ref[t, cols].astype(f32)
            if A:  # the previous block's experts: x = res + sum_a w_a * part_a, rounded as the residual stream
                acc = jnp.zeros((bd,), f32)
                for a in range(A):
                    acc += pw_ref[t, a] * parts_ref[t, a, cols]
                xk = _rnd(xk + acc, dt)
            xs.append(xk)
        inv = _rms_inv(xs, D, eps)
        rows = pl.ds(j * br, br)
        z = jnp.zeros((br,), f32)
        for k, xk in enumerate(xs):
            cols = pl.ds(k * bd, bd)
            h = _rnd(norm_ref[cols].astype(f32) * _rnd(xk * inv, dt), dt)
            z += jnp.sum(w_ref[rows, cols].astype(f32) * h[None, :], axis=1)
        z_ref[t, rows] = z.astype(z_ref.dtype)

        @pl.when(j == 0)
        def _():
            for k, xk in enumerate(xs):
                x_ref[t, pl.ds(k * bd, bd)] = xk.astype(x_ref.dtype)

    return kernel


def attn_in(x_TD, norm_D, w_in_KD, eps: float, mode: str, parts_TAD=None, w_TA=None, table=None):
    """(x [T, D], z [T, K]): x = x_TD, or x_TD + sum_a w[:, a] * parts[:, a] (the previous block's experts, summed
    here rather than in a kernel of their own), then z = w_in . rms_norm(x) * norm (in x's dtype)."""
    T, D = x_TD.shape
    Kz = w_in_KD.shape[0]
    A = 0 if parts_TAD is None else parts_TAD.shape[1]
    tu = _tu(table, "attn_in")
    br, bd = chunk(Kz, tu["br"]), chunk(D, 512)
    out_shape = (jax.ShapeDtypeStruct((T, D), x_TD.dtype), jax.ShapeDtypeStruct((T, Kz), x_TD.dtype))
    args = (x_TD,) + (() if A == 0 else (parts_TAD.astype(jnp.float32), w_TA.astype(jnp.float32)))
    return call(_make_attn_in_kernel(D, A, br, bd, eps, x_TD.dtype), mode, out_shape, (T, Kz // br), "attn_in",
                 tu["num_warps"])(*args, norm_D, w_in_KD)


def _make_attn_q_kernel(N: int, Q: int, C: int, R: int, bq: int, bc: int, eps: float, dt):
    f32 = jnp.float32
    nc = C // bc

    def kernel(z_ref, qn_ref, kvn_ref, w_ref, cs_ref, q_ref, row_ref):
        t, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        cos, sin = cs_ref[t, 0, :], cs_ref[t, 1, :]  # [R]: each pair's angle twice

        @pl.when(h < N)
        def _():
            zs = [z_ref[t, pl.ds(k * bq, bq)].astype(f32) for k in range(Q // bq)]
            inv = _rms_inv(zs, Q, eps)
            hs = [_rnd(qn_ref[pl.ds(k * bq, bq)].astype(f32) * _rnd(zk * inv, dt), dt) for k, zk in enumerate(zs)]

            def matvec(row0, n):
                acc = jnp.zeros((n,), f32)
                for k, hk in enumerate(hs):
                    acc += jnp.sum(w_ref[h, pl.ds(row0, n), pl.ds(k * bq, bq)].astype(f32) * hk[None, :], axis=1)
                return acc

            @pl.when(j < nc)
            def _():
                q_ref[t, h, pl.ds(j * bc, bc)] = matvec(j * bc, bc).astype(q_ref.dtype)

            @pl.when(j == nc)  # rope: x * cos + (x's pairs swapped, first negated) * sin, both rows precomputed
            def _():
                q_ref[t, h, pl.ds(C, R)] = (_rnd(matvec(C, R), dt) * cos
                                            + _rnd(matvec(C + R, R), dt) * sin).astype(q_ref.dtype)

        @pl.when((h == N) & (j == 0))  # the token's cache row [rms_norm(c) ; rope(k_pe)]
        def _():
            c = z_ref[t, pl.ds(Q, C)].astype(f32)
            inv = _rms_inv([c], C, eps)
            row_ref[t, pl.ds(0, C)] = (kvn_ref[...].astype(f32) * _rnd(c * inv, dt)).astype(row_ref.dtype)
            p, sw = z_ref[t, pl.ds(Q + C, R)].astype(f32), z_ref[t, pl.ds(Q + C + R, R)].astype(f32)
            row_ref[t, pl.ds(C, R)] = (p * cos + sw * sin).astype(row_ref.dtype)

    return kernel


def attn_q(z_TK, q_norm_Q, kv_norm_C, w_q_NJQ, cs_T2R, cfg: ModelConfig, mode: str, table=None):
    """(q [T, N, C + R], cache row [T, C + R]) from attn_in's z = [q latent (Q) ; c (C) ; k_pe (R) ; k_pe swapped
    (R)]: q = w_q . rms_norm(q latent) with w_q [N, C + 2R, Q] = [absorbed q_c rows ; q_pe rows ; q_pe rows
    swapped], rope on the pe part; row = [rms_norm(c) ; rope(k_pe)]. cs: [T, 2, R] cos and sin, each pair's twice.
    One program per (token, head, block of rows), and one for the row."""
    T = z_TK.shape[0]
    N = w_q_NJQ.shape[0]
    Q, C, R = cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    tu = _tu(table, "attn_q")
    bc, bq = chunk(C, tu["bc"]), chunk(Q, 128)
    dt = z_TK.dtype
    out_shape = (jax.ShapeDtypeStruct((T, N, C + R), dt), jax.ShapeDtypeStruct((T, C + R), dt))
    kernel = _make_attn_q_kernel(N, Q, C, R, bq, bc, cfg.rms_norm_eps, dt)
    return call(kernel, mode, out_shape, (T, N + 1, C // bc + 1), "attn_q", tu["num_warps"])(
        z_TK, q_norm_Q, kv_norm_C, w_q_NJQ, cs_T2R.astype(jnp.float32))


def _normed_chunks(x_ref, t, norm_ref, n_chunks: int, bd: int, eps: float, dt):
    """Row t of rms_norm(x) * norm as n_chunks float32 chunks of bd values, rounded as `layers.rms_norm` rounds."""
    xs = [x_ref[t, pl.ds(k * bd, bd)].astype(jnp.float32) for k in range(n_chunks)]
    inv = _rms_inv(xs, n_chunks * bd, eps)
    return [_rnd(norm_ref[pl.ds(k * bd, bd)].astype(jnp.float32) * _rnd(xk * inv, dt), dt) for k, xk in enumerate(xs)]


def _make_moe_in_kernel(D: int, be: int, bd: int, eps: float, dt):
    f32 = jnp.float32

    def kernel(x_ref, norm_ref, r_ref, h_ref, logit_ref):
        t, j = pl.program_id(0), pl.program_id(1)
        hs = _normed_chunks(x_ref, t, norm_ref, D // bd, bd, eps, dt)
        rows = pl.ds(j * be, be)
        acc = jnp.zeros((be,), f32)
        for k, hk in enumerate(hs):
            acc += jnp.sum(r_ref[rows, pl.ds(k * bd, bd)] * hk[None, :], axis=1)
        logit_ref[t, rows] = acc

        @pl.when(j == 0)
        def _():
            for k, hk in enumerate(hs):
                h_ref[t, pl.ds(k * bd, bd)] = hk.astype(h_ref.dtype)

    return kernel


def moe_in(x_TD, norm_D, router_ED, eps: float, mode: str, table=None):
    """(h [T, D] = rms_norm(x) * norm in x's dtype, router logits [T, E] = h . router in float32)."""
    T, D = x_TD.shape
    E = router_ED.shape[0]
    tu = _tu(table, "moe_in")
    be, bd = chunk(E, tu["be"]), chunk(D, 512)
    out_shape = (jax.ShapeDtypeStruct((T, D), x_TD.dtype), jax.ShapeDtypeStruct((T, E), jnp.float32))
    return call(_make_moe_in_kernel(D, be, bd, eps, x_TD.dtype), mode, out_shape, (T, E // be), "moe_in",
                 tu["num_warps"])(x_TD, norm_D, router_ED.astype(jnp.float32))


# ---------------------------------------------------------------------------------------------------- experts


def _make_gate_up_kernel(I: int, D: int, bi: int, bd: int, route_cfg: ModelConfig | None = None,
                         has_bias: bool = False):
    """Gate/up + SwiGLU for (token t, its a-th expert, rows block j). With route_cfg, the program routes the token
    itself from the router logits (`_route_vec`: a few [E, E] comparisons, cheaper than a kernel of its own) and
    the (t, a, 0) programs write the chosen expert and its weight: slots a < K are the routed experts in
    `moe.route`'s order, the rest the shared experts E, E + 1, ... with weight 1."""

    def kernel(*refs):
        t, a, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        if route_cfg is None:
            idx_ref, x_ref, wgu_ref, h_ref = refs
            e = idx_ref[t, a]
        else:
            if has_bias:
                logit_ref, bias_ref, x_ref, wgu_ref, h_ref, idx_ref, w_ref = refs
                bias = bias_ref[...]
            else:
                logit_ref, x_ref, wgu_ref, h_ref, idx_ref, w_ref = refs
                bias = None
            E, K = route_cfg.n_routed_experts, route_cfg.num_experts_per_tok
            wd, r = _route_vec(logit_ref[t, :], bias, route_cfg)
            pick = r == a
            e = jnp.where(a < K, jnp.sum(jnp.where(pick, jnp.arange(E), 0)), E + a - K).astype(jnp.int32)
            wa = jnp.where(a < K, jnp.sum(jnp.where(pick, wd, 0.0)), 1.0)

            @pl.when(j == 0)
            def _():
                idx_ref[t, a] = e
                w_ref[t, a] = wa

        g = jnp.zeros((bi,), jnp.float32)
        u = jnp.zeros((bi,), jnp.float32)
        for k in range(D // bd):  # the contracted axis in chunks
            cols = pl.ds(k * bd, bd)
            x = x_ref[t, cols].astype(jnp.float32)[None, :]
            g += jnp.sum(wgu_ref[e, pl.ds(j * bi, bi), cols].astype(jnp.float32) * x, axis=1)
            u += jnp.sum(wgu_ref[e, pl.ds(I + j * bi, bi), cols].astype(jnp.float32) * x, axis=1)
        h_ref[t, a, pl.ds(j * bi, bi)] = g / (1.0 + jnp.exp(-g)) * u

    return kernel


def _make_down_kernel(X: int, I: int, bd: int, bk: int):
    def kernel(idx_ref, w_ref, h_ref, res_ref, wd_ref, y_ref):
        t, j = pl.program_id(0), pl.program_id(1)
        rows = pl.ds(j * bd, bd)
        acc = jnp.zeros((bd,), jnp.float32)
        for a in range(X):
            e = idx_ref[t, a]
            part = jnp.zeros((bd,), jnp.float32)
            for k in range(I // bk):
                cols = pl.ds(k * bk, bk)
                part += jnp.sum(wd_ref[e, rows, cols].astype(jnp.float32) * h_ref[t, a, cols][None, :], axis=1)
            acc += w_ref[t, a] * part
        y_ref[t, rows] = (res_ref[t, rows].astype(jnp.float32) + acc).astype(y_ref.dtype)

    return kernel


def _make_down_split_kernel(I: int, bo: int, bk: int):
    def kernel(idx_ref, h_ref, wd_ref, y_ref):
        t, a, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        e = idx_ref[t, a]
        rows = pl.ds(j * bo, bo)
        part = jnp.zeros((bo,), jnp.float32)
        for k in range(I // bk):
            cols = pl.ds(k * bk, bk)
            part += jnp.sum(wd_ref[e, rows, cols].astype(jnp.float32) * h_ref[t, a, cols][None, :], axis=1)
        y_ref[t, a, rows] = part

    return kernel


def _down_parts(idx_TX, h_TXI, w_down_EDI, mode: str, table=None):
    """The split down projection: partial outputs [T, X, D] float32, one program per (token, expert, rows)."""
    T, X, I = h_TXI.shape
    D = w_down_EDI.shape[1]
    td = _tu(table, "down")
    bk, bo = chunk(I, 1024), chunk(D, td["bo"])
    return call(_make_down_split_kernel(I, bo, bk), mode, jax.ShapeDtypeStruct((T, X, D), jnp.float32),
                 (T, X, D // bo), "experts_down", td["num_warps"])(idx_TX, h_TXI, w_down_EDI)


def experts_gathered(x_TD, res_TD, idx_TX, w_TX, w_gu_EJD, w_down_EDI, mode: str, table=None):
    """res + sum_a w[t, a] * down_e(silu(gate_e x) * up_e x) over each token's experts e = idx[t, a], reading
    only those experts' rows: w_gu [E', 2I, D] (gate rows, then up rows), w_down [E', D, I]. Two kernels: gate/up
    with SwiGLU into h [T, X, I] (float32), then the down projection, per expert with the weighted sum and the
    residual add in XLA (TUNING split, the default), or all in the kernel, looping over the experts."""
    T, D = x_TD.shape
    X = idx_TX.shape[1]
    I = w_down_EDI.shape[2]
    tg, td = _tu(table, "gate_up"), _tu(table, "down")
    bi, bd, bk, bo = chunk(I, tg["bi"]), chunk(D, 1024), chunk(I, 1024), chunk(D, td["bo"])
    h = call(_make_gate_up_kernel(I, D, bi, bd), mode, jax.ShapeDtypeStruct((T, X, I), jnp.float32),
              (T, X, I // bi), "experts_gate_up", tg["num_warps"])(idx_TX, x_TD, w_gu_EJD)
    if td["split"]:  # one program per (token, expert, rows): partial outputs, summed with the weights by XLA
        y = _down_parts(idx_TX, h, w_down_EDI, mode, table)
        return (res_TD.astype(jnp.float32) + (y * w_TX[..., None]).sum(1)).astype(res_TD.dtype)
    return call(_make_down_kernel(X, I, bo, bk), mode, jax.ShapeDtypeStruct(res_TD.shape, res_TD.dtype),
                 (T, D // bo), "experts_down", td["num_warps"])(idx_TX, w_TX, h, res_TD, w_down_EDI)


def experts_routed(h_TD, logits_TE, bias_E, w_gu_EJD, w_down_EDI, cfg: ModelConfig, mode: str, table=None):
    """Routing and the gathered experts in two kernels: (parts [T, X, D] float32, idx [T, X], w [T, X]) with
    X = K routed + S shared experts; the output is sum_a w[:, a] * parts[:, a] (`attn_in` sums it). The gate/up
    kernel routes each token itself (`_make_gate_up_kernel`), so no kernel of its own routes. Raises ConfigError
    naming the field for a router it does not implement (`check_router`)."""
    check_router(cfg)
    T, D = h_TD.shape
    X = cfg.num_experts_per_tok + cfg.n_shared_experts
    I = w_down_EDI.shape[2]
    tg = _tu(table, "gate_up")
    bi, bd = chunk(I, tg["bi"]), chunk(D, 1024)
    out_shape = (jax.ShapeDtypeStruct((T, X, I), jnp.float32), jax.ShapeDtypeStruct((T, X), jnp.int32),
                 jax.ShapeDtypeStruct((T, X), jnp.float32))
    args = (logits_TE.astype(jnp.float32),) + (() if bias_E is None else (bias_E.astype(jnp.float32),))
    h, idx, w = call(_make_gate_up_kernel(I, D, bi, bd, cfg, bias_E is not None), mode, out_shape, (T, X, I // bi),
                      "experts_gate_up", tg["num_warps"])(*args, h_TD, w_gu_EJD)
    return _down_parts(idx, h, w_down_EDI, mode, table), idx, w


__all__ = ["latent_attention", "route", "experts_gathered", "experts_routed", "attn_in", "attn_q", "moe_in",
           "supported", "routes", "check_router", "TOPK_METHODS", "SCORING_FUNCS"]

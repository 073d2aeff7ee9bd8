"""The Pallas decode kernels (`deepjax.infer.fast.kernels`) in Pallas' interpreter against the XLA code they replace: the
same kernel bodies compile through Triton on GPU (tests/test_gpu_kernels.py compares them there)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepjax.infer.fast import fused as DF
from deepjax.infer.fast import kernels as KN
from deepjax import model as M
from deepjax.model import moe
from deepjax.model import presets
from deepjax.infer import sampling as SP
from deepjax.config import load_config
from deepjax.model.mla import MLA
from deepjax.model.layers import rms_norm
from deepjax.model.rope import apply_rope, rope_tables

# the kernels of a one-token step for a few tokens ("attn_pre" finishes the query inside attention where "attn_in"
# does not run: more tokens, or not in kernel_set)
STEP_ONE = tuple(k for k in KN.KERNELS if k not in ("grouped", "attn_pre"))


@pytest.mark.parametrize("preset", ["tiny", "bench", "deepseek_v2_lite", "deepseek_v3"])
def test_route_kernel_equals_route(preset):
    """Same experts in the same order and the same weights as `moe.route` (V2's 160 experts are not a power of two:
    its group-limited greedy router is checked on 64), ties included; shared experts appended with weight 1."""
    cfg = getattr(presets, preset)()
    if cfg.topk_method == "group_limited_greedy" or preset == "deepseek_v2_lite":
        cfg = dataclasses.replace(cfg, n_routed_experts=64, topk_method="group_limited_greedy", n_group=8,
                                  topk_group=3)
    E, K, S = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_shared_experts
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(4, E)) * 2, jnp.float32)
    logits = jnp.concatenate([logits, jnp.zeros((1, E)), jnp.round(logits[:1])])  # ties
    bias = jnp.asarray(rng.normal(size=E) * 0.1, jnp.float32) if cfg.topk_method == "noaux_tc" else None
    idx, w, dense = KN.route(logits, bias, cfg, "interpret")
    w_ref, idx_ref, _ = moe.route(logits, bias, cfg)
    np.testing.assert_array_equal(np.asarray(idx[:, :K]), np.asarray(idx_ref))
    np.testing.assert_allclose(np.asarray(w[:, :K]), np.asarray(w_ref), rtol=1e-6)
    assert (np.asarray(idx[:, K:]) == np.arange(E, E + S)).all() and (np.asarray(w[:, K:]) == 1).all()
    want = np.zeros((logits.shape[0], E), np.float32)
    np.put_along_axis(want, np.asarray(idx_ref), np.asarray(w_ref), axis=1)
    np.testing.assert_allclose(np.asarray(dense), want, rtol=1e-6)
    apart = KN.route(logits, bias, cfg, "interpret", shared=False)  # the shared experts apart: routed ones only
    for a, b in zip(apart, (idx[:, :K], w[:, :K], dense)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # from the residual stream: the kernel's own norm and router product (bf16 rows, float32 router), as XLA's
    x = jnp.asarray(rng.normal(size=(6, 256)) * 3, jnp.bfloat16)
    norm = jnp.asarray(1 + rng.normal(size=256) * 0.1, jnp.bfloat16)
    router = jnp.asarray(rng.normal(size=(E, 256)) * 0.1, jnp.float32)
    lg = jnp.einsum("td,ed->te", rms_norm(x, norm, cfg.rms_norm_eps).astype(jnp.float32), router, precision="highest")
    want = KN.route(lg, bias, cfg, "interpret")
    for bt in (1, 2):  # the table passed as an argument (SamplingConfig.kernel_tuning), not global state
        got = KN.route(None, bias, cfg, "interpret", x, norm, router, table=KN.tuning((("route", "bt", bt),)))
        for a, b in zip(got, want):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_latent_attention_kernel_equals_absorbed_attention(dtype):
    """Per row: the new row written at its position (and nothing else changed), and the output equal to softmax
    attention over positions [0, pos] of the latent part; rows at different positions, several blocks."""
    cfg = dataclasses.replace(presets.tiny(), num_attention_heads=16)
    dt = jnp.dtype(dtype)
    B, S, N, C, R = 4, 40, 16, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (B, N, C + R)).astype(dt)
    kv = jax.random.normal(ks[1], (B, S, C + R)).astype(dt)
    row = jax.random.normal(ks[2], (B, C + R)).astype(dt)
    pos = jnp.array([0, 7, 8, 39])  # first position, inside / on a block edge (blocks of 8), the last one
    o, kv2 = KN.latent_attention(q, row, kv, pos, cfg, "interpret")
    want_kv = DF.write_rows(kv, pos[:, None], row[:, None])
    np.testing.assert_array_equal(np.asarray(kv2), np.asarray(want_kv))
    mask = jnp.arange(S)[None, None] <= pos[:, None, None]
    eye = jnp.broadcast_to(jnp.eye(C, C + R, dtype=dt).T[None], (N, C + R, C)).transpose(0, 2, 1)  # o's latent part
    wo = jnp.broadcast_to(jnp.eye(N * C, dtype=dt).reshape(N * C, N, C), (N * C, N, C))
    want = DF.absorbed_attention(q[:, None], want_kv, mask, eye, wo, cfg.softmax_scale)[:, 0].reshape(B, N, C)
    tol = 1e-5 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(np.asarray(o[..., :C], np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol)
    assert (np.asarray(o[..., C:]) == 0).all()


@pytest.mark.parametrize("split", [True, False])
def test_experts_kernel_equals_gathered_experts(split):
    table = KN.tuning((("down", "split", split),))
    rng = np.random.default_rng(0)
    T, X, E, D, I = 3, 4, 6, 64, 32
    x = jnp.asarray(rng.normal(size=(T, D)), jnp.float32)
    res = jnp.asarray(rng.normal(size=(T, D)), jnp.float32)
    idx = jnp.asarray(rng.integers(0, E, (T, X)), jnp.int32)  # repeats allowed
    w = jnp.asarray(rng.random((T, X)), jnp.float32)
    w_gu = jnp.asarray(rng.normal(size=(E, 2 * I, D)) * 0.2, jnp.float32)
    w_down = jnp.asarray(rng.normal(size=(E, D, I)) * 0.2, jnp.float32)
    got = KN.experts_gathered(x, res, idx, w, w_gu, w_down, "interpret", table)
    want = res + DF.experts_gathered(x, w, idx, w_gu, w_down)
    assert np.abs(np.asarray(want - res)).max() > 0.5
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiny():
    cfg = dataclasses.replace(load_config("tiny").model, initializer_range=0.2)
    graphdef, params = M.init(cfg, jax.random.key(0))
    return cfg, graphdef, params


@pytest.fixture(scope="module")
def tiny_blocks(tiny):
    """The tiny model's blocks as modules: (cfg, {"dense_layers": [...], "moe_layers": [...]})."""
    cfg, graphdef, params = tiny
    return cfg, SP.unstack_layers(nnx.merge(graphdef, params))


@pytest.mark.parametrize("mtp", [False, True])
def test_generate_with_kernels_equals_xla(tiny, mtp):
    """`generate` with every kernel (interpreted) gives XLA's fused path's tokens and log-probs, with and without
    MTP drafting (two tokens per step: the route and expert kernels on 2B tokens, XLA attention)."""
    _, graphdef, params = tiny
    prompts, lengths = SP.pad_prompts([[5, 17, 300], [9, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11]])
    args = (graphdef, params, jnp.asarray(prompts), jnp.asarray(lengths), jax.random.key(0))
    sc = SP.SamplingConfig(max_new_tokens=6, temperature=0.0, mtp_draft=mtp)
    ref = SP.jit_generate(*args, dataclasses.replace(sc, decoder="fused"))
    got = SP.jit_generate(*args, dataclasses.replace(sc, decoder="interpret"))
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(ref.tokens))
    np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(ref.logprobs), atol=1e-5)


def test_kernel_choice_follows_shapes_and_settings(tiny_blocks):
    """On GPU a kernel runs only where Triton's power-of-two blocks fit; kernel_set narrows the choice; the experts
    kernel only on the gathered path (few tokens per step); "attn_in" needs a query compression and few tokens,
    "moe_in" the gathered experts kernel; the swapped rope rows are fused in only for "attn_in"."""
    bench = presets.bench()

    def ok(*args):  # the one-token kernels all supported
        return all(KN.supported(*args)[k] for k in STEP_ONE)

    assert ok(bench, 384)
    assert not KN.supported(presets.tiny(), 384)["attention"]  # 4 heads: under tl.dot's 16 rows
    assert not KN.supported(presets.deepseek_v2(), 384)["route"]  # 160 experts
    assert KN._cache_block(presets.deepseek_v3(), 4096) == 64 and KN._cache_block(bench, 384) == 128
    assert ok(presets.tiny(), 384, "interpret")
    wide = dataclasses.replace(presets.tiny(), num_attention_heads=16, qk_rope_head_dim=16)
    assert KN.supported(wide, 384)["attention"]
    assert not KN.supported(wide, 0)["attention"] and not KN.supported(wide, 100)["attention"]  # 100: blocks of 4
    assert SP.cache_length(SP.SamplingConfig(max_new_tokens=100), 128) == 240  # rounded up to 16 rows
    for mode in ("gpu", "interpret"):
        assert not KN.supported(presets.deepseek_v2_lite(), 384, mode)["attn_in"]  # no q_lora_rank
        few, many = (KN.supported(bench, 384, mode, n) for n in (KN.STEP_MAX_TOKENS, KN.STEP_MAX_TOKENS + 1))
        assert few["attn_in"] and few["moe_in"] and not many["attn_in"] and not many["moe_in"]
        assert many["attention"] and many["route"] and many["experts"]
        top = KN.TUNING["route"]["max_tokens"]  # above it XLA routes (the kernel loses at 512 tokens a step)
        assert KN.supported(bench, 384, mode, top)["route"] and not KN.supported(bench, 384, mode, top + 1)["route"]
        assert KN.supported(bench, 384, mode, top + 1, KN.tuning(("route.max_tokens=1024",)))["route"]
    cfg, layers = tiny_blocks
    Q, C, R, N = cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.num_attention_heads
    blk = layers["moe_layers"][0]

    def fuse(n, kernels="interpret", ks=KN.KERNELS):
        return DF.fuse_block(blk, jnp.float32, n, kernels, 16, ks)

    def rows(w, swapped: bool):  # the weights carry the swapped rope rows exactly when "attn_in" or "attn_pre" runs
        assert set(w["kernels"]) == set(KN.KERNELS)
        assert bool(w["kernels"]["attn_in"] or w["kernels"]["attn_pre"]) == swapped
        assert w["folded"] == bool(w["kernels"]["attn_pre"]) == ("w_o" in w["attn"]) == ("attn_norm" not in w)
        assert w["attn"]["w_in"].shape == (Q + C + (2 if swapped else 1) * R, cfg.hidden_size)
        assert w["attn"]["w_q"].shape == (N, C + (2 if swapped else 1) * R, Q)

    def step(w):
        return {k: w["kernels"][k] for k in STEP_ONE}

    every = fuse(1)
    assert every["gathered"] and step(every) == dict.fromkeys(STEP_ONE, "interpret") and not every["kernels"]["attn_pre"]
    rows(every, True)
    pre = fuse(1, ks=("attention", "attn_pre"))  # without "attn_in": the attention kernel finishes q and the row
    assert pre["kernels"]["attn_pre"] == "interpret" and pre["folded"] and "w_o" in pre["attn"]
    rows(pre, True)
    assert not fuse(1, ks=("attn_pre",))["kernels"]["attn_pre"]  # it needs "attention"
    one = fuse(1, ks=("attention", "experts"))
    assert one["gathered"] and step(one) == {"attention": "interpret", "route": None, "experts": "interpret",
                                             "attn_in": None, "moe_in": None}
    rows(one, False)
    no_experts = fuse(1, ks=("attn_in", "moe_in"))  # "moe_in" routes inside the experts kernel: dropped without it
    assert step(no_experts) == {"attention": None, "route": None, "experts": None, "attn_in": "interpret",
                                "moe_in": None}
    rows(no_experts, True)
    four = fuse(4)  # 4 tokens x 3 experts > 9 experts: all experts, no experts kernel, so no "moe_in" either
    assert not four["gathered"] and four["kernels"]["experts"] is None and four["kernels"]["moe_in"] is None
    assert KN.supported(cfg, 16, "interpret", 4)["moe_in"]
    rows(four, True)
    many = fuse(KN.STEP_MAX_TOKENS + 1)
    assert not many["gathered"] and many["kernels"]["route"] == "interpret" and many["kernels"]["attention"]
    assert many["kernels"]["experts"] is None and many["kernels"]["moe_in"] is None
    assert many["kernels"]["attn_pre"] == "interpret"
    rows(many, True)
    assert not DF.fuse_block(blk, jnp.float32, 4, "interpret", 16, tokens_per_row=2)["kernels"]["attn_pre"]  # MTP
    rows(fuse(1, None), False)
    assert fuse(1, None)["kernels"] == dict.fromkeys(KN.KERNELS)
    # the block sizes are an argument: a table without the split down projection turns moe_in off for this block only
    assert fuse(1)["kernels"]["moe_in"] == "interpret" and fuse(1)["tuning"] == KN.tuning()
    no_split = DF.fuse_block(blk, jnp.float32, 1, "interpret", 16, tuning=KN.tuning((("down", "split", False),)))
    assert no_split["kernels"]["moe_in"] is None and fuse(1)["kernels"]["moe_in"] == "interpret"
    assert SP.kernel_mode("fused") is None and SP.kernel_mode("interpret") == "interpret"
    assert SP.kernel_mode(SP.resolve_decoder(SP.SamplingConfig())) == ("gpu" if jax.default_backend() == "gpu" else None)


# ----------------------------------------------------------------------------------------------- step kernels


def _normal(rng, shape, scale=1.0, dt=jnp.float32):
    return jnp.asarray(rng.normal(size=shape) * scale, jnp.float32).astype(dt)


def _tol(dt):
    return 1e-5 if dt == jnp.float32 else 2e-2


def _far(a, b, tol):
    """The largest difference of a and b is far above tol: a wrong variant that the check would catch."""
    return np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max() > 10 * tol


def test_swap_pairs_gives_rope():
    """rope(x) = x * cos + swap(x) * sin (each pair's angle twice), the identity the step kernels use; the
    projection with swapped rows is the swapped projection."""
    rng = np.random.default_rng(0)
    x = _normal(rng, (2, 3, 8))
    ang = jnp.asarray(rng.uniform(-4, 4, (2, 3, 4)), jnp.float32)
    cos, sin = jnp.cos(ang) * 1.2, jnp.sin(ang) * 1.2  # YaRN scales both

    def rep(a):  # each pair's value twice
        return jnp.repeat(a, 2, -1)

    want = apply_rope(x, cos, sin)
    np.testing.assert_allclose(np.asarray(x * rep(cos) + DF._swap_pairs(x, -1) * rep(sin)), np.asarray(want),
                               atol=1e-6)
    assert _far(x * rep(cos) - DF._swap_pairs(x, -1) * rep(sin), want, 1e-6)  # sin's sign matters
    np.testing.assert_array_equal(np.asarray(DF._swap_pairs(jnp.arange(4.0), 0)), [-1, 0, -3, 2])
    w, h = _normal(rng, (8, 5)), _normal(rng, (5,))
    np.testing.assert_allclose(np.asarray(DF._swap_pairs(w, 0) @ h), np.asarray(DF._swap_pairs(w @ h, 0)),
                               atol=1e-6)


@pytest.mark.parametrize("pending", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_attn_in_kernel_equals_norm_and_projection(dtype, pending):
    """x (with the previous block's expert parts summed in, as `settle`) and z = w_in . rms_norm(x) * norm, as
    fused_block's XLA branch; three column chunks of D, three row blocks."""
    dt, eps = jnp.dtype(dtype), presets.tiny().rms_norm_eps
    rng = np.random.default_rng(1)
    T, A, D, Kz = 3, 3, 1536, 48
    res_TD = _normal(rng, (T, D), dt=dt)
    norm_D = (1 + _normal(rng, (D,), 0.3)).astype(dt)
    w_in_KD = _normal(rng, (Kz, D), D ** -0.5, dt)
    parts_TAD, w_TA = _normal(rng, (T, A, D)), jnp.asarray(rng.random((T, A)), jnp.float32)
    if not pending:
        parts_TAD = w_TA = None
    x_TD, z_TK = KN.attn_in(res_TD, norm_D, w_in_KD, eps, "interpret", parts_TAD, w_TA)
    x_ref = DF.settle(DF.Pending(res_TD, parts_TAD, w_TA)) if pending else res_TD
    z_ref = jnp.einsum("td,kd->tk", rms_norm(x_ref, norm_D, eps), w_in_KD)
    tol = _tol(dt)
    assert x_TD.dtype == z_TK.dtype == dt
    np.testing.assert_allclose(np.asarray(x_TD, np.float32), np.asarray(x_ref, np.float32), rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(z_TK, np.float32), np.asarray(z_ref, np.float32), rtol=tol, atol=tol)
    wrong = (res_TD, norm_D) if pending else (x_ref, jnp.ones_like(norm_D))  # the parts dropped / the norm's weight
    assert _far(z_TK, jnp.einsum("td,kd->tk", rms_norm(*wrong, eps), w_in_KD), tol)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", ["tiny", "wide"])
def test_attn_q_kernel_equals_xla_query_and_row(tiny_blocks, shape, dtype):
    """q = w_q . rms_norm(q latent) with rope on its pe part, and the cache row [rms_norm(c) ; rope(k_pe)], as
    fused_block's XLA branch, from an attention block's weights fused with the swapped rope rows; "wide": two
    latent chunks of Q and two row blocks of C."""
    cfg, layers = tiny_blocks
    if shape == "tiny":
        attn = layers["moe_layers"][0].attn
    else:
        cfg = dataclasses.replace(cfg, q_lora_rank=256, kv_lora_rank=64)
        attn = MLA(cfg, rngs=nnx.Rngs(params=1))
    dt, eps = jnp.dtype(dtype), cfg.rms_norm_eps
    Q, C, R, N, D = cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.num_attention_heads, cfg.hidden_size
    rng = np.random.default_rng(2)
    a = DF._fuse_attention(attn, dt, attn_in=True)
    a["q_norm"], a["kv_norm"] = ((1 + _normal(rng, (n,), 0.3)).astype(dt) for n in (Q, C))
    T = 3
    z_TK = jnp.einsum("td,kd->tk", _normal(rng, (T, D), dt=dt), a["w_in"])  # [q latent ; c ; k_pe ; k_pe swapped]
    cos, sin = rope_tables(cfg, jnp.array([[3], [17], [250]]))  # [T, 1, R / 2]
    cs_T2R = jnp.stack([jnp.repeat(cos[:, 0], 2, -1), jnp.repeat(sin[:, 0], 2, -1)], 1)
    q_TNc, row_Tc = KN.attn_q(z_TK, a["q_norm"], a["kv_norm"], a["w_q"], cs_T2R, cfg, "interpret")

    def ref(sin):
        qf = jnp.einsum("tq,nkq->tnk", rms_norm(z_TK[:, :Q], a["q_norm"], eps), a["w_q"])[..., :C + R]
        q = jnp.concatenate([qf[..., :C], apply_rope(qf[:, None, :, C:], cos, sin)[:, 0]], -1)
        kv = z_TK[:, Q:Q + C + R]
        row = jnp.concatenate([rms_norm(kv[:, :C], a["kv_norm"], eps), apply_rope(kv[:, None, C:], cos, sin)[:, 0]],
                              -1)
        return q, row

    q_ref, row_ref = ref(sin)
    tol = _tol(dt)
    assert q_TNc.shape == (T, N, C + R) and row_Tc.shape == (T, C + R)
    np.testing.assert_allclose(np.asarray(q_TNc, np.float32), np.asarray(q_ref, np.float32), rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(row_Tc, np.float32), np.asarray(row_ref, np.float32), rtol=tol, atol=tol)
    q_bad, row_bad = ref(-sin)  # rope the other way round
    assert _far(q_TNc[..., C:], q_bad[..., C:], tol) and _far(row_Tc[:, C:], row_bad[:, C:], tol)
    if dtype == "float32":  # the swapped rows replaced by plain copies: caught
        w_bad = jnp.concatenate([a["w_q"][:, :C + R], a["w_q"][:, C:C + R]], 1)
        q_bad, _ = KN.attn_q(z_TK, a["q_norm"], a["kv_norm"], w_bad, cs_T2R, cfg, "interpret")
        assert _far(q_bad[..., C:], q_ref[..., C:], tol)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_moe_in_kernel_equals_norm_and_router(dtype):
    """h = rms_norm(x) * norm in x's dtype and float32 router logits h . router, as fused_block's XLA branch; two
    column chunks of D, 16 row blocks of E."""
    dt, eps = jnp.dtype(dtype), presets.tiny().rms_norm_eps
    rng = np.random.default_rng(3)
    T, D, E = 3, 1024, 64
    x_TD = _normal(rng, (T, D), dt=dt)
    norm_D = (1 + _normal(rng, (D,), 0.3)).astype(dt)
    router_ED = _normal(rng, (E, D), D ** -0.5)
    h_TD, logits_TE = KN.moe_in(x_TD, norm_D, router_ED, eps, "interpret")
    h_ref = rms_norm(x_TD, norm_D, eps)
    logits_ref = jnp.einsum("td,ed->te", h_ref.astype(jnp.float32), router_ED)
    tol = _tol(dt)
    assert h_TD.dtype == dt and logits_TE.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(h_TD, np.float32), np.asarray(h_ref, np.float32), rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(logits_TE), np.asarray(logits_ref), rtol=tol, atol=tol)
    wrong = jnp.einsum("td,ed->te", rms_norm(x_TD, jnp.ones_like(norm_D), eps).astype(jnp.float32), router_ED)
    assert _far(logits_TE, wrong, tol)  # the norm's weight matters


@pytest.mark.parametrize("preset,dtype", [("tiny", "float32"), ("tiny", "bfloat16"), ("bench", "float32"),
                                          ("deepseek_v2_lite", "float32")])
def test_experts_routed_kernel_equals_route_and_gathered_experts(preset, dtype):
    """The gate/up kernel's own routing: `moe.route`'s experts in its order and its weights, the shared experts
    appended with weight 1 (with the correction bias where the router has one; V2-Lite: softmax, greedy, none),
    and sum_a w * parts equal to `fused.experts_gathered` with that routing. The routers' real shapes (bench:
    64 experts, 8 groups), small expert matrices."""
    cfg = getattr(presets, preset)()
    dt = jnp.dtype(dtype)
    E, K, S, T, D, I = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_shared_experts, 4, 64, 32
    rng = np.random.default_rng(4)
    logits_TE = _normal(rng, (T, E), 2.0)
    bias_E = _normal(rng, (E,), 0.3) if cfg.topk_method == "noaux_tc" else None
    h_TD = _normal(rng, (T, D), dt=dt)
    w_gu = _normal(rng, (E + S, 2 * I, D), D ** -0.5, dt)
    w_down = _normal(rng, (E + S, D, I), I ** -0.5, dt)
    parts_TXD, idx_TX, w_TX = KN.experts_routed(h_TD, logits_TE, bias_E, w_gu, w_down, cfg, "interpret")
    w_ref, idx_ref, _ = moe.route(logits_TE, bias_E, cfg)
    if bias_E is not None:  # the bias changes some choice: a kernel that ignored it would fail
        assert (np.asarray(moe.route(logits_TE, None, cfg)[1]) != np.asarray(idx_ref)).any()
    idx_ref = jnp.concatenate([idx_ref, jnp.broadcast_to(jnp.arange(E, E + S, dtype=jnp.int32), (T, S))], -1)
    w_ref = jnp.concatenate([w_ref, jnp.ones((T, S), jnp.float32)], -1)
    np.testing.assert_array_equal(np.asarray(idx_TX), np.asarray(idx_ref))
    np.testing.assert_allclose(np.asarray(w_TX), np.asarray(w_ref), rtol=1e-6)
    assert parts_TXD.shape == (T, K + S, D) and parts_TXD.dtype == jnp.float32
    y_TD = (parts_TXD * w_TX[..., None]).sum(1)
    y_ref = DF.experts_gathered(h_TD, w_ref, idx_ref, w_gu, w_down).astype(jnp.float32)
    tol = _tol(dt)
    np.testing.assert_allclose(np.asarray(y_TD), np.asarray(y_ref), rtol=tol, atol=tol)
    routed_only = DF.experts_gathered(h_TD, w_ref[:, :K], idx_ref[:, :K], w_gu, w_down)
    assert _far(y_TD, routed_only, tol)  # the shared experts count


def test_fused_block_with_kernels_equals_xla(tiny_blocks):
    """One decode step through the tiny model's three blocks with every kernel (interpreted) and with none, from the
    same fused weights (random norms and router bias): the MoE blocks leave `Pending` outputs that the next block's
    attn_in sums; same output (settled) and same caches. The XLA branch also matches weights fused without the
    swapped rope rows."""
    cfg, layers = tiny_blocks
    f32 = jnp.float32
    B, S, D, c = 2, 16, cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim
    rng = np.random.default_rng(5)
    blocks = [*layers["dense_layers"], *layers["moe_layers"]]
    rnd = [{n: 1 + _normal(rng, (m,), 0.3) for n, m in (("attn_norm", D), ("ffn_norm", D), ("q_norm", cfg.q_lora_rank),
                                                      ("kv_norm", cfg.kv_lora_rank))}
           | {"bias": _normal(rng, (cfg.n_routed_experts,), 0.3)} for _ in blocks]

    def fuse(blk, r, kernels):  # random norms and router bias: the same for both fusions
        w = DF.fuse_block(blk, f32, B, kernels, S)
        ffn = dict(w["ffn"], bias=r["bias"]) if "router" in w["ffn"] else w["ffn"]
        return dict(w, attn_norm=r["attn_norm"], ffn_norm=r["ffn_norm"], ffn=ffn,
                    attn=dict(w["attn"], q_norm=r["q_norm"], kv_norm=r["kv_norm"]))

    ws = [fuse(b, r, "interpret") for b, r in zip(blocks, rnd)]
    plain = [fuse(b, r, None) for b, r in zip(blocks, rnd)]
    assert all({k: w["kernels"][k] for k in STEP_ONE} == dict.fromkeys(STEP_ONE, "interpret") for w in ws)
    off = [dict(w, kernels=dict.fromkeys(KN.KERNELS)) for w in ws]
    pos_BT = jnp.array([[5], [11]])
    cos, sin = rope_tables(cfg, pos_BT)
    mask_BTS = jnp.arange(S)[None, None, :] <= pos_BT[:, :, None]
    x0_BTD = _normal(rng, (B, 1, D))
    kvs = [_normal(rng, (B, S, c)) for _ in blocks]

    def step(ws):  # jitted: the interpreted kernels compile once (eager, they are traced at every call)
        def run(x, kvs):
            out = []
            for w, kv in zip(ws, kvs):
                x, kv, _ = DF.fused_block(w, x, kv, pos_BT, cos, sin, mask_BTS)
                out.append(kv)
            return x, out

        return jax.jit(run)(x0_BTD, kvs)

    pend, kv_got = step(ws)
    assert isinstance(pend, DF.Pending)  # the last MoE block's experts left to sum
    x = DF.settle(pend)
    for ref in (off, plain):
        x_ref, kv_ref = step(ref)
        assert not isinstance(x_ref, DF.Pending)
        np.testing.assert_allclose(np.asarray(x), np.asarray(x_ref), rtol=1e-5, atol=1e-5)
        for a, b in zip(kv_got, kv_ref):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    assert _far(x, pend.res, 1e-5)  # the last block's experts count


@pytest.mark.parametrize("dtype, kind", [("float32", "moe_layers"), ("float32", "dense_layers"),
                                         ("bfloat16", "dense_layers")])  # (bf16 routing flips: no MoE there)
def test_attn_pre_block_equals_xla(tiny_blocks, dtype, kind):
    """"attn_pre" (steps of more tokens than attn_in takes, or attn_in left out of kernel_set): the block's norm
    weights folded into w_in and w_q, the RMS scales, the query's rope and the row's norm and rope inside the
    attention kernel, one merged output matmul. Same block output and cache as XLA on the same folded weights, and
    in float32 as XLA on the unfolded weights; random norm weights (set on a copy of the block before fusing)."""
    cfg, layers = tiny_blocks
    dt = jnp.dtype(dtype)
    B, S, D, c = 3, 16, cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim
    rng = np.random.default_rng(7)
    g, st = nnx.split(layers[kind][0])
    blk = nnx.merge(g, st)  # a copy: the fixture's block keeps its weights
    for norm, n in ((blk.attn_norm, D), (blk.attn.q_norm, cfg.q_lora_rank), (blk.attn.kv_norm, cfg.kv_lora_rank)):
        norm.weight[...] = 1 + _normal(rng, (n,), 0.3)
    ks = ("attention", "attn_pre", "route")  # "route" for the MoE block
    w = DF.fuse_block(blk, dt, B, "interpret", S, ks)
    assert w["kernels"]["attn_pre"] == "interpret" and w["folded"]
    pos_BT = jnp.array([[0], [5], [15]])
    cos, sin = rope_tables(cfg, pos_BT)
    mask_BTS = jnp.arange(S)[None, None, :] <= pos_BT[:, :, None]
    x_BTD = _normal(rng, (B, 1, D), 2.0, dt)  # an RMS far from 1: the input's scale matters
    kv = _normal(rng, (B, S, c), dt=dt)

    def run(w):
        return jax.jit(lambda x, kv: DF.fused_block(w, x, kv, pos_BT, cos, sin, mask_BTS)[:2])(x_BTD, kv)

    x_got, kv_got = run(w)
    refs = [run(dict(w, kernels=dict.fromkeys(KN.KERNELS)))]  # XLA, the same folded weights (`_folded_qkv`)
    if dtype == "float32":
        refs.append(run(DF.fuse_block(blk, dt, B, None, S)))  # XLA, unfolded
    tol = _tol(dt)
    for x_ref, kv_ref in refs:  # (bf16: the output's absolute tolerance scaled to its size, ~8 here)
        x_ref = np.asarray(x_ref, np.float32)
        np.testing.assert_allclose(np.asarray(x_got, np.float32), x_ref, rtol=tol, atol=tol * max(1, np.abs(x_ref).max())
                                   if dt == jnp.bfloat16 else tol)
        np.testing.assert_allclose(np.asarray(kv_got, np.float32), np.asarray(kv_ref, np.float32), rtol=tol, atol=tol)
    changed = np.abs(np.asarray(kv_got, np.float32) - np.asarray(kv, np.float32)).max(-1) > 0
    assert (changed == (np.arange(S)[None] == np.asarray(pos_BT))).all()  # only each row's new position written
    blk.attn_norm.weight[...] = jnp.ones((D,))  # the folded attention norm reaches the output
    assert _far(run(DF.fuse_block(blk, dt, B, "interpret", S, ks))[0], x_got, tol)

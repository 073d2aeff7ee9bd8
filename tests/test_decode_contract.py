"""Decode contract: every decode path of the sampler equals the full forward under teacher forcing, on every value
of every config axis the model has, or raises an error naming the config field it does not implement (never a
silent difference).

Teacher forcing: the prompts are prefilled, then fixed reference tokens are fed through the decode step (one
token a step, or two with MTP drafting, as `sampling.generate` does); the logits at every position (and, with MTP,
the MTP module's draft logits) are compared with `model.forward` on the whole sequence (float32, atol 1e-4). The
steps are unrolled, not a lax.scan: under tests/conftest.py's --xla_backend_optimization_level=0, XLA:CPU
(jaxlib 0.10.2) miscompiles `fused.route_by_rank`'s pairwise ranks of softmax scores plus a bias (noaux_tc with
softmax) inside a loop body (wrong experts; right at optimization level 1 and above, and unrolled).

Paths (chosen by `SamplingConfig` fields, built from sampling's public pieces as `generate` builds them:
`resolve_decoder` / `fuse_layers` / `unstack_layers`, `fused_prefill_ok` / `prefill_fused` / `prefill`, `decode_tokens`,
`mtp_prefill` / `mtp_decode`):
    module      decoder="model": the model's own modules (`Transformer.blocks`, `MLA` with a cache), absorbed
    naive       decoder="naive": the module path with k and v expanded from the cached latents
    fused       decoder="fused": the fused weights (deepjax/infer/fast/fused.py), experts gathered (few tokens a step)
    fused_all   the same at many tokens a step (fuse_layers n_tokens=64): all experts, flat layout
    pallas      decoder="interpret" (Pallas' interpreter, the kernels that compile for GPU): attn_in / attn_q,
                latent_attention, moe_in + experts_routed (routing inside gate/up), grouped prefill
    pallas_split  kernel_set without attn_in / moe_in: latent_attention_pre ("attn_pre", with q_lora_rank), the
                route kernel, then the gathered experts' kernels
    pallas_all  decoder="interpret" at many tokens a step: attn_pre, the route kernel, all experts in XLA
    pallas_grouped  the same as the GPU's default at many rows a step: the experts as grouped matmuls (kernel_tuning
                grouped.decode_min_tokens) and XLA's routing (route.max_tokens below the step's tokens)
    pallas_apart  pallas_grouped with the shared experts apart, as the model's one MLP (grouped.shared_dense), and
                the route kernel on XLA's router logits (route.logits=False, route.max_tokens at the step's tokens)
    mtp         mtp_draft=True (decoder="fused"): two tokens a step (fused, tokens_per_row=2) and the MTP module
    mtp_module  mtp_draft=True, decoder="model"
    mtp_pallas  mtp_draft=True, decoder="interpret": the route kernel at two tokens a step, the MTP block fused

Axes (ModelConfig): topk_method x scoring_func x q_lora_rank (None / 16, not kv_lora_rank's 32) x
n_shared_experts (0 / 2) x norm_topk_prob x num_nextn_predict_layers (0 / 1) x rope_scaling (None / YaRN with
mscale != mscale_all_dim: cos/sin and softmax_scale both scaled) x first_k_dense_replace (1: a dense layer then
a MoE layer / 0: two MoE layers, a MoE block's pending output summed by the next block). The full product is
3 x 2^7 = 384 configs x 11 paths; this is a covering design of 6 configs (2 layers, tiny dims: 16 experts in 4
groups, top-4 from 2 groups, so group-limited routing differs from plain top-k), each compiled once per path:

    config      topk_method           scoring q_lora shared norm mtp rope dense | paths
    g_soft      greedy                softmax 16     2      T    1   yarn 0     | fused pallas mtp mtp_pallas module
    g_sig       greedy                sigmoid None   0      F    1   yarn 1     | fused fused_all pallas_split mtp
                                                                                  mtp_module module
    glg_sig     group_limited_greedy  sigmoid None   0      F    0   -    1     | fused pallas pallas_all
                                                                                  pallas_grouped naive mtp*
    glg_soft    group_limited_greedy  softmax 16     2      F    0   yarn 0     | fused fused_all pallas_split naive
                                                                                  mtp*
    noaux_sig   noaux_tc              sigmoid 16     2      T    1   yarn 1     | fused pallas pallas_all
                                                                                  pallas_grouped pallas_apart mtp
                                                                                  mtp_module
    noaux_soft  noaux_tc              softmax None   2      T    1   -    0     | fused pallas_apart mtp mtp_pallas

Every value of every axis appears; every topk_method x scoring_func pair, and every q_lora_rank x path pair,
is covered; the rows of the "pallas" path take every value of every axis. mtp*: the MTP paths on a model
without an MTP module raise the error naming model.num_nextn_predict_layers (`generate`).
`test_design_covers_the_axes` checks these properties, and that the design holds every value of
config.TOPK_METHODS and SCORING_FUNCS: a router added there fails it until a row uses it. Each Pallas path is
also checked to run the kernels it is named for (`KERNELS_USED`).

A router the model gains but a decode path does not implement (the issue: a new topk_method was routed as plain
top-k by fused.route_by_rank and kernels.route) is simulated by patching the model's `moe.route` /
`moe.router_scores` (which the module and fused paths import): the fused paths must raise naming
model.topk_method, the Pallas paths must not use their own router for a scoring_func they do not know.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepjax import model as M
from deepjax.infer import sampling as SP
from deepjax.infer.fast import fused as DF
from deepjax.infer.fast import kernels as KN
from deepjax.model import config as C
from deepjax.model import moe, presets

ATOL = 1e-4
PROMPTS = ([5, 17, 300], [9, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11], [400, 2, 2, 2, 41, 7])
N_CONT = 5  # reference tokens after each prompt: 4 single-token steps (or 2 two-token steps) and one more for MTP
YARN = C.RopeScaling(factor=4.0, original_max_position_embeddings=256, mscale=1.0, mscale_all_dim=0.707)

# name: (topk_method, scoring_func, q_lora_rank, n_shared_experts, norm_topk_prob, mtp layers, rope_scaling,
#        first_k_dense_replace, paths)
DESIGN = {
    "g_soft": ("greedy", "softmax", 16, 2, True, 1, YARN, 0, "fused pallas mtp mtp_pallas module"),
    "g_sig": ("greedy", "sigmoid", None, 0, False, 1, YARN, 1, "fused fused_all pallas_split mtp mtp_module module"),
    "glg_sig": ("group_limited_greedy", "sigmoid", None, 0, False, 0, None, 1,
                "fused pallas pallas_all pallas_grouped naive mtp mtp_module mtp_pallas"),
    "glg_soft": ("group_limited_greedy", "softmax", 16, 2, False, 0, YARN, 0,
                 "fused fused_all pallas_split naive mtp mtp_module mtp_pallas"),
    "noaux_sig": ("noaux_tc", "sigmoid", 16, 2, True, 1, YARN, 1,
                  "fused pallas pallas_all pallas_grouped pallas_apart mtp mtp_module"),
    "noaux_soft": ("noaux_tc", "softmax", None, 2, True, 1, None, 0, "fused pallas_apart mtp mtp_pallas"),
}
AXES = ("topk_method", "scoring_func", "q_lora_rank", "n_shared_experts", "norm_topk_prob",
        "num_nextn_predict_layers", "rope_scaling", "first_k_dense_replace")

# path: (SamplingConfig, tokens per step the weights are fused for (None: as generate, batch x tokens per row))
PATHS = {
    "module": (SP.SamplingConfig(decoder="model"), None),
    "naive": (SP.SamplingConfig(decoder="naive"), None),
    "fused": (SP.SamplingConfig(decoder="fused"), 1),
    "fused_all": (SP.SamplingConfig(decoder="fused"), 64),
    "pallas": (SP.SamplingConfig(decoder="interpret"), 1),
    "pallas_split": (SP.SamplingConfig(decoder="interpret", kernel_set=("attention", "route", "experts", "grouped",
                                                                        "attn_pre")), 1),
    "pallas_all": (SP.SamplingConfig(decoder="interpret"), 64),
    "pallas_grouped": (SP.SamplingConfig(decoder="interpret", kernel_tuning=("grouped.decode_min_tokens=64",
                                                                             "route.max_tokens=32")), 64),
    "pallas_apart": (SP.SamplingConfig(decoder="interpret", kernel_tuning=(
        "grouped.decode_min_tokens=64", "route.max_tokens=64", "route.logits=False", "route.bt=4",
        "grouped.shared_dense=True", "grouped.dispatch_kernel=True")), 64),
    "mtp": (SP.SamplingConfig(decoder="fused", temperature=0.0, mtp_draft=True), None),
    "mtp_module": (SP.SamplingConfig(decoder="model", temperature=0.0, mtp_draft=True), None),
    "mtp_pallas": (SP.SamplingConfig(decoder="interpret", temperature=0.0, mtp_draft=True), None),
}

# the Pallas kernels each Pallas path must have on in its fused layers (+ with a q_lora_rank; XLA paths: none)
KERNELS_USED = {"pallas": ({"attention", "moe_in", "experts", "grouped"}, {"attn_in"}),
                "pallas_split": ({"attention", "route", "experts", "grouped"}, {"attn_pre"}),
                "pallas_all": ({"attention", "route", "grouped"}, {"attn_pre"}),
                "pallas_grouped": ({"attention", "grouped", "grouped_decode"}, {"attn_pre"}),
                "pallas_apart": ({"attention", "route", "grouped", "grouped_decode", "shared_apart"}, {"attn_pre"}),
                "mtp_pallas": ({"route", "grouped"}, set())}


def make_config(name: str, **overrides) -> C.ModelConfig:
    topk, scoring, q, shared, norm, mtp, rope, dense, _ = DESIGN[name]
    cfg = dataclasses.replace(
        presets.tiny(), num_hidden_layers=2, first_k_dense_replace=dense, n_routed_experts=16, n_group=4,
        topk_group=2, num_experts_per_tok=4, topk_method=topk, scoring_func=scoring, q_lora_rank=q,
        n_shared_experts=shared, norm_topk_prob=norm, num_nextn_predict_layers=mtp, rope_scaling=rope)
    cfg.validate()
    return dataclasses.replace(cfg, **overrides)  # (overrides: routers the model does not know; not validated)


def _params(cfg: C.ModelConfig):
    """Weights drawn without compiling `model.init`: 0.2-scaled normals (peaked logits, decisive routing), norm
    weights near 1 (so folding them into the fused weights matters), a nonzero router correction bias."""
    graphdef, abstract = M.abstract_init(cfg)
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        name = M.path_str(path)
        z = rng.standard_normal(leaf.shape)
        v = 1 + 0.1 * z if ".weight" in name else 0.1 * z if ".bias" in name else 0.2 * z
        return jnp.asarray(v, leaf.dtype)

    return graphdef, jax.tree_util.tree_map_with_path(draw, abstract)


def _batch(cfg):
    rng = np.random.default_rng(1)
    cont = rng.integers(0, cfg.vocab_size, (len(PROMPTS), N_CONT)).astype(np.int32)
    prompts, lengths = SP.pad_prompts(list(PROMPTS))
    seqs = np.zeros((len(PROMPTS), max(map(len, PROMPTS)) + N_CONT), np.int32)  # right-padded: causal, unread
    for b, p in enumerate(PROMPTS):
        seqs[b, :len(p) + N_CONT] = list(p) + list(cont[b])
    return prompts, lengths, cont, seqs


def _reference(graphdef, params, cfg):
    """Full-forward logits (and the first MTP module's) at positions lengths - 1 + [0, N_CONT): [B, N_CONT, V]."""
    _, lengths, _, seqs = _batch(cfg)
    out = M.jit_forward(graphdef, params, jnp.asarray(seqs))
    take = lambda a: np.stack([a[b, n - 1:n - 1 + N_CONT] for b, n in enumerate(lengths)])  # noqa: E731
    return take(np.asarray(out.logits)), None if out.mtp_logits is None else take(np.asarray(out.mtp_logits[0]))


@functools.lru_cache(maxsize=None)
def _model(name: str, **overrides):
    cfg = make_config(name, **overrides)
    graphdef, params = _params(cfg)
    return cfg, graphdef, params, _reference(graphdef, params, cfg)


def teacher_forced(graphdef, params, cfg, path: str):
    """The path's logits at the reference positions [B, N_CONT, V] (the prefill's, then one per decoded token), for
    the MTP paths the MTP module's draft logits there (None for the others), and the Pallas kernels its fused
    layers have on."""
    sc, n_fused = PATHS[path]
    prompts, lengths, cont, _ = _batch(cfg)
    B, P = prompts.shape
    T = 2 if sc.mtp_draft else 1
    n_tokens = B * T if n_fused is None else n_fused
    S = SP.cache_length(dataclasses.replace(sc, max_new_tokens=N_CONT), P)
    used = set()

    @jax.jit
    def run(params):
        model = nnx.merge(graphdef, params)
        prompts_BP, lengths_B, cont_BN = jnp.asarray(prompts), jnp.asarray(lengths), jnp.asarray(cont)
        decoder = SP.resolve_decoder(sc, None, n_tokens)
        if decoder in SP.FUSED_DECODERS:
            layers = SP.fuse_layers(model, n_tokens, SP.kernel_mode(decoder), S, sc.kernel_set, T,
                                    KN.tuning(sc.kernel_tuning))
        else:
            layers = SP.unstack_layers(model)
        for blk in (layers["dense_layers"] or []) + (layers["moe_layers"] or []):
            if isinstance(blk, dict):
                used.update(k for k, mode in blk["kernels"].items() if mode)
                used.update(["grouped_decode"] if blk["grouped_decode"] else [])  # decode's experts grouped
                used.update(["shared_apart"] if "shared_gu" in blk["ffn"] else [])  # shared experts as one MLP
        cache = SP.init_cache(cfg, B, S)
        if SP.fused_prefill_ok(layers, prompts.size):
            logits, cache, h = SP.prefill_fused(model, layers, prompts_BP, lengths_B, cache, return_hidden=True)
        else:
            logits, cache, h = SP.prefill(model, prompts_BP, lengths_B, cache, SP.prefill_experts_fn(cfg),
                                          return_hidden=True)
        decode_fn = SP.decode_experts_fn(cfg, n_tokens)
        if not sc.mtp_draft:
            out = [logits]
            for i in range(N_CONT - 1):
                lg, cache = SP.decode_step(model, cont_BN[:, i], lengths_B + i, cache, decode_fn, SP.attn_impl(sc.decoder),
                                           layers)
                out.append(lg)
            return jnp.stack(out, 1), None
        # MTP: as `_generate_mtp`, with the reference tokens in place of the accepted ones and the drafts
        mtp_block = (DF.fuse_block(model.mtp[0].block, h.dtype, n_tokens, SP.kernel_mode(decoder), S, sc.kernel_set, T)
                     if isinstance((layers["moe_layers"] or layers["dense_layers"])[0], dict) else None)
        kv = jnp.zeros((B, S, cfg.kv_lora_rank + cfg.qk_rope_head_dim), h.dtype)
        dlogits, kv = SP.mtp_prefill(model, h, prompts_BP, lengths_B, cont_BN[:, 0], kv, SP.prefill_experts_fn(cfg))

        out, drafts = [logits[:, None]], [dlogits[:, None]]
        for j in range(0, N_CONT - 1, 2):
            q = lengths_B + j
            lg, h, cache = SP.decode_tokens(model, cont_BN[:, j:j + 2], q, cache, decode_fn, SP.attn_impl(sc.decoder), layers)
            dl, kv = SP.mtp_decode(model, h, cont_BN[:, j + 1:j + 3], q, kv, decode_fn, SP.attn_impl(sc.decoder), mtp_block)
            out.append(lg)
            drafts.append(dl)
        return jnp.concatenate(out, 1), jnp.concatenate(drafts, 1)

    logits, draft = run(params)
    return np.asarray(logits), None if draft is None else np.asarray(draft), used


def _check(got, want, what):
    assert np.abs(want).max() > 1.0, what  # not a near-zero comparison
    err = np.abs(got - want).max()
    assert err <= ATOL, f"{what}: max |decode - forward| = {err:.3g} > {ATOL}"


def _assert_matches(name, path, **overrides):
    cfg, graphdef, params, (want, want_mtp) = _model(name, **overrides)
    logits, draft, used = teacher_forced(graphdef, params, cfg, path)
    if path in KERNELS_USED:  # (a router the kernels do not implement: routed in XLA, `kernels.supported`)
        base, with_q = KERNELS_USED[path]
        want_used = (base | (with_q if cfg.q_lora_rank is not None else set())) - (
            set() if KN.routes(cfg) else {"route", "moe_in"})
        assert used >= want_used, (path, used, want_used)
        assert path != "pallas_grouped" or "route" not in used, used  # (route.max_tokens: routed in XLA)
        assert ("shared_apart" in used) == (path == "pallas_apart"), used
    else:
        assert not used, (path, used)
    _check(logits, want[:, :logits.shape[1]], f"{name}/{path} logits")
    if draft is not None:
        _check(draft, want_mtp[:, :draft.shape[1]], f"{name}/{path} MTP draft logits")


CASES = [(name, path) for name, row in DESIGN.items() for path in row[-1].split()]


@pytest.mark.parametrize("name,path", CASES, ids=[f"{n}-{p}" for n, p in CASES])
def test_decode_path_equals_full_forward(name, path):
    sc, _ = PATHS[path]
    if sc.mtp_draft and DESIGN[name][5] == 0:  # no MTP module: generate refuses, naming the field
        cfg, graphdef, params, _ = _model(name)
        prompts, lengths, _, _ = _batch(cfg)
        with pytest.raises(ValueError, match=r"model\.num_nextn_predict_layers"):
            SP.jit_generate(graphdef, params, jnp.asarray(prompts), jnp.asarray(lengths), jax.random.key(0), sc)
        return
    _assert_matches(name, path)


def test_candidates_at_16_rows_take_their_kernels():
    """pallas_apart's settings at 16 rows a step (the contract's 3 rows fall back to XLA's dispatch): its fused
    layers take the route kernel and `grouped.dispatch_kernel` (named in the step's jaxpr), the routes it records
    are the default grouped decode's, and its logits and cache equal that path's (float32, interpreted)."""
    cfg, graphdef, params, _ = _model("noaux_sig")
    B, P = 16, 4
    rng = np.random.default_rng(3)
    prompts = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, P)), jnp.int32)
    tok = jnp.asarray(rng.integers(0, cfg.vocab_size, (B,)), jnp.int32)
    model = nnx.merge(graphdef, params)
    S = P + 4
    cache = SP.prefill(model, prompts, jnp.full((B,), P, jnp.int32), SP.init_cache(cfg, B, S),
                       SP.prefill_experts_fn(cfg))[1]

    def step(tuning):
        layers = SP.fuse_layers(model, B, "interpret", S, tuning=KN.tuning(tuning))
        return SP.decode_step(model, tok, jnp.full((B,), P, jnp.int32), cache, None, "absorbed", layers,
                              return_routes=True)

    at16 = ("grouped.decode_min_tokens=16",)  # (the grouped decode from 16 rows a step)
    apart = at16 + ("route.max_tokens=16", "route.logits=False", "route.bt=4", "grouped.shared_dense=True",
                    "grouped.dispatch_kernel=True")
    grouped = at16 + ("route.max_tokens=8",)
    text = str(jax.make_jaxpr(lambda: step(apart))())
    assert "name=dispatch" in text and "name=route" in text
    assert "name=dispatch" not in str(jax.make_jaxpr(lambda: step(grouped))())
    (lg, c, r), (lg0, c0, r0) = jax.jit(lambda: step(apart))(), jax.jit(lambda: step(grouped))()
    np.testing.assert_array_equal(np.asarray(r), np.asarray(r0))
    np.testing.assert_allclose(np.asarray(lg), np.asarray(lg0), atol=ATOL, rtol=0)
    for a, b in zip(jax.tree.leaves(c), jax.tree.leaves(c0)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=ATOL, rtol=0)


def test_design_covers_the_axes():
    """The module docstring's claims about DESIGN."""
    cfgs = {name: make_config(name) for name in DESIGN}
    paths = {name: row[-1].split() for name, row in DESIGN.items()}
    value = lambda c, axis: repr(getattr(c, axis))  # noqa: E731  (rope_scaling: None or YaRN)
    for axis in AXES:  # every value of every axis
        assert len({value(c, axis) for c in cfgs.values()}) >= 2, axis
    pairs = {(c.topk_method, c.scoring_func) for c in cfgs.values()}  # every router, every pair
    assert pairs == set(itertools.product(C.TOPK_METHODS, C.SCORING_FUNCS))
    for path, (sc, _) in PATHS.items():  # q_lora_rank x path, where the path runs (not refused)
        runs = [n for n in DESIGN if path in paths[n] and not (sc.mtp_draft and not cfgs[n].num_nextn_predict_layers)]
        assert {cfgs[n].q_lora_rank is None for n in runs} == {True, False}, path
    pallas = [cfgs[n] for n in DESIGN if "pallas" in paths[n]]  # the Pallas step: every value of every axis
    for axis in AXES:
        assert {value(c, axis) for c in pallas} == {value(c, axis) for c in cfgs.values()}, axis
    logits = jax.random.normal(jax.random.key(0), (256, 16)) * 2
    for c in cfgs.values():  # on these shapes the three routers choose differently: a fallback shows
        for other in set(C.TOPK_METHODS) - {c.topk_method}:
            idx = moe.route(logits, None, dataclasses.replace(c, topk_method=other))[1]
            assert (np.asarray(moe.route(logits, None, c)[1]) != np.asarray(idx)).any(), (c.topk_method, other)


# ------------------------------------------------------------------ routers the decode paths do not implement
# A researcher adds a router to the model (`moe.route`, `moe.router_scores`; the module and fused paths import
# them, so the patch reaches them as the edit would). NEW_TOPK: the K lowest-scored experts; NEW_SCORING:
# softplus scores. Neither is plain top-k / softmax, so a decode path that silently falls back differs.

NEW_TOPK, NEW_SCORING = "bottom_k", "softplus"


@pytest.fixture
def new_router(monkeypatch):
    route, scores = moe.route, moe.router_scores

    def router_scores(logits_TE, bias_E, cfg):
        if cfg.scoring_func != NEW_SCORING:
            return scores(logits_TE, bias_E, cfg)
        s = jax.nn.softplus(logits_TE.astype(jnp.float32))
        return s, s if bias_E is None else s + bias_E.astype(jnp.float32)

    def new_route(logits_TE, bias_E, cfg):
        if cfg.topk_method != NEW_TOPK:
            return route(logits_TE, bias_E, cfg)
        s, choice = moe.router_scores(logits_TE, bias_E, cfg)
        _, idx = jax.lax.top_k(-choice, cfg.num_experts_per_tok)
        return moe.gate_weights(jnp.take_along_axis(s, idx, -1), cfg), idx.astype(jnp.int32), s

    for mod, name, fn in ((moe, "router_scores", router_scores), (DF, "router_scores", router_scores),
                          (moe, "route", new_route), (DF, "moe_route", new_route)):
        monkeypatch.setattr(mod, name, fn)  # (the configs with NEW_* differ from the design's: no stale cache)


def test_new_topk_method_is_refused_by_name_where_not_implemented(new_router):
    """The module path routes with the model's own `moe.route`: it equals the forward. The fused paths (XLA and
    Pallas) do not know the router: they raise naming model.topk_method, in `generate` too."""
    _assert_matches("noaux_sig", "module", topk_method=NEW_TOPK)
    cfg, graphdef, params, _ = _model("noaux_sig", topk_method=NEW_TOPK)
    for path in ("fused", "fused_all", "pallas", "mtp"):
        with pytest.raises(ValueError, match=r"model\.topk_method"):
            teacher_forced(graphdef, params, cfg, path)
    prompts, lengths, _, _ = _batch(cfg)
    for sc in (SP.SamplingConfig(max_new_tokens=2), SP.SamplingConfig(max_new_tokens=2, decoder="interpret")):
        with pytest.raises(ValueError, match=r"model\.topk_method"):
            SP.jit_generate(graphdef, params, jnp.asarray(prompts), jnp.asarray(lengths), jax.random.key(0), sc)
    with pytest.raises(ValueError, match=r"model\.topk_method"):
        DF.route_by_rank(jnp.zeros((1, cfg.n_routed_experts)), None, cfg)
    with pytest.raises(ValueError, match=r"model\.topk_method"):
        KN.route(jnp.zeros((1, cfg.n_routed_experts)), None, cfg, "interpret")


def test_new_scoring_func_is_never_a_silent_difference(new_router):
    """The fused path scores with the model's `moe.router_scores`: it equals the forward. The Pallas kernels
    score in their own code: they leave a scoring_func they do not implement to XLA (`kernels.supported`), so
    the Pallas paths equal the forward too; called directly, the routing kernel raises naming
    model.scoring_func."""
    cfg = make_config("g_soft", scoring_func=NEW_SCORING)
    assert not any(KN.supported(cfg, 32, "interpret")[k] for k in ("route", "moe_in"))
    for path in ("fused", "pallas"):
        _assert_matches("g_soft", path, scoring_func=NEW_SCORING)
    with pytest.raises(ValueError, match=r"model\.scoring_func"):
        KN.route(jnp.zeros((1, cfg.n_routed_experts)), None, cfg, "interpret")

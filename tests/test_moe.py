"""DeepSeekMoE: the three routers on hand-computable cases and against NumPy, dropless vs dense experts,
balance loss and expert loads (docs/deepseek.md, Routing and Balancing)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepjax.model import presets
from deepjax.model.moe import (expert_load, route, routed_experts_dense, routed_experts_dropless,
                         sequence_balance_loss)


def _cfg(**kw):
    return dataclasses.replace(presets.tiny(), **kw)


def v3_cfg(**kw):
    return _cfg(**{"scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": True,
                   "routed_scaling_factor": 2.5, **kw})


def v2_cfg(**kw):
    return _cfg(**{"scoring_func": "softmax", "topk_method": "group_limited_greedy", "norm_topk_prob": False,
                   "routed_scaling_factor": 16.0, **kw})


def v2_lite_cfg(**kw):
    return _cfg(**{"scoring_func": "softmax", "topk_method": "greedy", "norm_topk_prob": False,
                   "routed_scaling_factor": 1.0, "n_group": 1, "topk_group": 1, **kw})


def _route(logits, bias, cfg):
    w, idx, scores = route(jnp.asarray(logits, jnp.float32)[None],
                           None if bias is None else jnp.asarray(bias, jnp.float32), cfg)
    assert w.dtype == jnp.float32 and idx.dtype == jnp.int32
    return np.asarray(w[0]), np.asarray(idx[0]), np.asarray(scores[0])


def _sorted(w, idx):
    order = np.argsort(idx)
    return w[order], idx[order]


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def _softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ---- hand cases -----------------------------------------------------------------------------------

def test_noaux_tc_bias_selects_but_does_not_weight():
    cfg = v3_cfg(n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1)
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -2.0, -3.0, -4.0])
    bias = np.array([0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    s = _sigmoid(logits)
    assert set(np.argsort(-s)[:2]) == {0, 1}  # without the bias: experts 0 and 1
    w, idx, scores = _route(logits, bias, cfg)
    w, idx = _sorted(w, idx)
    np.testing.assert_array_equal(idx, [0, 3])  # s + b: 0.88, -0.27, 0.62, 1.5, ...
    np.testing.assert_allclose(w, s[[0, 3]] / s[[0, 3]].sum() * 2.5, rtol=1e-6)
    np.testing.assert_allclose(w.sum(), 2.5, rtol=1e-6)
    np.testing.assert_allclose(scores, s, rtol=1e-6)  # scores are returned before the bias


def test_noaux_tc_group_score_is_top2_sum():
    # 4 groups of 2, keep 1 group. Group 0 = [0.9, ~0]: best max; group 1 = [0.8, 0.8]: best top-2 sum.
    cfg = v3_cfg(n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=1)
    logit = lambda p: np.log(p / (1 - p))
    logits = np.array([logit(0.9), -10.0, logit(0.8), logit(0.8), -10.0, -10.0, -10.0, -10.0])
    w, idx, _ = _route(logits, np.zeros(8), cfg)
    w, idx = _sorted(w, idx)
    np.testing.assert_array_equal(idx, [2, 3])
    np.testing.assert_allclose(w, [1.25, 1.25], rtol=1e-5)
    # 4 groups of 4, keep 1. Group 0 = [.9, .85, 0, 0]: best top-2 sum (1.75); group 1 = [.8]*4: best full sum.
    cfg = v3_cfg(n_routed_experts=16, num_experts_per_tok=2, n_group=4, topk_group=1)
    logits = np.full(16, -10.0)
    logits[:2] = [logit(0.9), logit(0.85)]
    logits[4:8] = logit(0.8)
    _, idx, _ = _route(logits, np.zeros(16), cfg)
    np.testing.assert_array_equal(np.sort(idx), [0, 1])


def test_noaux_tc_masks_dropped_groups_with_neg_inf():
    # All biases -2, so every kept choice s + b is negative: a dropped group masked with 0 would win.
    cfg = v3_cfg(n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2)
    logits = np.array([3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0])
    bias = np.full(8, -2.0)
    w, idx, _ = _route(logits, bias, cfg)
    w, idx = _sorted(w, idx)
    np.testing.assert_array_equal(idx, [0, 1, 2])  # groups 0 and 1 kept
    s = _sigmoid(logits)
    np.testing.assert_allclose(w, s[:3] / s[:3].sum() * 2.5, rtol=1e-6)


def test_group_limited_greedy_v2():
    # Softmax; group max picks group 0 ([3, -5]) where a top-2 sum would pick group 1 ([2.5, 2.5]).
    cfg = v2_cfg(n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=1)
    logits = np.array([3.0, -5.0, 2.5, 2.5, -5.0, -5.0, -5.0, -5.0])
    s = _softmax(logits)
    assert s[2] + s[3] > s[0] + s[1]
    w, idx, scores = _route(logits, None, cfg)
    w, idx = _sorted(w, idx)
    np.testing.assert_array_equal(idx, [0, 1])
    np.testing.assert_allclose(w, s[[0, 1]] * 16.0, rtol=1e-5)  # no renormalization, x16
    assert w.sum() < 16.0 * 0.5
    np.testing.assert_allclose(scores, s, rtol=1e-5)
    # With two groups kept the best experts overall are chosen, top-K across the kept groups.
    cfg = v2_cfg(n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2)
    _, idx, _ = _route(logits, None, cfg)
    np.testing.assert_array_equal(np.sort(idx), [0, 2])


def test_greedy_v2_lite():
    cfg = v2_lite_cfg(n_routed_experts=8, num_experts_per_tok=2)
    logits = np.log(np.arange(1, 9, dtype=np.float64))  # softmax = i / 36
    w, idx, _ = _route(logits, None, cfg)
    np.testing.assert_array_equal(idx, [7, 6])
    np.testing.assert_allclose(w, [8 / 36, 7 / 36], rtol=1e-5)


# ---- NumPy reference on random inputs -------------------------------------------------------------

def np_route(logits_TE, bias_E, cfg):
    E, K, G = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group
    s = _sigmoid(logits_TE) if cfg.scoring_func == "sigmoid" else _softmax(logits_TE)
    weights, indices = [], []
    for t in range(s.shape[0]):
        choice = s[t] + (bias_E if bias_E is not None else 0.0)
        if cfg.topk_method != "greedy":
            groups = choice.reshape(G, E // G)
            if cfg.topk_method == "noaux_tc":
                gscore = np.sort(groups, axis=-1)[:, -2:].sum(-1)
            else:
                gscore = groups.max(-1)
            kept = np.argsort(-gscore, kind="stable")[:cfg.topk_group]
            allowed = np.zeros(E, bool)
            for g in kept:
                allowed[g * (E // G):(g + 1) * (E // G)] = True
            choice = np.where(allowed, choice, -np.inf)
        idx = np.sort(np.argsort(-choice, kind="stable")[:K])
        w = s[t, idx]
        if cfg.norm_topk_prob:
            w = w / w.sum()
        weights.append(w * cfg.routed_scaling_factor)
        indices.append(idx)
    return np.array(weights), np.array(indices)


@pytest.mark.parametrize("method", ["noaux_tc", "group_limited_greedy", "greedy"])
def test_route_matches_numpy(method):
    E, K, T = 16, 4, 64
    if method == "noaux_tc":
        cfg = v3_cfg(n_routed_experts=E, num_experts_per_tok=K, n_group=4, topk_group=2)
        bias = np.random.default_rng(1).normal(-0.5, 0.5, E)  # both signs
    elif method == "group_limited_greedy":
        cfg = v2_cfg(n_routed_experts=E, num_experts_per_tok=K, n_group=4, topk_group=2)
        bias = None
    else:
        cfg = v2_lite_cfg(n_routed_experts=E, num_experts_per_tok=K)
        bias = None
    logits = np.random.default_rng(0).normal(0, 2.0, (T, E)).astype(np.float32)
    w, idx, _ = route(jnp.asarray(logits), None if bias is None else jnp.asarray(bias, jnp.float32), cfg)
    order = np.argsort(np.asarray(idx), axis=-1)
    idx_s = np.take_along_axis(np.asarray(idx), order, -1)
    w_s = np.take_along_axis(np.asarray(w), order, -1)
    w_ref, idx_ref = np_route(logits.astype(np.float64), bias, cfg)
    np.testing.assert_array_equal(idx_s, idx_ref)
    np.testing.assert_allclose(w_s, w_ref, rtol=2e-5, atol=1e-7)
    if method != "greedy":
        # The group restriction matters on these inputs: plain top-K differs on some tokens.
        _, idx_plain = np_route(logits.astype(np.float64), bias, dataclasses.replace(cfg, topk_method="greedy"))
        assert np.any(idx_plain != idx_ref)


# ---- dropless grouped-matmul experts vs the dense reference ---------------------------------------

def test_dropless_equals_dense_with_an_idle_expert():
    T, D, I, E, K = 24, 16, 8, 6, 2
    ks = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(ks[0], (T, D))
    w_gate = jax.random.normal(ks[1], (E, D, I)) * 0.3
    w_up = jax.random.normal(ks[2], (E, D, I)) * 0.3
    w_down = jax.random.normal(ks[3], (E, I, D)) * 0.3
    # K distinct experts per token, never expert 3.
    rng = np.random.default_rng(0)
    idx = np.array([rng.choice([0, 1, 2, 4, 5], K, replace=False) for _ in range(T)], np.int32)
    assert not np.any(idx == 3)
    idx = jnp.asarray(idx)
    w = jax.nn.softmax(jax.random.normal(ks[4], (T, K)), -1)
    ct = jax.random.normal(ks[5], (T, D))  # a random cotangent
    args = (x, w, idx, w_gate, w_up, w_down)
    y_drop = jax.jit(routed_experts_dropless)(*args)
    y_dense = jax.jit(routed_experts_dense)(*args)
    np.testing.assert_allclose(y_drop, y_dense, atol=1e-5, rtol=1e-5)
    assert float(jnp.abs(y_dense).max()) > 0.1

    def grads(fn):
        loss = lambda x, w, wg, wu, wd: jnp.sum(fn(x, w, idx, wg, wu, wd) * ct)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(x, w, w_gate, w_up, w_down)

    g_drop, g_dense = grads(routed_experts_dropless), grads(routed_experts_dense)
    for name, a, b in zip(("x", "w", "w_gate", "w_up", "w_down"), g_drop, g_dense):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=name)
    for g in g_drop[2:]:
        assert float(jnp.abs(g[3]).max()) == 0.0  # the idle expert gets no gradient
        assert float(jnp.abs(g[0]).max()) > 0.0


# ---- balance loss and loads -----------------------------------------------------------------------

def test_sequence_balance_loss_matches_numpy():
    cfg = v3_cfg(n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2)
    E, K, B, T = 8, 2, 3, 10
    rng = np.random.default_rng(0)
    scores = _sigmoid(rng.normal(size=(B, T, E)))
    idx = np.stack([[rng.choice(E, K, replace=False) for _ in range(T)] for _ in range(B)]).astype(np.int32)
    valid = np.ones((B, T), bool)
    valid[1, 6:] = False  # padding
    valid[2] = False  # an all-padding row does not enter the mean
    out = sequence_balance_loss(jnp.asarray(scores, jnp.float32), jnp.asarray(idx), jnp.asarray(valid), cfg)
    per_row = []
    for b in range(2):
        n = valid[b].sum()
        f = np.zeros(E)
        for t in range(T):
            if valid[b, t]:
                f[idx[b, t]] += 1
        f *= E / (K * n)
        p = (scores[b] / scores[b].sum(-1, keepdims=True))[valid[b]].sum(0) / n
        per_row.append((f * p).sum())
    np.testing.assert_allclose(out, np.mean(per_row), rtol=1e-5)
    # Uniform scores: P_i = 1/E and sum_i f_i = E, so the loss is exactly 1 whatever the routing.
    flat = sequence_balance_loss(jnp.full((B, T, E), 0.3), jnp.asarray(idx), jnp.asarray(valid), cfg)
    np.testing.assert_allclose(flat, 1.0, rtol=1e-6)


def test_expert_load_counts_valid_tokens_only():
    idx = jnp.asarray([[[0, 1], [1, 2], [3, 0]], [[2, 3], [2, 1], [0, 3]]], jnp.int32)  # [B=2, T=3, K=2]
    valid = jnp.asarray([[True, True, True], [True, False, False]])
    load = expert_load(idx, valid, 5)
    np.testing.assert_array_equal(load, [2, 2, 2, 2, 0])
    assert load.dtype == jnp.float32


@pytest.mark.parametrize("skew", [False, True])
def test_blocked_grouped_matmul_equals_dense_reference(skew, expert_problem):
    from deepjax.model import moe
    T, D, I, E, K = 60, 16, 8, 8, 3
    x, w, idx, ws = expert_problem(3, T, D, I, E, K)
    if skew:  # every token to experts 0..K-1: one expert's rows span many blocks, the others are empty
        idx = jnp.asarray(np.tile(np.arange(K), (T, 1)), jnp.int32)
    ref = moe.routed_experts_dense(x, w, idx, *ws)
    for block in (4, 16, 128):
        np.testing.assert_allclose(moe.routed_experts_blocked(x, w, idx, *ws, block=block), ref, rtol=1e-5,
                                   atol=1e-4)


def _eqns(jaxpr):
    """Every equation of a jaxpr, nested ones (jit, loops, conditionals, custom derivatives) included."""
    from jax.extend import core as jcore

    for eqn in jaxpr.eqns:
        yield eqn
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                if isinstance(sub, jcore.ClosedJaxpr):
                    yield from _eqns(sub.jaxpr)
                elif isinstance(sub, jcore.Jaxpr):
                    yield from _eqns(sub)


@pytest.mark.parametrize("path", ["dropless", "blocked"])
def test_expert_gradients_scatter_without_collisions(path):
    """The dispatch x[order // K], the unsort and the blocked path's padding are permutations: gathers marked
    unique (`moe.sorted_tokens`, `moe.unsort_sum`), so every scatter-add of activations in the gradient has
    unique indices (no atomics; scatter-adds with collisions were 10% of the H100 training step, docs/LOG.md
    session 15). Gradients equal the dense reference, per example under vmap too (the blocked path)."""
    from deepjax.model import moe
    rng = np.random.default_rng(5)
    T, D, I, E, K = 40, 16, 8, 8, 3
    x = jnp.asarray(rng.normal(size=(T, D)), jnp.float32)
    w = jnp.asarray(rng.random((T, K)), jnp.float32)
    idx = jnp.asarray(np.stack([rng.choice(E, K, replace=False) for _ in range(T)]), jnp.int32)
    ws = [jnp.asarray(rng.normal(size=s) * 0.3, jnp.float32) for s in ((E, D, I), (E, D, I), (E, I, D))]
    ct = jnp.asarray(rng.normal(size=(T, D)), jnp.float32)
    fn = moe.routed_experts_dropless if path == "dropless" else functools.partial(moe.routed_experts_blocked,
                                                                                  block=8)

    def grads(f):
        return jax.grad(lambda x, w, *ws: jnp.sum(f(x, w, idx, *ws) * ct), argnums=(0, 1, 2, 3, 4))

    for name, a, b in zip(("x", "w", "w_gate", "w_up", "w_down"), grads(fn)(x, w, *ws),
                          grads(moe.routed_experts_dense)(x, w, *ws)):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4, err_msg=name)
    if path == "blocked":  # per-example gradients (vmap of grad) through the custom-VJP permutations; the dropless
        # path's lax.ragged_dot has no vmap rule in jax ("ragged_dot vmap over any dim but 0 - NYI")
        per = lambda f: jax.vmap(jax.grad(lambda x: jnp.sum(f(x, w, idx, *ws) ** 2)))  # noqa: E731
        xs = jnp.stack([x, 2 * x])
        np.testing.assert_allclose(per(fn)(xs), per(moe.routed_experts_dense)(xs), atol=1e-3, rtol=1e-4)

    def colliding(jaxpr):
        return [e for e in _eqns(jaxpr) if e.primitive.name == "scatter-add" and not e.params["unique_indices"]
                and e.invars[0].aval.ndim == 2 and e.invars[0].aval.shape[-1] == D]

    bad = colliding(jax.make_jaxpr(grads(fn))(x, w, *ws).jaxpr)
    assert not bad, [str(e)[:200] for e in bad]
    # the plain gather's gradient collides: the check above can fail
    assert colliding(jax.make_jaxpr(jax.grad(lambda x: jnp.sum(x[jnp.argsort(idx.reshape(-1)) // K] ** 2)))(x).jaxpr)


def test_permuted_rows_gradients_gather():
    """`moe.permute_rows` (a permutation gather whose gradient gathers by the inverse) has the plain gather's
    gradient bit for bit, and the dropless experts' gradient moves no activation rows by a scatter (it was two
    scatter kernels per MoE layer in the H100 profile, docs/LOG.md session 18); the plain gather's gradient does,
    so the check can fail."""
    from deepjax.model import moe
    rng = np.random.default_rng(7)
    X, D = 24, 6
    x = jnp.asarray(rng.normal(size=(X, D)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(X, D)), jnp.float32)
    perm = jnp.asarray(rng.permutation(X), jnp.int32)
    inv = moe.inverse_permutation(perm)
    loss = lambda f: lambda x: jnp.sum(f(x) * g)  # noqa: E731
    mine = jax.grad(loss(lambda x: moe.permute_rows(x, perm, inv)))
    plain = jax.grad(loss(lambda x: x.at[perm].get(unique_indices=True)))
    np.testing.assert_array_equal(mine(x), plain(x))
    np.testing.assert_array_equal(moe.permute_rows(x, perm, inv), x[perm])

    def row_scatters(jaxpr):
        return [e for e in _eqns(jaxpr) if e.primitive.name.startswith("scatter") and e.invars[0].aval.ndim == 2]

    assert not row_scatters(jax.make_jaxpr(mine)(x).jaxpr)
    assert row_scatters(jax.make_jaxpr(plain)(x).jaxpr)
    T, I, E, K = 10, 8, 4, 2
    xt = jnp.asarray(rng.normal(size=(T, D)), jnp.float32)
    w = jnp.asarray(rng.random((T, K)), jnp.float32)
    idx = jnp.asarray(np.stack([rng.choice(E, K, replace=False) for _ in range(T)]), jnp.int32)
    ws = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((E, D, I), (E, D, I), (E, I, D))]
    grad = jax.grad(lambda x, w, *ws: jnp.sum(moe.routed_experts_dropless(x, w, idx, *ws)), argnums=(0, 1, 2, 3, 4))
    assert not row_scatters(jax.make_jaxpr(grad)(xt, w, *ws).jaxpr)


def _dots(jaxpr):
    """Every dot_general equation of a jaxpr, nested ones (jit, loops, conditionals) included."""
    return (eqn for eqn in _eqns(jaxpr) if eqn.primitive.name == "dot_general")


def test_router_logits_ask_for_full_float32_precision():
    """Every path's router product (the training module, the module decode step, the fused decode step's XLA
    branch) carries precision HIGHEST: at XLA:GPU's default a float32 matmul runs in TF32 on A100/H100 and flips
    near-tied routing choices against HF's float32 router. CPU numerics do not show it, so the jaxprs are read.
    (On a GPU, bf16 activations take `moe.router_logits_split` instead: the test below.)"""
    from flax import nnx

    from deepjax.infer.fast import fused as DF
    from deepjax import model as M
    from deepjax.infer import sampling as SP

    cfg = presets.tiny()
    D, E = cfg.hidden_size, cfg.n_routed_experts
    graphdef, params = M.init(cfg, jax.random.key(0))
    blk = SP.unstack_layers(nnx.merge(graphdef, params))["moe_layers"][0]
    x = jnp.ones((2, 3, D), jnp.float32)
    fused = DF.fuse_block(blk, jnp.float32, 6)

    def router_dots(fn):
        return [e for e in _dots(jax.make_jaxpr(fn)(x).jaxpr)
                if any(tuple(v.aval.shape) in ((D, E), (E, D)) for v in e.invars)]

    paths = {
        "module": lambda x: blk.ffn(x, jnp.ones(x.shape[:2], bool)),
        "module decode": lambda x: blk.ffn(x[:, :1], jnp.ones((2, 1), bool), SP.decode_experts_fn(cfg, 2))[0],
        "fused decode": lambda x: DF._ffn_step(fused, x, None, fused["kernels"], False),
    }
    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    for name, fn in paths.items():
        dots = router_dots(fn)
        assert len(dots) == 1 and dots[0].params["precision"] == highest, (name, [e.params for e in dots])
    # the check can fail: a plain product carries no precision
    assert router_dots(lambda x: x @ blk.ffn.gate[...])[0].params["precision"] != highest


def test_joined_gate_up_equals_two_grouped_matmuls():
    """`moe.grouped_swiglu` joins gate and up into one [E, D, 2I] grouped matmul from ops.LARGE_GROUP_ROWS rows per
    expert (training, prefill) and keeps two below (decode): both forms give the same rows and gradients."""
    from deepjax.model import moe, ops
    E, D, I = 2, 16, 8
    X = ops.LARGE_GROUP_ROWS * E  # the joined form
    k = jax.random.split(jax.random.key(3), 4)
    xs = jax.random.normal(k[0], (X, D))
    wg, wu = jax.random.normal(k[1], (E, D, I)) / 4, jax.random.normal(k[2], (E, D, I)) / 4
    wd = jax.random.normal(k[3], (E, I, D)) / 3
    sizes = jnp.array([X // 3, X - X // 3], jnp.int32)
    calls = []

    def gmm(x, w):
        calls.append(w.shape)
        return jax.lax.ragged_dot(x, w, sizes)

    def two(xs, wg, wu, wd):
        g = lambda x, w: jax.lax.ragged_dot(x, w, sizes)  # noqa: E731
        return g(jax.nn.silu(g(xs, wg)) * g(xs, wu), wd)

    loss = lambda f: lambda *a: jnp.sum(f(*a) ** 2)  # noqa: E731
    joined = jax.value_and_grad(loss(lambda *a: moe.grouped_swiglu(*a, gmm)), argnums=(0, 1, 2, 3))(xs, wg, wu, wd)
    assert (E, D, 2 * I) in calls  # the joined form ran
    ref = jax.value_and_grad(loss(two), argnums=(0, 1, 2, 3))(xs, wg, wu, wd)
    for a, b in zip(jax.tree.leaves(joined), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()))
    calls.clear()
    moe.grouped_swiglu(xs[: X // 4], wg, wu, wd, lambda x, w: calls.append(w.shape) or jax.lax.ragged_dot(
        x, w, jnp.array([X // 8, X // 8], jnp.int32)))
    assert calls == [(E, D, I), (E, D, I), (E, I, D)]  # decode-sized: two grouped matmuls, no joined copy


def test_ragged_dot_tile_only_for_large_groups_on_hopper(monkeypatch):
    """ops.SM90_RAGGED_DOT's tile (measured faster on the training step's expert shapes, slower on decode's small
    groups: docs/LOG.md session 16) is chosen on Hopper for groups of LARGE_GROUP_ROWS rows or more on average, and
    only where the widths divide its blocks; everything else keeps tokamax's own choice."""
    pytest.importorskip("tokamax")
    from deepjax.model import ops
    monkeypatch.setattr(ops, "_impl", lambda op: "mosaic_gpu")
    dev = type("Dev", (), {"compute_capability": "9.0"})()
    monkeypatch.setattr(ops.jax, "devices", lambda *a: [dev])
    (op,) = ops._ragged_dot_impl(8 * 2048 * 6, 1024, 1024, 64)  # training, bench preset: 1,536 rows per expert
    assert (op.config.block_m, op.config.block_k, op.config.num_stages) == (128, 128, 4)
    assert ops._ragged_dot_impl(512 * 6, 1024, 1024, 64) == "mosaic_gpu"  # a decode step of 512 rows
    assert ops._ragged_dot_impl(8 * 2048 * 6, 96, 1024, 64) == "mosaic_gpu"  # K not a multiple of block_k
    dev.compute_capability = "10.0"
    assert ops._ragged_dot_impl(8 * 2048 * 6, 1024, 1024, 64) == "mosaic_gpu"  # not Hopper
    monkeypatch.setattr(ops, "_impl", lambda op: "xla")
    assert ops._ragged_dot_impl(8 * 2048 * 6, 1024, 1024, 64) == "xla"


def _expert_products(jaxpr, D: int, I: int) -> int:
    """Expert matmuls in a jaxpr: dots / ragged dots against [*, D, I], [*, D, 2I] (gate and up joined) or
    [*, I, D] weights."""
    return sum(1 for e in _eqns(jaxpr) if e.primitive.name in ("dot_general", "ragged_dot", "ragged_dot_general")
               and any(v.aval.ndim == 3 and v.aval.shape[-2:] in ((D, I), (D, 2 * I), (I, D)) for v in e.invars))


@pytest.mark.parametrize("path", ["dropless", "dropless_joined", "blocked"])
def test_save_experts_remat_recomputes_no_expert_matmul(monkeypatch, path, expert_problem):
    """`model.remat=save_experts` keeps the experts' rows and products (their checkpoint names in moe.py): the
    backward recomputes none of the expert matmuls that `full` recomputes, and the gradients are the same."""
    from deepjax.model import moe, ops
    from deepjax.model.transformer import remat_policy
    if path == "dropless_joined":  # gate and up as one grouped matmul, as at training shapes
        monkeypatch.setattr(ops, "LARGE_GROUP_ROWS", 0)
    T, D, I, E, K = 40, 16, 8, 8, 2
    x, w, idx, ws = expert_problem(5, T, D, I, E, K)
    fn = moe.routed_experts_blocked if path == "blocked" else moe.routed_experts_dropless

    def grads(policy):
        f = lambda x, *ws: jnp.sin(fn(x, w, idx, *ws)).sum()  # noqa: E731
        return jax.grad(f if policy == "none" else jax.checkpoint(f, policy=remat_policy(policy)),
                        argnums=(0, 1, 2, 3))

    n = {p: _expert_products(jax.make_jaxpr(grads(p))(x, *ws).jaxpr, D, I) for p in ("none", "full", "save_experts")}
    assert n["none"] >= 3 and n["full"] >= n["none"] + 2 and n["save_experts"] == n["none"], n
    for a, b in zip(grads("save_experts")(x, *ws), grads("full")(x, *ws)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_router_split_equals_the_float32_product():
    """`moe.router_logits_split` (the GPU's router: bf16 x times the float32 gate in three bf16 parts, on tensor
    cores) gives the float32 product's logits and gradients, jitted: logits to float32 summation order (HIGHEST
    measures ~7e-8 of sum |terms| here, the gate in two parts ~1e-6), the gate's gradient likewise, x's within its
    bf16 rounding. The parts sum to the gate exactly. A single bf16 part (the gate rounded to bf16) misses."""
    from deepjax.model import moe
    rng = np.random.default_rng(0)
    D, E = 256, 16
    x = jnp.asarray(rng.normal(size=(3, 40, D)), jnp.bfloat16)
    gate = jnp.asarray(rng.normal(size=(D, E)) * 0.05, jnp.float32)
    ct = jnp.asarray(rng.normal(size=(3, 40, E)), jnp.float32)
    parts = jax.jit(lambda g: moe.bf16_parts(g, 3))(gate)
    assert all(p.dtype == jnp.bfloat16 for p in parts) and bool(jnp.any(parts[2] != 0))
    np.testing.assert_array_equal(sum(np.asarray(p, np.float64) for p in parts), np.asarray(gate, np.float64))
    x64, g64, c64 = (np.asarray(a, np.float64) for a in (x.astype(jnp.float32), gate, ct))
    want = x64 @ g64
    scale = np.abs(x64) @ np.abs(g64)  # the sum of |terms|: float32 summation error is a few ulps of it
    err = lambda got: np.max(np.abs(np.asarray(got, np.float64) - want) / scale)  # noqa: E731
    split = jax.jit(lambda x, g: moe.router_logits(x, g, split=True))
    assert err(split(x, gate)) < 4e-7
    assert err(jax.jit(lambda x, g: moe.router_logits(x, g, split=False))(x, gate)) < 4e-7
    two = jnp.concatenate(moe.bf16_parts(gate, 2) + [jnp.zeros((D, E), jnp.bfloat16)], -1)
    assert err(moe.router_logits_from_parts(x, two)) > 4e-7  # two parts: the bound can fail
    assert err(jnp.einsum("...d,de->...e", x, gate.astype(jnp.bfloat16), preferred_element_type=jnp.float32)) > 1e-4

    dx, dg = jax.jit(lambda x, g, c: jax.vjp(split, x, g)[1](c))(x, gate, ct)
    assert dx.dtype == jnp.bfloat16 and dg.dtype == jnp.float32
    dg_want = np.einsum("btd,bte->de", x64, c64)
    dg_scale = np.einsum("btd,bte->de", np.abs(x64), np.abs(c64))
    assert np.max(np.abs(np.asarray(dg, np.float64) - dg_want) / dg_scale) < 4e-7
    dx_want = c64 @ g64.T
    # bf16 rounding of the exact gradient (half a bf16 ulp: 2^-9 relative) plus the dropped parts' 3 * 2^-16
    assert np.max(np.abs(np.asarray(dx.astype(jnp.float32), np.float64) - dx_want)
                  / (np.abs(dx_want) * 2.0**-8 + np.abs(c64) @ np.abs(g64.T) * 2.0**-14)) <= 1.0


def test_router_logits_take_the_split_on_gpu(monkeypatch):
    """router_logits' default: the split form for bf16 activations when the trace compiles for a GPU, the HIGHEST
    product otherwise (float32 activations anywhere, bf16 on CPU)."""
    from deepjax.model import moe, ops
    D, E = 32, 8
    gate = jnp.ones((D, E), jnp.float32)

    def precisions(x):
        fresh = lambda x, g: moe.router_logits(x, g)  # noqa: E731  (a new function: no cached trace)
        return [e.params["precision"] for e in _dots(jax.make_jaxpr(fresh)(x, gate).jaxpr)]

    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    xb, xf = jnp.ones((4, D), jnp.bfloat16), jnp.ones((4, D), jnp.float32)
    assert precisions(xb) == [highest] and precisions(xf) == [highest]
    monkeypatch.setattr(ops, "platform", lambda: "gpu")
    assert precisions(xf) == [highest]
    split = precisions(xb)
    assert len(split) == 1 and split[0] != highest  # one bf16 product against the parts side by side


def test_fused_decode_takes_the_router_parts_built_once(monkeypatch):
    """On a GPU (platform patched) with bf16 weights the fused decode block carries the router's bf16 parts
    (`moe.router_parts`, built with the block, once per generate call) and its step multiplies them without
    cutting the gate again (no bitcast in the step's jaxpr): the same logits as `router_logits`' split form."""
    from deepjax.infer import sampling as SP
    from deepjax.infer.fast import fused as DF
    from deepjax.model import moe, ops
    from deepjax import model as M
    from flax import nnx

    monkeypatch.setattr(ops, "platform", lambda: "gpu")
    cfg = presets.tiny()
    graphdef, params = M.init(cfg, jax.random.key(0))
    blk = SP.unstack_layers(nnx.merge(graphdef, params))["moe_layers"][0]
    fused = DF.fuse_block(blk, jnp.bfloat16, 6)
    want = moe.router_parts(blk.ffn.gate[...])
    np.testing.assert_array_equal(np.asarray(fused["ffn"]["router_parts"]), np.asarray(want))
    x = jax.random.normal(jax.random.key(1), (2, 3, cfg.hidden_size)).astype(jnp.bfloat16)
    step = lambda f: lambda x: DF._ffn_step(f, x, None, f["kernels"], False)[0]  # noqa: E731
    prims = {e.primitive.name for e in _eqns(jax.make_jaxpr(step(fused))(x).jaxpr)}
    assert "bitcast_convert_type" not in prims and "dot_general" in prims
    rebuilt = dict(fused, ffn={k: v for k, v in fused["ffn"].items() if k != "router_parts"})
    prims = {e.primitive.name for e in _eqns(jax.make_jaxpr(step(rebuilt))(x).jaxpr)}
    assert "bitcast_convert_type" in prims  # without the parts the step cuts the gate itself (the check can fail)
    np.testing.assert_array_equal(np.asarray(step(fused)(x), np.float32), np.asarray(step(rebuilt)(x), np.float32))

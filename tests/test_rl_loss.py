"""GRPO loss: every aggregation / advantage variant against plain NumPy loops, gradient zero exactly on clipped
tokens, the mu = 1 zero-value / non-zero-gradient case, k3 properties, finiteness for huge log-ratios, masking,
config errors."""

from __future__ import annotations

import ast
import dataclasses
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepjax.rl import loss
from deepjax.rl.loss import GRPOConfig, group_advantages, grpo_loss, k3_kl

B, T, G = 6, 7, 3
LENGTHS = (7, 3, 5, 1, 6, 4)  # completion tokens per row; the rest of each row is padding


def _mask():
    m = np.zeros((B, T), np.float32)
    for i, n in enumerate(LENGTHS):
        m[i, :n] = 1.0
    return m


def _inputs(seed=0, spread=0.4):
    rng = np.random.default_rng(seed)
    old = rng.uniform(-3.0, -0.1, (B, T)).astype(np.float32)
    logp = (old + rng.uniform(-spread, spread, (B, T))).astype(np.float32)
    ref = (old + rng.uniform(-spread, spread, (B, T))).astype(np.float32)
    rewards = rng.integers(0, 2, B).astype(np.float32) + rng.uniform(0, 0.5, B).astype(np.float32)
    return logp, old, ref, rewards, _mask()


# ---------------------------------------------------------------- independent NumPy references (float64, loops)

def np_advantages(rewards, g, mode, eps=1e-6):
    r = [float(x) for x in np.asarray(rewards).reshape(-1)]
    out = []
    for start in range(0, len(r), g):
        grp = r[start:start + g]
        mean = sum(grp) / g
        std = math.sqrt(sum((x - mean) ** 2 for x in grp) / g)
        for x in grp:
            out.append((x - mean) / (std + eps) if mode == "std" else x - mean)
    return np.array(out)


def np_loss(logp, old, ref, adv, mask, eps_low, eps_high, beta, aggregation, max_len=None, lim=20.0):
    rows, cols = mask.shape
    per_token = {}
    for i in range(rows):
        for t in range(cols):
            if mask[i, t] == 0:
                continue
            lr = min(max(float(logp[i, t]) - float(old[i, t]), -lim), lim)
            rho = math.exp(lr)
            clipped = min(max(rho, 1 - eps_low), 1 + eps_high)
            obj = min(rho * adv[i], clipped * adv[i])
            if beta > 0:
                d = min(max(float(ref[i, t]) - float(logp[i, t]), -lim), lim)
                obj -= beta * (math.exp(d) - d - 1)
            per_token[i, t] = obj
    if aggregation == "grpo":
        outputs = []
        for i in range(rows):
            toks = [v for (r, _), v in per_token.items() if r == i]
            if toks:
                outputs.append(sum(toks) / len(toks))
        return -sum(outputs) / len(outputs)
    if aggregation == "dapo":
        return -sum(per_token.values()) / len(per_token)
    return -sum(per_token.values()) / (rows * (max_len or cols))


# ---------------------------------------------------------------- advantages

@pytest.mark.parametrize("mode", ["std", "mean"])
def test_group_advantages_match_numpy(mode):
    rewards = np.array([1.0, 0.0, 0.0, 2.0, 2.0, 2.0, 0.5, -1.0, 3.0, 0.0, 1.0, 1.0], np.float32)
    want = np_advantages(rewards, 3, mode)
    np.testing.assert_allclose(group_advantages(rewards, 3, mode), want, rtol=1e-5, atol=1e-6)
    # [P, G] input gives the same [N] output
    np.testing.assert_allclose(group_advantages(rewards.reshape(4, 3), 3, mode), want, rtol=1e-5, atol=1e-6)
    a = np.asarray(group_advantages(rewards, 3, mode)).reshape(4, 3)
    np.testing.assert_allclose(a.sum(1), 0.0, atol=1e-6)  # each group sums to zero
    np.testing.assert_array_equal(a[1], 0.0)  # all-equal rewards: no signal, no 0/0


def test_group_advantages_hand_values():
    # group [1, 0, 0, 1]: mean 0.5, population std 0.5 -> +-1 ; "mean" -> +-0.5
    np.testing.assert_allclose(group_advantages([1, 0, 0, 1], 4, "std"), [1, -1, -1, 1], rtol=1e-5)
    np.testing.assert_allclose(group_advantages([1, 0, 0, 1], 4, "mean"), [0.5, -0.5, -0.5, 0.5])


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="group"):
        group_advantages(np.zeros(5), 3)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(np.zeros((2, 4)), 3)
    with pytest.raises(ValueError, match="mode"):
        group_advantages(np.zeros(6), 3, "median")


# ---------------------------------------------------------------- the loss against NumPy

VARIANTS = [
    # aggregation, advantage_norm, eps_low, eps_high, beta, max_completion_length
    ("grpo", "std", 0.2, None, 0.04, None),
    ("grpo", "std", 0.2, 0.28, 0.0, None),
    ("dapo", "std", 0.2, 0.28, 0.0, None),
    ("dapo", "mean", 0.1, 0.3, 0.001, None),
    ("dr_grpo", "mean", 0.2, 0.2, 0.0, None),
    ("dr_grpo", "mean", 0.2, 0.28, 0.01, 12),
]


@pytest.mark.parametrize("aggregation,norm,eps_low,eps_high,beta,max_len", VARIANTS)
def test_loss_matches_numpy(aggregation, norm, eps_low, eps_high, beta, max_len):
    logp, old, ref, rewards, mask = _inputs(seed=1)
    cfg = GRPOConfig(eps_low=eps_low, eps_high=eps_high, beta=beta, aggregation=aggregation, advantage_norm=norm,
                     group_size=G, max_completion_length=max_len)
    adv = group_advantages(rewards, G, cfg.advantage_norm)
    np.testing.assert_allclose(adv, np_advantages(rewards, G, norm), rtol=1e-5, atol=1e-6)
    loss, metrics = grpo_loss(logp, old, ref if beta > 0 else None, adv, mask, cfg)
    want = np_loss(logp, old, ref, np_advantages(rewards, G, norm), mask, eps_low, eps_high or eps_low, beta,
                   aggregation, max_len)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=2e-7)  # float32 sums vs a float64 reference
    assert float(metrics["n_tokens"]) == sum(LENGTHS)
    # jit (cfg closed over) gives the same value
    jloss, _ = jax.jit(lambda *a: grpo_loss(*a, cfg=cfg))(logp, old, ref, adv, mask)
    np.testing.assert_allclose(float(jloss), float(loss), rtol=1e-6, atol=1e-7)


def test_metrics_match_numpy():
    logp, old, ref, rewards, mask = _inputs(seed=2, spread=0.5)
    cfg = GRPOConfig(eps_low=0.2, eps_high=0.28, beta=0.01, group_size=G)
    adv = np.asarray(group_advantages(rewards, G))
    _, met = grpo_loss(logp, old, ref, adv, mask, cfg)
    ratios, clips, kls, negl = [], [], [], []
    for i in range(B):
        for t in range(LENGTHS[i]):
            rho = math.exp(float(logp[i, t]) - float(old[i, t]))
            ratios.append(rho)
            clips.append((adv[i] > 0 and rho > 1.28) or (adv[i] < 0 and rho < 0.8))
            d = float(ref[i, t]) - float(logp[i, t])
            kls.append(math.exp(d) - d - 1)
            negl.append(-float(logp[i, t]))
    assert 0 < sum(clips) < len(clips)
    np.testing.assert_allclose(float(met["clip_frac"]), np.mean(clips), rtol=1e-6)
    np.testing.assert_allclose(float(met["clip_frac_low"] + met["clip_frac_high"]), np.mean(clips), rtol=1e-6)
    np.testing.assert_allclose(float(met["ratio_mean"]), np.mean(ratios), rtol=1e-5)
    np.testing.assert_allclose(float(met["ratio_max"]), np.max(ratios), rtol=1e-5)
    np.testing.assert_allclose(float(met["kl"]), np.mean(kls), rtol=1e-4)
    np.testing.assert_allclose(float(met["entropy_proxy"]), np.mean(negl), rtol=1e-5)


# ---------------------------------------------------------------- gradients

@pytest.mark.parametrize("aggregation", ["grpo", "dapo", "dr_grpo"])
def test_grad_zero_exactly_where_clipped(aggregation):
    # rows: A > 0 and A < 0; tokens: ratios on both sides of both clip edges (eps_low 0.2, eps_high 0.28).
    # 1.25 is inside [0.8, 1.28] with clip-higher but would be clipped by a symmetric 0.2.
    ratios = np.array([1.5, 1.25, 1.1, 1.0, 0.9, 0.7, 0.3], np.float32)
    adv = np.array([1.3, -0.7], np.float32)
    old = np.full((2, 7), -1.0, np.float32)
    logp = old + np.log(ratios)[None, :]
    mask = np.ones((2, 7), np.float32)
    cfg = GRPOConfig(eps_low=0.2, eps_high=0.28, beta=0.0, aggregation=aggregation, group_size=2)
    grad = np.asarray(jax.grad(lambda lp: grpo_loss(lp, old, None, adv, mask, cfg)[0])(jnp.asarray(logp)))
    clipped = np.zeros((2, 7), bool)
    clipped[0] = ratios > 1.28  # A > 0: only the upper clip is active
    clipped[1] = ratios < 0.8   # A < 0: only the lower clip is active
    assert clipped.sum() == 3
    assert np.all(grad[clipped] == 0.0)
    assert np.all(grad[~clipped] != 0.0)
    # unclipped tokens: d(-rho A)/d logp = -rho A / (aggregation's denominator)
    denom = {"grpo": 7 * 2, "dapo": 14, "dr_grpo": 2 * 7}[aggregation]
    want = -(ratios[None, :] * adv[:, None]) / denom
    np.testing.assert_allclose(grad[~clipped], want[~clipped], rtol=1e-5)
    _, met = grpo_loss(logp, old, None, adv, mask, cfg)
    np.testing.assert_allclose(float(met["clip_frac"]), 3 / 14, rtol=1e-6)
    np.testing.assert_allclose(float(met["clip_frac_high"]), 1 / 14, rtol=1e-6)
    np.testing.assert_allclose(float(met["clip_frac_low"]), 2 / 14, rtol=1e-6)


@pytest.mark.parametrize("norm", ["std", "mean"])
def test_mu1_loss_zero_but_grad_not(norm):
    """logp == old_logp (mu = 1, first update), beta = 0, per-output mean: value 0, gradient the policy gradient."""
    logp, _, _, rewards, mask = _inputs(seed=3)
    cfg = GRPOConfig(beta=0.0, aggregation="grpo", advantage_norm=norm, group_size=G)
    adv = group_advantages(rewards, G, norm)
    assert np.abs(np.asarray(adv)).max() > 0.1
    loss_fn = lambda lp: grpo_loss(lp, logp, None, adv, mask, cfg)[0]  # noqa: E731
    assert abs(float(loss_fn(jnp.asarray(logp)))) < 1e-7
    grad = np.asarray(jax.grad(loss_fn)(jnp.asarray(logp)))
    assert np.any(grad != 0.0)
    # exactly -A_i / (|o_i| * number of outputs) on each completion token, 0 on padding
    want = np.zeros((B, T))
    for i in range(B):
        want[i, :LENGTHS[i]] = -float(adv[i]) / (LENGTHS[i] * B)
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-8)
    # the token-level aggregations do not give a zero value with unequal lengths
    dapo = dataclasses.replace(cfg, aggregation="dapo")
    assert abs(float(grpo_loss(logp, logp, None, adv, mask, dapo)[0])) > 1e-3


# ---------------------------------------------------------------- KL, reference, finiteness, masking

def test_k3_nonnegative_and_zero_at_reference():
    x = np.linspace(-30, 5, 301, dtype=np.float32)
    lp, ref = np.meshgrid(x, x)
    kl = np.asarray(k3_kl(jnp.asarray(lp), jnp.asarray(ref)))
    assert np.all(np.isfinite(kl)) and np.all(kl >= 0.0)
    # near d = 0, where exp(d) - d - 1 cancels to negative rounding error in float32 (~4,000 of these 200,001)
    d = np.linspace(-1e-3, 1e-3, 200_001, dtype=np.float32)
    near = np.asarray(k3_kl(jnp.zeros_like(d), jnp.asarray(d)))
    assert (near >= 0).all() and ((np.exp(d) - d - 1) < 0).sum() > 1000
    np.testing.assert_allclose(near, np.expm1(d.astype(np.float64)) - d, atol=5e-10)  # a few float32 ulps of |d| <= 1e-3
    np.testing.assert_array_equal(np.asarray(k3_kl(jnp.asarray(x), jnp.asarray(x))), 0.0)
    # hand value: d = ref - logp = 1 -> e - 2
    np.testing.assert_allclose(float(k3_kl(jnp.float32(-2.0), jnp.float32(-1.0))), math.e - 2, rtol=1e-6)
    # in the loss: ref == logp makes the KL term vanish exactly
    logp, old, _, rewards, mask = _inputs(seed=4)
    adv = group_advantages(rewards, G)
    with_kl, met = grpo_loss(logp, old, logp, adv, mask, GRPOConfig(beta=0.5, group_size=G))
    no_kl, _ = grpo_loss(logp, old, None, adv, mask, GRPOConfig(beta=0.0, group_size=G))
    assert float(met["kl"]) == 0.0
    assert float(with_kl) == float(no_kl)


def test_beta_zero_accepts_no_reference_and_beta_positive_needs_one():
    logp, old, ref, rewards, mask = _inputs(seed=5)
    adv = group_advantages(rewards, G)
    loss, met = grpo_loss(logp, old, None, adv, mask, GRPOConfig(beta=0.0, group_size=G))
    assert np.isfinite(float(loss)) and "kl" not in met
    # beta = 0 with a reference: the loss ignores it, the metric reports it
    loss2, met2 = grpo_loss(logp, old, ref, adv, mask, GRPOConfig(beta=0.0, group_size=G))
    assert float(loss2) == float(loss) and float(met2["kl"]) > 0
    with pytest.raises(ValueError, match="beta"):
        grpo_loss(logp, old, None, adv, mask, GRPOConfig(beta=0.001, group_size=G))


@pytest.mark.parametrize("aggregation", ["grpo", "dapo", "dr_grpo"])
def test_huge_log_ratios_stay_finite(aggregation):
    logp, old, _, rewards, mask = _inputs(seed=6)
    signs = np.where(np.arange(B * T).reshape(B, T) % 2 == 0, 1.0, -1.0).astype(np.float32)
    old_far = (logp - 1e4 * signs).astype(np.float32)   # log-ratio +-1e4
    ref_far = (logp + 1e4 * signs[::-1]).astype(np.float32)
    adv = group_advantages(rewards, G)
    cfg = GRPOConfig(beta=0.04, aggregation=aggregation, group_size=G)
    (loss, met), grad = jax.value_and_grad(lambda lp: grpo_loss(lp, old_far, ref_far, adv, mask, cfg), has_aux=True)(
        jnp.asarray(logp))
    assert np.isfinite(float(loss))
    assert np.all(np.isfinite(np.asarray(grad)))
    assert all(np.isfinite(float(v)) for v in met.values())


def test_masked_tokens_contribute_nothing():
    logp, old, ref, rewards, mask = _inputs(seed=7)
    adv = group_advantages(rewards, G)
    pad = mask == 0
    junk = np.random.default_rng(8).normal(0, 50, (B, T)).astype(np.float32)
    junk[0, -1] = np.inf  # row 0 has no padding: use row 1 for inf / nan
    junk[1, -1], junk[1, -2] = np.inf, np.nan
    logp2, old2, ref2 = (np.where(pad, junk * s, x).astype(np.float32) for x, s in ((logp, 1), (old, -1), (ref, 2)))
    for aggregation in ("grpo", "dapo", "dr_grpo"):
        cfg = GRPOConfig(beta=0.04, eps_high=0.28, aggregation=aggregation, group_size=G)
        f = lambda lp, o, r: grpo_loss(lp, o, r, adv, mask, cfg)  # noqa: E731
        (l1, m1), g1 = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp), old, ref)
        (l2, m2), g2 = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp2), old2, ref2)
        assert float(l1) == float(l2)
        assert set(m1) == set(m2) and all(float(m1[k]) == float(m2[k]) for k in m1)
        np.testing.assert_array_equal(np.asarray(g1), np.asarray(g2))
        assert np.all(np.asarray(g2)[pad] == 0.0)
    # a fully padded row is not an output: the per-output mean ignores it
    mask3 = mask.copy()
    mask3[3] = 0.0
    cfg = GRPOConfig(beta=0.0, group_size=G)
    got = float(grpo_loss(logp, old, None, adv, mask3, cfg)[0])
    want = np_loss(logp, old, None, np.asarray(adv), mask3, 0.2, 0.2, 0.0, "grpo")
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_shape_errors():
    logp, old, ref, rewards, mask = _inputs()
    adv = group_advantages(rewards, G)
    cfg = GRPOConfig(group_size=G)
    with pytest.raises(ValueError, match="old_logp"):
        grpo_loss(logp, old[:, :3], ref, adv, mask, cfg)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, old, ref[:2], adv, mask, cfg)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(logp, old, ref, adv[:2], mask, cfg)


def test_dr_grpo_constant_is_the_completion_budget_not_the_array_length():
    """The loop's rows are prompt + completion (the prompt masked out): T may exceed max_completion_length, and the
    token sum is divided by B x max_completion_length, not by B x T."""
    logp, old, ref, rewards, mask = _inputs(seed=5)
    adv = np.asarray(group_advantages(rewards, G))
    L = T - 2
    got = float(grpo_loss(logp, old, None, adv, mask, GRPOConfig(aggregation="dr_grpo", advantage_norm="mean",
                                                                   beta=0.0, max_completion_length=L))[0])
    want = np_loss(logp, old, None, adv, mask, 0.2, 0.2, 0.0, "dr_grpo", max_len=L)
    np.testing.assert_allclose(got, want, rtol=1e-5)


# ---------------------------------------------------------------- config

def test_config_defaults():
    c = GRPOConfig()
    assert (c.eps_low, c.eps_high, c.beta, c.kl_estimator, c.aggregation, c.advantage_norm, c.mu) == (
        0.2, 0.2, 0.001, "k3", "grpo", "std", 1)
    assert GRPOConfig(eps_low=0.1).eps_high == 0.1
    assert GRPOConfig(eps_high=0.28).eps_high == 0.28
    assert dataclasses.replace(c, eps_low=0.3).eps_high == 0.2  # eps_high already resolved: kept
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.beta = 0.1  # type: ignore[misc]
    hash(c)  # usable as a jit static argument


@pytest.mark.parametrize("field,value", [
    ("eps_low", 0.0), ("eps_low", 1.0), ("eps_low", -0.1), ("eps_low", float("nan")), ("eps_low", "0.2"),
    ("eps_high", 0.0), ("eps_high", -0.28), ("eps_high", float("inf")),
    ("beta", -0.001), ("beta", float("nan")), ("beta", None),
    ("kl_estimator", "k1"), ("aggregation", "sum"), ("aggregation", "GRPO"), ("advantage_norm", "none"),
    ("group_size", 1), ("group_size", 0), ("group_size", 4.0), ("group_size", True),
    ("mu", 0), ("mu", 1.5),
    ("max_log_ratio", 0.0), ("max_log_ratio", 100.0), ("max_log_ratio", float("inf")),
    ("max_completion_length", 0), ("max_completion_length", 2.5),
])
def test_bad_config_raises_naming_field(field, value):
    with pytest.raises(ValueError, match=field):
        GRPOConfig(**{field: value})


def test_module_imports_only_jax_and_stdlib():
    tree = ast.parse(pathlib.Path(loss.__file__).read_text())
    allowed = {"__future__", "jax", "jax.numpy", "optax", "dataclasses", "typing"}
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module)
    assert names <= allowed, names - allowed

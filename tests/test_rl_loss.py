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


@pytest.mark.parametrize("mode", ["std", "mean"])
def test_group_advantages_on_host_and_device_agree(mode):
    # the GRPO loop's rewards are numpy: its advantages stay on the host (no device op); a jax array in stays jax
    # (jittable), and both give the same values
    rewards = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    host = group_advantages(rewards, 4, mode)
    device = jax.jit(group_advantages, static_argnums=(1, 2))(jnp.asarray(rewards), 4, mode)
    assert isinstance(host, np.ndarray) and host.dtype == np.float32 and isinstance(device, jax.Array)
    np.testing.assert_allclose(host, np.asarray(device), rtol=1e-5, atol=1e-6)
    # a list of traced scalars stays on the jnp path
    listed = jax.jit(lambda r: group_advantages([r[i] for i in range(4)], 4, mode))(jnp.asarray(rewards[0]))
    np.testing.assert_allclose(np.asarray(listed), host[:4], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("as_jax", [False, True])
def test_group_advantages_all_equal_group_is_exactly_zero(as_jax):
    # float32's mean of [0.1] * 3 is not 0.1: without the guard, / (std + eps) turned the rounding into -0.0074
    rewards = np.array([0.1, 0.1, 0.1, 1.0, 0.0, 0.5], np.float32)
    a = np.asarray(group_advantages(jnp.asarray(rewards) if as_jax else rewards, 3, "std"))
    np.testing.assert_array_equal(a[:3], 0.0)
    assert np.abs(a[3:]).max() > 0.5


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
    assert (c.eps_low, c.clip_high, c.beta, c.kl_estimator, c.aggregation, c.advantage_norm, c.mu) == (
        0.2, 0.2, 0.001, "k3", "grpo", "std", 1)
    assert c.eps_high is None and GRPOConfig(eps_low=0.1).clip_high == 0.1
    assert GRPOConfig(eps_high=0.28).clip_high == 0.28
    assert dataclasses.replace(c, eps_low=0.3).clip_high == 0.3  # None follows eps_low (rl.loss.eps_low overrides)
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


def test_module_imports_only_jax_numpy_and_stdlib():
    tree = ast.parse(pathlib.Path(loss.__file__).read_text())
    allowed = {"__future__", "jax", "jax.numpy", "numpy", "optax", "dataclasses", "typing"}
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module)
    assert names <= allowed, names - allowed


# ---------------------------------------------------------------- GSPO, CISPO, k3_is, sampler corrections (TIS / MIS)

def np_ext(logp, old, ref, adv, mask, *, sampler=None, ratio="token", eps=(0.2, 0.2), gspo=(3e-4, 4e-4),
           cispo=(1.0, 3.0), beta=0.0, kl="k3", aggregation="grpo", max_len=None, tis_cap=None, mis_low=None,
           mis_high=None, mis_level="token", lim=20.0):
    """(loss, d loss / d logp, counts) in float64 loops, each variant's value and its gradient derived by hand (with
    the variant's stop-gradients: GSPO-token's d s_it / d logp_it = s_i, CISPO's constant weight)."""
    rows, cols = mask.shape
    clamp = lambda x: min(max(x, -lim), lim)  # noqa: E731
    toks = [[t for t in range(cols) if mask[i, t]] for i in range(rows)]
    keep, w_tis = {}, {}
    counts = {"clipped": 0, "dropped": 0, "truncated": 0, "tokens": sum(map(len, toks))}
    for i in range(rows):
        if sampler is not None and toks[i]:
            seq_w = math.exp(clamp(sum(float(old[i, t]) - float(sampler[i, t]) for t in toks[i]) / len(toks[i])))
        for t in toks[i]:
            w = math.exp(clamp(float(old[i, t]) - float(sampler[i, t]))) if sampler is not None else 1.0
            wm = seq_w if mis_level == "sequence" and sampler is not None else w
            keep[i, t] = not ((mis_low is not None and wm < mis_low) or (mis_high is not None and wm > mis_high))
            w_tis[i, t] = min(w, tis_cap) if tis_cap is not None else 1.0
            counts["dropped"] += not keep[i, t]
            counts["truncated"] += keep[i, t] and tis_cap is not None and w > tis_cap
    kept = [[t for t in toks[i] if keep[i, t]] for i in range(rows)]
    obj, dobj = {}, {}
    for i in range(rows):
        a = float(adv[i])
        if ratio == "sequence" and kept[i]:
            seq_lr = sum(float(logp[i, t]) - float(old[i, t]) for t in kept[i]) / len(kept[i])
            s = math.exp(clamp(seq_lr))
        for t in kept[i]:
            lp = float(logp[i, t])
            lr = lp - float(old[i, t])
            rho = math.exp(clamp(lr))
            if ratio == "cispo":
                w = min(max(rho, 1 - cispo[0]), 1 + cispo[1])
                o, g = w * a * lp, w * a  # the weight is a constant: d/d logp of w A logp is w A, clipped or not
                counts["clipped"] += w != rho
            else:
                r, lo, hi, live = (rho, 1 - eps[0], 1 + eps[1], abs(lr) < lim) if ratio == "token" else \
                    (s, 1 - gspo[0], 1 + gspo[1], abs(seq_lr) < lim)
                c = min(max(r, lo), hi)
                if c * a < r * a:  # the min picks the clipped, constant term: no gradient
                    o, g = c * a, 0.0
                    counts["clipped"] += 1
                else:
                    o, g = r * a, (r * a if live else 0.0)
            o, g = o * w_tis[i, t], g * w_tis[i, t]
            if beta > 0:
                d = float(ref[i, t]) - lp
                k3 = math.exp(clamp(d)) - clamp(d) - 1
                dk3 = (1 - math.exp(d)) if abs(d) < lim else 0.0  # d k3 / d logp, d = ref - logp
                if kl == "k3_is":  # d (rho k3) / d logp = rho k3 + rho dk3 = rho (logp - ref)
                    kv, dk = rho * k3, (rho if abs(lr) < lim else 0.0) * k3 + rho * dk3
                else:
                    kv, dk = k3, dk3
                o, g = o - beta * kv, g - beta * dk
            obj[i, t], dobj[i, t] = o, g
    n_outputs = sum(1 for i in range(rows) if kept[i])
    n_kept = sum(map(len, kept))
    grad = np.zeros((rows, cols))
    value = 0.0
    for (i, t), o in obj.items():
        coef = {"grpo": 1.0 / (len(kept[i]) * n_outputs), "dapo": 1.0 / n_kept,
                "dr_grpo": 1.0 / (rows * (max_len or cols))}[aggregation]
        value -= coef * o
        grad[i, t] = -coef * dobj[i, t]
    return value, grad, counts


def _sampler(old, seed, spread=0.8):
    return (old + np.random.default_rng(seed).uniform(-spread, spread, old.shape)).astype(np.float32)


EXT = [  # GRPOConfig fields (besides group_size), which count must be strictly between 0 and the token count
    (dict(ratio="token", beta=0.04), ("clipped",)),  # the reference's own check against the unchanged GRPO
    (dict(ratio="token", beta=0.04, kl_estimator="k3_is", aggregation="dapo", eps_high=0.28), ("clipped",)),
    (dict(ratio="sequence", gspo_eps_low=0.02, gspo_eps_high=0.03, beta=0.0), ("clipped",)),
    (dict(ratio="sequence", beta=0.04, kl_estimator="k3_is", aggregation="dapo"), ("clipped",)),
    (dict(ratio="cispo", cispo_eps_high=0.2, aggregation="dapo", beta=0.0), ("clipped",)),
    (dict(ratio="cispo", cispo_eps_low=0.15, cispo_eps_high=0.25, beta=0.01), ("clipped",)),
    (dict(tis_cap=1.5, mis_low=0.6, mis_high=1.8, aggregation="dapo", beta=0.0), ("dropped", "truncated")),
    (dict(tis_cap=1.2, mis_low=0.85, mis_high=1.15, mis_level="sequence", beta=0.02, kl_estimator="k3_is"),
     ("dropped", "truncated")),
    (dict(ratio="sequence", gspo_eps_low=0.05, gspo_eps_high=0.05, tis_cap=1.3, mis_high=1.6,
          aggregation="dr_grpo", max_completion_length=12, beta=0.0), ("dropped", "truncated")),
    (dict(ratio="cispo", cispo_eps_high=0.2, tis_cap=1.0, mis_low=0.9, mis_level="sequence", beta=0.0),
     ("dropped", "truncated", "clipped")),
]


@pytest.mark.parametrize("fields,active", EXT)
def test_new_variants_value_and_grad_match_hand_computation(fields, active):
    logp, old, ref, rewards, mask = _inputs(seed=11)
    sampler = _sampler(old, 12)
    cfg = GRPOConfig(group_size=G, **fields)
    adv = np.asarray(group_advantages(rewards, G))
    use_sampler = cfg.tis_cap is not None or cfg.mis_low is not None or cfg.mis_high is not None
    kw = {"sampler_logp": sampler} if use_sampler else {}
    (loss, met), grad = jax.value_and_grad(lambda lp: grpo_loss(lp, old, ref, adv, mask, cfg, **kw), has_aux=True)(
        jnp.asarray(logp))
    want, want_grad, counts = np_ext(
        logp, old, ref, adv, mask, sampler=sampler if use_sampler else None, ratio=cfg.ratio,
        eps=(cfg.eps_low, cfg.clip_high), gspo=(cfg.gspo_eps_low, cfg.gspo_eps_high),
        cispo=(cfg.cispo_eps_low, cfg.cispo_eps_high), beta=cfg.beta, kl=cfg.kl_estimator,
        aggregation=cfg.aggregation, max_len=cfg.max_completion_length, tis_cap=cfg.tis_cap, mis_low=cfg.mis_low,
        mis_high=cfg.mis_high, mis_level=cfg.mis_level)
    for name in active:  # the option acts on some tokens and not on others
        assert 0 < counts[name] < counts["tokens"], (name, counts)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=2e-5, atol=1e-8)
    assert np.all(np.asarray(grad)[mask == 0] == 0.0)
    if use_sampler:
        np.testing.assert_allclose(float(met["mis_drop_frac"]), counts["dropped"] / counts["tokens"], rtol=1e-6)
        np.testing.assert_allclose(float(met["tis_frac"]), counts["truncated"] / counts["tokens"], rtol=1e-6)
    if cfg.ratio == "cispo" and not counts["dropped"]:  # (the metric counts dropped tokens too, the reference not)
        np.testing.assert_allclose(float(met["clip_frac"]), counts["clipped"] / counts["tokens"], rtol=1e-6)


def test_tis_hand_values():
    # one output, A = 2, logp == old_logp (rho = 1), sampler ratios pi_old / pi_sampler = 0.5, 1, 3, 1.5; C = 2
    old = np.full((1, 4), -1.0, np.float32)
    sampler = (old - np.log(np.array([0.5, 1.0, 3.0, 1.5]))).astype(np.float32)
    adv, mask = np.array([2.0], np.float32), np.ones((1, 4), np.float32)
    cfg = GRPOConfig(beta=0.0, tis_cap=2.0)
    f = lambda lp: grpo_loss(lp, old, None, adv, mask, cfg, sampler_logp=sampler)  # noqa: E731
    (loss, met), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(old))
    weights = np.array([0.5, 1.0, 2.0, 1.5])  # min(ratio, 2): the 3 is truncated
    np.testing.assert_allclose(float(loss), -2.0 * weights.mean(), rtol=1e-6)  # -(1/4) sum w rho A
    np.testing.assert_allclose(np.asarray(grad), -2.0 * weights[None] / 4, rtol=1e-6)  # the weight is a constant
    np.testing.assert_allclose([float(met["tis_frac"]), float(met["mis_drop_frac"]), float(met["is_weight_mean"])],
                               [0.25, 0.0, 1.25], rtol=1e-6)


def test_mis_drops_tokens_and_rows():
    """Token level drops the outlying tokens; sequence level keeps a row whose geometric mean is inside the range
    even with extreme tokens, and drops a row whose mean is outside, whole. Dropped tokens have exactly zero gradient
    and leave the denominators (a row with nothing kept is not an output)."""
    old = np.full((2, 4), -1.0, np.float32)
    w = np.array([[0.3, 1.0, 1.1, 4.0],     # geometric mean (1.32)^(1/4) = 1.07: inside [0.5, 2]
                  [3.0, 3.0, 3.0, 0.9]])    # geometric mean (24.3)^(1/4) = 2.22: outside
    sampler = (old - np.log(w)).astype(np.float32)
    rho = np.array([[1.1, 0.9, 1.05, 1.0], [1.1, 1.0, 0.95, 1.02]])
    logp = (old + np.log(rho)).astype(np.float32)
    adv, mask = np.array([1.0, -1.0], np.float32), np.ones((2, 4), np.float32)
    results = {}
    for level in ("token", "sequence"):
        cfg = GRPOConfig(beta=0.0, mis_low=0.5, mis_high=2.0, mis_level=level, group_size=2)
        f = lambda lp: grpo_loss(lp, old, None, adv, mask, cfg, sampler_logp=sampler)  # noqa: E731
        results[level] = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp))
    (loss, met), grad = results["token"]
    kept = (w >= 0.5) & (w <= 2.0)  # row 0 drops 0.3 and 4.0, row 1 drops its three 3.0
    assert kept.sum() == 3
    grad = np.asarray(grad)
    assert np.all(grad[~kept] == 0.0) and np.all(grad[kept] != 0.0)
    per_row = [(rho[i] * adv[i])[kept[i]].mean() for i in range(2)]  # no clip active: every rho in [0.8, 1.2]
    np.testing.assert_allclose(float(loss), -np.mean(per_row), rtol=1e-6)
    want = np.where(kept, -rho * adv[:, None] / (kept.sum(1, keepdims=True) * 2), 0.0)
    np.testing.assert_allclose(grad, want, rtol=1e-6)
    np.testing.assert_allclose(float(met["mis_drop_frac"]), 5 / 8, rtol=1e-6)
    (loss, met), grad = results["sequence"]
    grad = np.asarray(grad)
    assert np.all(grad[1] == 0.0) and np.all(grad[0] != 0.0)
    np.testing.assert_allclose(float(loss), -(rho[0] * adv[0]).mean(), rtol=1e-6)  # row 1 is not an output
    np.testing.assert_allclose(grad[0], -rho[0] * adv[0] / 4, rtol=1e-6)
    np.testing.assert_allclose([float(met["mis_drop_frac"]), float(met["is_weight_mean"])], [0.5, 1.0], rtol=1e-6)


def test_gspo_clips_whole_outputs_with_the_paper_range():
    """Default gspo_eps 3e-4 / 4e-4; per-token log-ratios +-0.5 (token ratios 1.65 / 0.61, both outside GRPO's clip)
    plus 3 x the row's mean log-ratio on the third token."""
    means = np.array([1e-4, 1e-3, -1e-3, 1e-3])  # s = e^mean: inside, above (A > 0), below (A < 0), above (A < 0)
    adv = np.array([1.0, 1.0, -1.0, -2.0], np.float32)
    old = np.full((4, 3), -1.0, np.float32)
    logp = (old + np.stack([np.full(4, 0.5), np.full(4, -0.5), 3 * means], 1)).astype(np.float32)
    mask = np.ones((4, 3), np.float32)
    cfg = GRPOConfig(ratio="sequence", beta=0.0, group_size=2)
    f = lambda lp: grpo_loss(lp, old, None, adv, mask, cfg)  # noqa: E731
    (loss, met), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp))
    s = np.exp(np.mean(logp.astype(np.float64) - old, axis=1))
    np.testing.assert_allclose(s, np.exp(means), rtol=1e-6)
    clipped = np.array([False, True, True, False])  # rows 1, 2: clip active; row 3: A < 0 above the range, unclipped
    obj = np.minimum(s * adv, np.clip(s, 1 - 3e-4, 1 + 4e-4) * adv)
    np.testing.assert_allclose(float(loss), -obj.mean(), rtol=1e-6)
    grad = np.asarray(grad)
    assert np.all(grad[clipped] == 0.0)
    # unclipped rows: every token gets s_i A_i / (|o_i| x outputs), the same for all of the row's tokens
    np.testing.assert_allclose(grad[~clipped], np.repeat((-s * adv / (3 * 4))[~clipped, None], 3, 1), rtol=1e-5)
    np.testing.assert_allclose([float(met["clip_frac"]), float(met["clip_frac_high"]), float(met["clip_frac_low"])],
                               [0.5, 0.25, 0.25], rtol=1e-6)
    np.testing.assert_allclose([float(met["seq_ratio_mean"]), float(met["seq_ratio_max"])], [s.mean(), s.max()],
                               rtol=1e-6)
    # the token ratio of GRPO would have clipped the +-0.5 tokens of rows 0 and 3
    g_tok = np.asarray(jax.grad(lambda lp: grpo_loss(lp, old, None, adv, mask, GRPOConfig(beta=0.0, group_size=2))[0])(
        jnp.asarray(logp)))
    assert (g_tok[[0, 3]] == 0.0).sum() == 2


def test_cispo_keeps_the_gradient_of_clipped_tokens():
    """The tokens of test_grad_zero_exactly_where_clipped: GRPO gives them zero gradient, CISPO clip(rho) A."""
    ratios = np.array([1.5, 1.25, 1.1, 1.0, 0.9, 0.7, 0.3])
    adv = np.array([1.3, -0.7], np.float32)
    old = np.full((2, 7), -1.0, np.float32)
    logp = (old + np.log(ratios)[None, :]).astype(np.float32)
    mask = np.ones((2, 7), np.float32)
    cfg = GRPOConfig(ratio="cispo", cispo_eps_low=0.2, cispo_eps_high=0.28, beta=0.0, aggregation="dapo",
                     group_size=2)
    (loss, met), grad = jax.value_and_grad(lambda lp: grpo_loss(lp, old, None, adv, mask, cfg), has_aux=True)(
        jnp.asarray(logp))
    w = np.clip(ratios, 0.8, 1.28)[None, :]
    np.testing.assert_allclose(float(loss), -(w * adv[:, None] * logp).sum() / 14, rtol=1e-6)
    grad = np.asarray(grad)
    np.testing.assert_allclose(grad, -w * adv[:, None] / 14 * np.ones((2, 1)), rtol=1e-6)
    assert np.all(grad != 0.0)  # clipped tokens (1.5, 0.7, 0.3) included
    np.testing.assert_allclose([float(met["clip_frac"]), float(met["clip_frac_high"]), float(met["clip_frac_low"])],
                               [6 / 14, 2 / 14, 4 / 14], rtol=1e-6)
    # the paper's default: no lower bound; the 0.3 token keeps its weight 0.3
    g0 = jax.grad(lambda lp: grpo_loss(lp, old, None, adv, mask, GRPOConfig(ratio="cispo", cispo_eps_high=0.28,
                                                                          beta=0.0, aggregation="dapo"))[0])
    np.testing.assert_allclose(np.asarray(g0(jnp.asarray(logp)))[:, -1], -0.3 * adv / 14, rtol=1e-5)


def test_k3_is_hand_values():
    # one token: logp -1, old -1.2 (rho = e^0.2), ref -0.5 (d = ref - logp = 0.5); A = 0 leaves only the KL term
    logp, old, ref = (np.array([[x]], np.float32) for x in (-1.0, -1.2, -0.5))
    adv, mask, beta = np.zeros(1, np.float32), np.ones((1, 1), np.float32), 0.1
    rho, d = math.exp(0.2), 0.5
    for est, kl, dkl in (("k3", math.exp(d) - d - 1, 1 - math.exp(d)),
                         ("k3_is", rho * (math.exp(d) - d - 1), rho * (-1.0 + 0.5))):  # rho (logp - ref)
        cfg = GRPOConfig(beta=beta, kl_estimator=est)
        (loss, met), grad = jax.value_and_grad(lambda lp: grpo_loss(lp, old, ref, adv, mask, cfg), has_aux=True)(
            jnp.asarray(logp))
        np.testing.assert_allclose([float(loss), float(met["kl"])], [beta * kl, kl], rtol=1e-6)
        np.testing.assert_allclose(float(grad[0, 0]), beta * dkl, rtol=1e-5)
    # at rho = 1 (mu = 1) the same value as k3, but the gradient rho (logp - ref), not 1 - pi_ref / pi_theta
    logp2, _, ref2, rewards, mask2 = _inputs(seed=13)
    adv2 = group_advantages(rewards, G)
    f = {e: (lambda lp, e=e: grpo_loss(lp, logp2, ref2, adv2, mask2, GRPOConfig(beta=0.04, group_size=G,
                                                                               kl_estimator=e))[0]) for e in
         ("k3", "k3_is")}
    assert float(f["k3"](jnp.asarray(logp2))) == float(f["k3_is"](jnp.asarray(logp2)))
    assert not np.allclose(np.asarray(jax.grad(f["k3"])(jnp.asarray(logp2))),
                           np.asarray(jax.grad(f["k3_is"])(jnp.asarray(logp2))))


@pytest.mark.parametrize("ratio", ["sequence", "cispo"])
def test_new_ratios_at_mu1_give_grpo_gradient(ratio):
    """logp == old_logp: GSPO's value and gradient are GRPO's; CISPO's gradient is (its value is -mean A logp)."""
    logp, _, _, rewards, mask = _inputs(seed=3)
    adv = group_advantages(rewards, G)
    out = {}
    for r in ("token", ratio):
        cfg = GRPOConfig(beta=0.0, group_size=G, ratio=r)
        out[r] = jax.value_and_grad(lambda lp: grpo_loss(lp, logp, None, adv, mask, cfg)[0])(jnp.asarray(logp))
    np.testing.assert_allclose(np.asarray(out[ratio][1]), np.asarray(out["token"][1]), rtol=1e-6, atol=1e-9)
    if ratio == "sequence":
        np.testing.assert_allclose(float(out[ratio][0]), float(out["token"][0]), atol=1e-7)


def test_sampler_logp_without_a_correction_or_equal_to_old_changes_nothing():
    logp, old, ref, rewards, mask = _inputs(seed=14)
    adv = group_advantages(rewards, G)
    base = GRPOConfig(beta=0.04, group_size=G, aggregation="dapo")
    f = lambda lp, cfg, **kw: grpo_loss(lp, old, ref, adv, mask, cfg, **kw)  # noqa: E731
    (l0, m0), g0 = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp), base)
    # a sampler that differs, no correction on: only reported
    (l1, m1), g1 = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp), base, sampler_logp=_sampler(old, 15))
    assert float(l1) == float(l0) and np.array_equal(np.asarray(g1), np.asarray(g0))
    assert set(m1) - set(m0) == {"tis_frac", "mis_drop_frac", "is_weight_mean"}
    assert (float(m1["tis_frac"]), float(m1["mis_drop_frac"]), float(m1["is_weight_mean"])) == (0.0, 0.0, 1.0)
    # corrections on, sampler == trainer: weights 1, nothing dropped
    for level in ("token", "sequence"):
        cfg = dataclasses.replace(base, tis_cap=2.0, mis_low=0.5, mis_high=2.0, mis_level=level)
        (l2, m2), g2 = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp), cfg, sampler_logp=old)
        assert float(l2) == float(l0) and np.array_equal(np.asarray(g2), np.asarray(g0))
        assert (float(m2["tis_frac"]), float(m2["mis_drop_frac"]), float(m2["is_weight_mean"])) == (0.0, 0.0, 1.0)


def test_new_options_mask_jit_and_huge_log_ratios():
    """All new options at once: padding junk (inf / nan too) changes nothing and gets zero gradient; jit agrees;
    log-ratios of +-1e4 (policy, reference, sampler) stay finite."""
    logp, old, ref, rewards, mask = _inputs(seed=16)
    sampler = _sampler(old, 17)
    adv = group_advantages(rewards, G)
    pad = mask == 0
    junk = np.random.default_rng(18).normal(0, 50, (B, T)).astype(np.float32)
    junk[1, -1], junk[1, -2] = np.inf, np.nan
    dirty = [np.where(pad, junk * s, x).astype(np.float32) for x, s in ((logp, 1), (old, -1), (ref, 2), (sampler, 3))]
    for ratio in ("sequence", "cispo"):
        cfg = GRPOConfig(ratio=ratio, beta=0.04, kl_estimator="k3_is", tis_cap=1.5, mis_low=0.8, mis_high=1.1,
                         mis_level="sequence", gspo_eps_low=0.05, gspo_eps_high=0.05, group_size=G)
        f = lambda lp, o, r, s: grpo_loss(lp, o, r, adv, mask, cfg, sampler_logp=s)  # noqa: E731
        vg = jax.value_and_grad(f, has_aux=True)
        (l1, m1), g1 = vg(jnp.asarray(logp), old, ref, sampler)
        (l2, m2), g2 = vg(jnp.asarray(dirty[0]), *dirty[1:])
        assert float(l1) == float(l2) and set(m1) == set(m2) and all(float(m1[k]) == float(m2[k]) for k in m1)
        np.testing.assert_array_equal(np.asarray(g1), np.asarray(g2))
        assert np.all(np.asarray(g2)[pad] == 0.0) and 0 < float(m1["mis_drop_frac"]) < 1
        (l3, _), g3 = jax.jit(vg)(jnp.asarray(logp), old, ref, sampler)
        np.testing.assert_allclose(float(l3), float(l1), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(np.asarray(g3), np.asarray(g1), rtol=1e-5, atol=1e-8)
        signs = np.where(np.arange(B * T).reshape(B, T) % 2 == 0, 1.0, -1.0).astype(np.float32)
        far = [(logp - 1e4 * signs).astype(np.float32), (logp + 1e4 * signs[::-1]).astype(np.float32),
               (old + 1e4 * signs).astype(np.float32)]
        (l4, m4), g4 = vg(jnp.asarray(logp), *far)
        assert np.isfinite(float(l4)) and np.all(np.isfinite(np.asarray(g4)))
        assert all(np.isfinite(float(v)) for v in m4.values())


def test_sampler_options_need_sampler_logp_and_its_shape():
    logp, old, ref, rewards, mask = _inputs()
    adv = group_advantages(rewards, G)
    for fields in (dict(tis_cap=2.0), dict(mis_low=0.5), dict(mis_high=2.0, mis_level="sequence")):
        with pytest.raises(ValueError, match="sampler_logp"):
            grpo_loss(logp, old, ref, adv, mask, GRPOConfig(group_size=G, **fields))
    with pytest.raises(ValueError, match="sampler_logp"):
        grpo_loss(logp, old, ref, adv, mask, GRPOConfig(group_size=G), sampler_logp=old[:, :2])


def test_new_config_defaults_are_off():
    c = GRPOConfig()
    assert (c.ratio, c.gspo_eps_low, c.gspo_eps_high, c.cispo_eps_low, c.cispo_eps_high) == (
        "token", 3e-4, 4e-4, 1.0, 3.0)
    assert (c.tis_cap, c.mis_low, c.mis_high, c.mis_level, c.kl_estimator) == (None, None, None, "token", "k3")
    hash(GRPOConfig(ratio="sequence", tis_cap=2.0, mis_low=0.5, mis_level="sequence"))


@pytest.mark.parametrize("field,value", [
    ("kl_estimator", "k3-is"), ("ratio", "gspo"), ("ratio", "seq"), ("ratio", None),
    ("gspo_eps_low", 0.0), ("gspo_eps_low", 1.0), ("gspo_eps_low", None), ("gspo_eps_high", 0.0),
    ("gspo_eps_high", float("nan")),
    ("cispo_eps_low", 0.0), ("cispo_eps_low", 1.5), ("cispo_eps_high", -1.0), ("cispo_eps_high", float("inf")),
    ("tis_cap", 0.5), ("tis_cap", 0.0), ("tis_cap", float("inf")), ("tis_cap", "2"),
    ("mis_low", 0.0), ("mis_low", 1.0), ("mis_low", -0.5), ("mis_high", 1.0), ("mis_high", 0.5),
    ("mis_high", float("inf")), ("mis_level", "row"), ("mis_level", None),
])
def test_bad_new_config_raises_naming_field(field, value):
    with pytest.raises(ValueError, match=f"GRPOConfig.{field} "):
        GRPOConfig(**{field: value})

"""The GRPO policy step: rollouts layout, the trainer's token log-probs vs the sampler's, the mu = 1 zero-loss /
non-zero-update property, policy improvement on a fixed batch, padding and padded-width invariance, the non-finite guard, the KL
and router-bias paths under a donated jit."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepjax.rl import loss as G
from deepjax import model as M
from deepjax.train import optim
from deepjax.rl import update
from deepjax.infer import sampling as SP
from deepjax.train import step as TS
from deepjax.config import load_config

GROUP = 4
PROMPTS = ([5, 17, 300], [9, 1, 2, 3, 4, 400])  # two prompts, GROUP samples each (consecutive rows)
TEMP = 0.7
N_NEW = 6
T = 16
REWARDS = np.asarray([1, 0, 0, 0, 0, 1, 1, 0], np.float32)  # group 1: row 0 right; group 2: rows 5, 6


@pytest.fixture(scope="module")
def setup():
    """Tiny preset with weights 10x init scale (peaked, far-from-uniform next-token and routing distributions);
    GROUP samples per prompt at temperature 0.7 with top-k / top-p (the reported log-probs are before truncation),
    and EOS on every 8th token id so completion lengths differ."""
    cfg = dataclasses.replace(load_config("tiny").model, initializer_range=0.2)
    graphdef, params = M.init(cfg, jax.random.key(0))
    prompts, lengths = SP.pad_prompts([p for p in PROMPTS for _ in range(GROUP)])
    sc = SP.SamplingConfig(max_new_tokens=N_NEW, temperature=TEMP, top_k=50, top_p=0.95,
                           eos_ids=tuple(range(3, cfg.vocab_size, 8)))
    out = SP.jit_generate(graphdef, params, jnp.asarray(prompts), jnp.asarray(lengths), jax.random.key(1), sc)
    adv = G.group_advantages(REWARDS, GROUP)
    batch = update.rollouts_from_samples(prompts, lengths, np.asarray(out.tokens), np.asarray(out.logprobs),
                                     np.asarray(out.lengths), np.asarray(adv), T)
    return cfg, graphdef, params, prompts, lengths, out, batch


@pytest.fixture(scope="module")
def grpo_step(setup):
    """One jitted step (beta 0, "grpo" aggregation), shared by the tests (not donated: states are reused)."""
    cfg, graphdef, params = setup[:3]
    opt = optim.adamw(1e-4, TS.split_params(params)[0])
    gc = G.GRPOConfig(beta=0.0, aggregation="grpo", group_size=GROUP)
    return opt, jax.jit(update.make_grpo_step(graphdef, cfg, opt, gc, TEMP))


def _jnp(batch):
    return jax.tree.map(jnp.asarray, batch)


def test_rollouts_layout(setup):
    cfg, graphdef, params, prompts, lengths, out, batch = setup
    toks, lps, n = np.asarray(out.tokens), np.asarray(out.logprobs), np.asarray(out.lengths)
    assert len(set(n.tolist())) > 1, "EOS makes completion lengths differ"
    for b in range(len(lengths)):
        p, k = int(lengths[b]), int(n[b])
        np.testing.assert_array_equal(batch.tokens[b, :p], prompts[b, :p])
        np.testing.assert_array_equal(batch.tokens[b, p:p + k], toks[b, :k])
        assert (batch.tokens[b, p + k:] == 0).all()
        np.testing.assert_array_equal(batch.segment_ids[b], (np.arange(T) < p + k).astype(np.int32))
        np.testing.assert_array_equal(batch.completion_mask[b], ((np.arange(T) >= p) & (np.arange(T) < p + k)))
        np.testing.assert_array_equal(batch.positions[b, :p + k], np.arange(p + k))
        np.testing.assert_array_equal(batch.old_logp[b, p:p + k], lps[b, :k])
        assert (batch.old_logp[b, :p] == 0).all() and (batch.old_logp[b, p + k:] == 0).all()
    assert batch.tokens.dtype == np.int32 and batch.old_logp.dtype == np.float32 and batch.ref_logp is None
    # the jax path (jittable, T static) builds the same arrays
    f = jax.jit(lambda *a: update.rollouts_from_samples(*a, T), static_argnums=())
    jb = f(jnp.asarray(prompts), jnp.asarray(lengths), out.tokens, out.logprobs, out.lengths,
           jnp.asarray(batch.advantages))
    for a, b in zip(jb, batch):
        if b is not None:
            np.testing.assert_array_equal(np.asarray(a), b)
    with pytest.raises(ValueError, match="T = 10 is shorter"):
        update.rollouts_from_samples(prompts, lengths, toks, lps, n * 0 + N_NEW, batch.advantages, 10)


def test_token_logprobs_equal_the_samplers(setup, grpo_step):
    cfg, graphdef, params, prompts, lengths, out, batch = setup
    got = np.asarray(update.jit_token_logprobs(graphdef, params, batch, TEMP))
    m = batch.completion_mask > 0
    assert np.abs(batch.old_logp[m]).max() > 0.5  # not a near-zero comparison
    np.testing.assert_allclose(got[m], batch.old_logp[m], atol=1e-5, rtol=0)
    assert (got[~m] == 0).all()
    # the unmasked function: 0 at t = 0 and on padding, equal to the sampler on the completion
    lp, ent = jax.jit(update.token_logprobs_and_entropy, static_argnums=(0, 5))(
        graphdef, params, jnp.asarray(batch.tokens), jnp.asarray(batch.positions), jnp.asarray(batch.segment_ids),
        TEMP)
    lp, ent = np.asarray(lp), np.asarray(ent)
    assert (lp[:, 0] == 0).all() and (lp[batch.segment_ids == 0] == 0).all()
    np.testing.assert_allclose(lp[m], batch.old_logp[m], atol=1e-5, rtol=0)
    assert (ent[m] > 0).all() and (ent[m] < np.log(cfg.vocab_size)).all()
    # so the step's sampler/trainer gap at the first update is ~0
    opt, step = grpo_step
    _, metrics = step(TS.init_state(params, opt, 0), _jnp(batch))
    assert float(metrics["sampler_trainer_logp_gap"]) < 1e-5
    assert float(metrics["sampler_trainer_logp_gap_max"]) < 1e-5
    np.testing.assert_allclose(float(metrics["entropy"]), ent[m].mean(), rtol=1e-5)


def test_chunked_policy_logprobs_equal_the_logits(setup, monkeypatch):
    """The objective's log-probs from the hidden state by chunks (ops.lm_head_logprobs, several chunks here) give
    the loss, metrics and gradients that log_softmax over the forward's [B, T, V] logits gives."""
    cfg, graphdef, params, prompts, lengths, out, batch = setup
    monkeypatch.setattr(M.ops, "CE_CHUNK_TOKENS", 24)  # 8 rows x 3 positions a chunk, the last one padded
    b = _jnp(batch._replace(advantages=np.asarray(batch.advantages) + 0.3,  # (nonzero everywhere)
                            old_logp=np.asarray(batch.old_logp) - 0.05))
    gc = G.GRPOConfig(beta=0.0, aggregation="grpo", group_size=GROUP)
    trainable, bias = TS.split_params(params)

    def run():  # jitted (traced anew each call: the patched function is read while tracing); eager ran ~3x slower
        fn = jax.jit(jax.value_and_grad(update.grpo_objective, has_aux=True), static_argnums=(2, 4, 5))
        return fn(trainable, bias, graphdef, b, gc, TEMP)

    (loss, (metrics, _)), grads = run()
    monkeypatch.setattr(update, "policy_logprobs", lambda g, p, o, t, s, tau, k=None: update.logprobs_from_logits(
        o.logits, t, s, tau, k))
    (loss_ref, (metrics_ref, _)), grads_ref = run()
    assert abs(float(loss_ref)) > 1e-3
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
    for k in ("entropy", "ratio_mean", "sampler_trainer_logp_gap"):
        np.testing.assert_allclose(metrics[k], metrics_ref[k], rtol=1e-5, atol=1e-6)
    leaves, leaves_ref = jax.tree.leaves(grads), jax.tree.leaves(grads_ref)
    assert max(float(jnp.abs(g).max()) for g in leaves_ref) > 1e-3
    for a, r in zip(leaves, leaves_ref):
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-6)


def test_mu_1_loss_is_zero_but_the_update_is_not(setup, grpo_step):
    cfg, graphdef, params, prompts, lengths, out, batch = setup
    opt, step = grpo_step
    state = TS.init_state(params, opt, 0)
    new, m = step(state, _jnp(batch))
    assert abs(float(m["loss"])) < 1e-6, float(m["loss"])
    assert int(m["applied"]) == 1 and float(m["grad_norm"]) > 1e-3
    assert float(m["clip_frac"]) == 0.0 and abs(float(m["ratio_mean"]) - 1) < 1e-5
    assert int(m["n_tokens"]) == int(batch.completion_mask.sum())
    moved = [float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(new.params))]
    assert max(moved) > 1e-4
    assert int(new.step) == 1 and int(new.nonfinite_total) == 0
    for a, b in zip(jax.tree.leaves(state.router_bias), jax.tree.leaves(new.router_bias)):
        np.testing.assert_array_equal(a, b)  # bias_update_speed = 0


def _seq_logp(graphdef, state, batch):
    params = nnx.merge_state(state.params, state.router_bias)
    lp = np.asarray(update.jit_token_logprobs(graphdef, params, batch, TEMP))
    return (lp * batch.completion_mask).sum(1) / batch.completion_mask.sum(1)


def test_repeated_steps_raise_the_rewarded_completion(setup, grpo_step):
    cfg, graphdef, params, prompts, lengths, out, batch = setup
    opt, step = grpo_step
    state = TS.init_state(params, opt, 0)
    before = _seq_logp(graphdef, state, batch)
    jb = _jnp(batch)
    for i in range(8):
        state, m = step(state, jb)
        assert int(m["applied"]) == 1
    after = _seq_logp(graphdef, state, batch)
    gain = after - before
    adv = np.asarray(batch.advantages)
    assert (gain[adv > 0] > 0.05).all(), gain
    assert gain[adv > 0].min() > gain[adv < 0].max(), gain
    assert float(m["sampler_trainer_logp_gap"]) > 0.05  # later updates: the policy moved away from the sampler's
    assert float(m["ratio_max"]) > 1.0


def test_padding_never_matters(setup, grpo_step):
    cfg, graphdef, params, prompts, lengths, out, batch = setup
    opt, step = grpo_step
    rng = np.random.default_rng(0)
    pad = batch.segment_ids == 0
    noisy = batch._replace(
        tokens=np.where(pad, rng.integers(0, cfg.vocab_size, batch.tokens.shape), batch.tokens).astype(np.int32),
        positions=np.where(pad, rng.integers(0, T, batch.tokens.shape), batch.positions).astype(np.int32),
        old_logp=np.where(batch.completion_mask > 0, batch.old_logp, np.nan).astype(np.float32))
    assert (noisy.tokens != batch.tokens).any()
    # garbage in the prompts' own padding never reaches the rollouts
    junk_prompts = np.where(np.arange(prompts.shape[1])[None] < lengths[:, None], prompts, 77).astype(np.int32)
    again = update.rollouts_from_samples(junk_prompts, lengths, np.asarray(out.tokens), np.asarray(out.logprobs),
                                     np.asarray(out.lengths), batch.advantages, T)
    np.testing.assert_array_equal(again.tokens, batch.tokens)
    state = TS.init_state(params, opt, 0)
    s1, m1 = step(state, _jnp(batch))
    s1, m1 = step(s1, _jnp(batch))  # a second update: ratios != 1, the loss is no longer ~0
    s2, m2 = step(state, _jnp(noisy))
    s2, m2 = step(s2, _jnp(noisy))
    assert int(m2["applied"]) == 1 and abs(float(m1["loss"])) > 1e-4
    for k in ("loss", "grad_norm", "entropy", "clip_frac", "ratio_mean", "sampler_trainer_logp_gap"):
        np.testing.assert_allclose(float(m2[k]), float(m1[k]), rtol=1e-5, atol=1e-7, err_msg=k)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_padded_width_never_matters(setup, grpo_step):
    """The rollouts cut to the batch's real width (update.padded_length, what the GRPO loop builds) give the same
    step as the full prompt + max_new_tokens width."""
    cfg, graphdef, params, prompts, lengths, out, batch = setup
    opt, step = grpo_step
    n = np.asarray(out.lengths)
    assert update.padded_length(prompts.shape[1], n, N_NEW) == prompts.shape[1] + N_NEW  # bucket 32 > N_NEW
    assert update.padded_length(10, [3, 40, 7], 100) == 10 + 64 and update.padded_length(10, [0, 0], 100) == 42
    assert update.padded_length(10, [99], 100) == 110
    short_T = int((lengths + n).max())
    assert short_T < T
    short = update.rollouts_from_samples(prompts, lengths, np.asarray(out.tokens), np.asarray(out.logprobs), n,
                                         batch.advantages, short_T)
    state = TS.init_state(params, opt, 0)
    results = []
    for b in (batch, short):
        s, m = step(state, _jnp(b))
        s, m = step(s, _jnp(b))  # ratios != 1
        results.append((s, m))
    (s1, m1), (s2, m2) = results
    assert abs(float(m1["loss"])) > 1e-4
    for k in ("loss", "grad_norm", "entropy", "clip_frac", "ratio_mean"):
        np.testing.assert_allclose(float(m2[k]), float(m1[k]), rtol=1e-5, atol=1e-7, err_msg=k)
    # sums over another width round differently, and Adam moves an entry with a near-zero gradient by up to lr (1e-4
    # a step) whatever its size: 5e-6 seen on 1 of 6,144 entries
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-5)


def test_nonfinite_batch_is_not_applied_and_counted(setup, grpo_step):
    cfg, graphdef, params, prompts, lengths, out, batch = setup
    opt, step = grpo_step
    b, t = np.argwhere(batch.completion_mask > 0)[0]
    bad = batch._replace(old_logp=batch.old_logp.copy())
    bad.old_logp[b, t] = np.nan
    state = TS.init_state(params, opt, 0)
    new, m = step(state, _jnp(bad))
    assert int(m["applied"]) == 0 and not np.isfinite(float(m["loss"]))
    assert int(new.step) == 1 and int(new.nonfinite_streak) == 1 and int(new.nonfinite_total) == 1
    for a, c in zip(jax.tree.leaves((state.params, state.opt_state, state.router_bias)),
                    jax.tree.leaves((new.params, new.opt_state, new.router_bias))):
        np.testing.assert_array_equal(a, c)
    new, m = step(new, _jnp(batch))  # a finite batch afterwards is applied and resets the streak
    assert int(m["applied"]) == 1 and int(new.nonfinite_streak) == 0 and int(new.nonfinite_total) == 1


def test_kl_and_router_bias_under_a_donated_jit(setup):
    cfg, graphdef, params, prompts, lengths, out, batch = setup
    opt = optim.adamw(1e-4, TS.split_params(params)[0])
    gc = G.GRPOConfig(beta=0.04, group_size=GROUP)
    ref = update.jit_token_logprobs(graphdef, params, batch, TEMP)  # reference = the initial policy
    jb = _jnp(batch._replace(ref_logp=np.asarray(ref)))
    step = jax.jit(update.make_grpo_step(graphdef, cfg, opt, gc, TEMP, bias_update_speed=1e-3), donate_argnums=0)
    bias0 = [np.asarray(x) for x in jax.tree.leaves(TS.split_params(params)[1])]
    state, m = step(TS.init_state(jax.tree.map(jnp.copy, params), opt, 0), jb)  # (donated: not the fixture's)
    assert float(m["kl"]) < 1e-6 and int(m["applied"]) == 1  # policy == reference at the first update
    moved = [np.abs(np.asarray(b) - a) for a, b in zip(bias0, jax.tree.leaves(state.router_bias))]
    assert any((d > 0).any() for d in moved) and all(np.allclose(d[d > 0], 1e-3) for d in moved)
    for _ in range(3):
        state, m = step(state, jb)
    assert float(m["kl"]) > 0 and np.isfinite(float(m["loss"]))
    with pytest.raises(ValueError, match="ref_logp is None"):
        jax.eval_shape(update.make_grpo_step(graphdef, cfg, opt, gc, TEMP), state, _jnp(batch))


@pytest.mark.parametrize("aggregation", ["grpo", "dapo", "dr_grpo"])
def test_micro_batches_give_the_whole_batch_step(setup, aggregation):
    """rl.micro_batches: the rows in two sequential halves (one group each, with different token counts) give the
    whole batch's gradient (SGD with lr 1: the new params are params - grad), loss and token-mean metrics; and the
    log-prob passes in parts equal the whole."""
    import optax
    cfg, graphdef, params, prompts, lengths, out, batch = setup
    ref = update.jit_token_logprobs(graphdef, params, batch, TEMP, micro_batches=2)
    np.testing.assert_allclose(np.asarray(ref), np.asarray(update.jit_token_logprobs(graphdef, params, batch, TEMP)),
                               atol=2e-5)  # (float rounding of a 4-row vs 8-row program)
    jb = _jnp(batch._replace(ref_logp=np.asarray(ref) + 0.01 * batch.completion_mask))  # a non-zero KL term
    assert batch.completion_mask[:GROUP].sum() != batch.completion_mask[GROUP:].sum()
    opt = optax.sgd(1.0)
    gc = G.GRPOConfig(beta=0.04, aggregation=aggregation, group_size=GROUP, max_completion_length=N_NEW)
    runs = {mb: jax.jit(update.make_grpo_step(graphdef, cfg, opt, gc, TEMP, micro_batches=mb))(
        TS.init_state(params, opt, 0), jb) for mb in (1, 2)}
    (one, m1), (two, m2) = runs[1], runs[2]
    deltas = [np.abs(np.asarray(a) - np.asarray(p)).max() for a, p in
              zip(jax.tree.leaves(one.params), jax.tree.leaves(TS.split_params(params)[0]))]
    assert max(deltas) > 1e-4  # the step moved the params
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)
    for k in ("loss", "kl", "n_tokens", "entropy", "ratio_mean", "ratio_max", "grad_norm"):
        np.testing.assert_allclose(float(m2[k]), float(m1[k]), rtol=1e-4, atol=1e-6, err_msg=k)


def test_precast_experts_give_the_same_gradients(setup):
    """`model.precast_experts` (the micro-batch loop's one cast of the routed expert stacks per update): with bf16
    compute, the GRPO objective's gradient with respect to the cast stacks, cast back to float32, equals the one
    with respect to the float32 stacks bit for bit, and every other leaf's too; the micro-batched step on them keeps
    its float32 gradient sum."""
    import optax
    cfg, *_, batch = setup
    graphdef, params = M.init(dataclasses.replace(cfg, dtype="bfloat16"), jax.random.key(0))
    trainable, bias = TS.split_params(params)
    gc = G.GRPOConfig(beta=0.0, aggregation="grpo", group_size=GROUP)
    jb = _jnp(batch)
    grad = jax.jit(jax.grad(lambda p, b: update.grpo_objective(p, bias, graphdef, b, gc, TEMP)[0]))
    pre = M.precast_experts(trainable, jnp.bfloat16)
    g32, gpc = grad(trainable, jb), grad(pre, jb)
    cast = [path for path, dt in ((M.path_str(p), v.dtype) for p, v in nnx.to_flat_state(gpc)) if dt == jnp.bfloat16]
    assert sorted(cast) == [f"moe_layers.ffn.{w}" for w in ("w_down", "w_gate", "w_up")], cast
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g32)) > 0
    for a, b in zip(jax.tree.leaves(g32), jax.tree.leaves(gpc)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b.astype(jnp.float32)))
    # the micro-batched step's gradient (kept as the optimizer state by a stand-in optimizer) against the float32
    # stacks' gradients of its two halves summed in float32, and in float32 itself
    keep = optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p),
                                        lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))
    step = jax.jit(update.make_grpo_step(graphdef, cfg, keep, gc, TEMP, micro_batches=2))
    got = step(TS.init_state(params, keep, 0), jb)[0].opt_state
    den = G.grpo_loss(jb.old_logp, jb.old_logp, None, jb.advantages, jb.completion_mask, gc)[1]["agg_denominator"]
    half = lambda i: jax.tree.map(lambda a: a[i * GROUP:(i + 1) * GROUP], jb)  # noqa: E731
    part = jax.jit(jax.grad(lambda p, b: update.grpo_objective(p, bias, graphdef, b, gc, TEMP, denominator=den)[0]))
    want = jax.tree.map(jnp.add, part(trainable, half(0)), part(trainable, half(1)))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert a.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-9)


def test_sampling_mask_replay(setup, grpo_step):
    """record_support: each token's kept set (top-50, then top-0.95) is the one the full forward's logits give, the
    token is in it, the sampler's log-prob is under that set's renormalized distribution, and the trainer over the
    same sets (Rollouts.support) reproduces it, where over the full softmax it does not; the GRPO step's
    sampler/trainer gap is then ~0."""
    cfg, graphdef, params, prompts, lengths = setup[:5]
    sc = SP.SamplingConfig(max_new_tokens=N_NEW, temperature=TEMP, top_k=50, top_p=0.95,
                           eos_ids=tuple(range(3, cfg.vocab_size, 8)), record_support=True)
    out = SP.jit_generate(graphdef, params, jnp.asarray(prompts), jnp.asarray(lengths), jax.random.key(1), sc)
    adv = G.group_advantages(REWARDS, GROUP)
    b = update.rollouts_from_samples(prompts, lengths, np.asarray(out.tokens), np.asarray(out.logprobs),
                                     np.asarray(out.lengths), np.asarray(adv), T, support=np.asarray(out.support))
    m = b.completion_mask > 0
    sup = np.asarray(b.support)
    assert sup.shape == (len(prompts), T, 50) and (sup[~m] == -1).all() and (sup[m][:, 0] >= 0).all()
    assert all(b.tokens[r, t] in sup[r, t] for r, t in zip(*np.nonzero(m)))  # drawn from its set
    logits = np.asarray(M.jit_forward(graphdef, params, jnp.asarray(b.tokens), jnp.asarray(b.positions),
                                      jnp.asarray(b.segment_ids)).logits, np.float64) / TEMP
    for r, t in zip(*np.nonzero(m)):  # the set by hand from the forward's logits at t - 1
        z = logits[r, t - 1]
        top = np.argsort(-z, kind="stable")[:50]
        p = np.exp(z[top] - z[top].max())
        p /= p.sum()
        want = top[(np.cumsum(p) - p) < 0.95]
        assert set(sup[r, t][sup[r, t] >= 0]) == set(want.tolist()), (r, t)
    # jitted (not op by op: the same function, compiled once instead of each of its ops)
    kept = np.asarray(jax.jit(update.token_logprobs, static_argnums=(0, 5))(
        graphdef, params, jnp.asarray(b.tokens), jnp.asarray(b.positions), jnp.asarray(b.segment_ids), TEMP,
        support=jnp.asarray(b.support)))
    full = np.asarray(update.jit_token_logprobs(graphdef, params, b, TEMP))
    np.testing.assert_allclose(kept[m], b.old_logp[m], atol=2e-5)
    assert np.abs(full[m] - b.old_logp[m]).max() > 1e-3  # the truncation matters on this batch
    np.testing.assert_allclose(np.asarray(update.jit_token_logprobs(graphdef, params, b, TEMP, replay_support=True))[m],
                               kept[m], atol=1e-5)
    opt, step = grpo_step  # the shared step: beta 0, "grpo" aggregation
    _, metrics = step(TS.init_state(params, opt, 0), _jnp(b))
    assert float(metrics["sampler_trainer_logp_gap_max"]) < 2e-5
    _, metrics = step(TS.init_state(params, opt, 0), _jnp(b._replace(support=None)))
    assert float(metrics["sampler_trainer_logp_gap_max"]) > 1e-3


def test_update_compiler_options_one_gpu_only():
    """cuBLAS for the update's dense products on one GPU; XLA's defaults on a mesh of several devices and off GPU."""
    assert update.compiler_options("gpu", True) == {"xla_gpu_enable_triton_gemm": False}
    assert update.compiler_options("gpu", False) is None and update.compiler_options("cpu", True) is None
    opts = update.compiler_options("gpu", True)
    opts["x"] = 1  # a copy: the module's constant is not changed by a caller
    assert update.GPU_UPDATE_OPTIONS == {"xla_gpu_enable_triton_gemm": False}

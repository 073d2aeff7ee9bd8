"""The GRPO loop (`deepjax grpo`): a run killed with SIGKILL and resumed equals the straight run bitwise (policy,
optimizer, reference, prompt order, metrics); the MTP modules stay frozen; the sampler's log-probs equal the
trainer's; `deepjax eval` reads a GRPO run; bad rl settings name the field; the task difficulty options."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from deepjax.train import checkpoint as C
from deepjax.infer import sampling as SP
from deepjax.rl import loop
from deepjax.rl import update as UP
from deepjax.data import tasks
from deepjax.rl import rewards
from deepjax.parallel import sharding as S
from deepjax.train import loop as T
from deepjax.train import run as TR
from deepjax.config import ConfigError, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = ["--config.data.template=plain", "--config.data.max_digits=1", "--config.data.ops=+-",
        "--config.data.num_train=150", "--config.data.num_test=20"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny model after 20 SFT steps on one-digit arithmetic (it does not solve them yet; the language reward,
    on in `_args`, varies within groups, so the advantages are not all zero)."""
    root = tmp_path_factory.mktemp("grpo")
    cfg = load_config("tiny", TASK + [f"--config.data.data_dir={root}/tfds", "--config.data.seq_len=96",
                                      "--config.data.global_batch=8", "--config.train.steps=20",
                                      "--config.optim.lr=3e-3", "--config.train.checkpoint_every=20",
                                      "--config.train.plot=false"])
    T.train(cfg, str(root / "base"), progress=False)
    return root


def _args(root, *extra):
    return TASK + [f"--config.data.data_dir={root}/tfds", f"--config.rl.init_from={root}/base",
                   "--config.rl.prompts_per_step=4", "--config.rl.loss.group_size=4", "--config.rl.loss.mu=2",
                   "--config.rl.rollout.max_new_tokens=24", "--config.rl.loss.beta=0.05", "--config.rl.reward.language=1.0",
                   "--config.rl.ref_refresh_every=3",
                   "--config.rl.eval.every=3", "--config.rl.eval.problems=4", "--config.rl.eval.k=2",
                   "--config.optim.lr=1e-3", "--config.optim.schedule=constant", "--config.optim.warmup_steps=0",
                   "--config.train.log_every=1", *extra]


def _grpo_cli(workdir, args, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "deepjax", "grpo", "tiny", "--workdir", str(workdir),
                           "--no-progress", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _restore(workdir, cfg, with_ref=True):
    """(step, state, data, config[, {"ref": params}]) of the newest checkpoint in workdir."""
    mesh, rules = S.make_mesh(cfg.mesh), S.rules_for(cfg.mesh.rules)
    *_, abstract = TR.abstract_train_state(cfg, mesh, rules)
    extra = {"ref": nnx.merge_state(abstract.params, abstract.router_bias)} if with_ref else None
    ck = C.Checkpointer(os.path.join(workdir, "checkpoints"), extra_items=tuple(extra or ()))
    try:
        return ck.restore(abstract, extra=extra)
    finally:
        ck.close()


def test_grpo_killed_and_resumed_equals_the_straight_run(base, compile_cache, capsys):
    """`deepjax grpo` straight to step 4, and in another directory SIGKILLed after step 3 (a subprocess; checkpoint
    2 committed; step 3's evaluation written, then lost with the step) then run again: the two end bitwise equal. The
    straight run and the resumption run in this process (`cli.main`, a new run object reading the directory back),
    sharing the persistent compilation cache with the killed subprocess; the straight run draws no plot (the resumed
    one does). Also the loop under Dr. GRPO (rows of prompt + completion longer than its constant
    L = max_new_tokens) with std advantages and CISPO's ratio, every step finite and applied; `test_dapo_step` runs
    DAPO, `test_loss_variants_through_the_loop` the rest, tests/test_quiet.py the r1zero job."""
    from deepjax import cli
    N = 4
    args = _args(base, f"--config.rl.steps={N}", "--config.train.checkpoint_every=2", "--config.rl.loss.aggregation=dr_grpo",
                 "--config.rl.loss.advantage_norm=std", "--config.rl.loss.ratio=cispo")
    capsys.readouterr()
    assert cli.main(["grpo", "tiny", "--workdir", str(base / "straight"), "--no-progress", *args,
                     "--config.train.plot=false"]) == 0
    assert "held-out (4 problems, k=2): pass@1" in capsys.readouterr().out
    killed = _grpo_cli(base / "resumed", args, {**compile_cache, TR.KILL_ENV: "3"})
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL, not a clean stop
    assert sorted(os.listdir(base / "resumed" / "checkpoints")) == ["2"]
    assert cli.main(["grpo", "tiny", "--workdir", str(base / "resumed"), "--no-progress", *args]) == 0
    assert "(GRPO step 2)" in capsys.readouterr().out

    cfg = load_config("tiny", args)
    finals = [_restore(base / d, cfg) for d in ("straight", "resumed")]
    (st1, s1, d1, _, e1), (st2, s2, d2, _, e2) = finals
    assert st1 == st2 == N and d1 == d2
    leaves1, leaves2 = jax.tree.leaves((s1, e1)), jax.tree.leaves((s2, e2))
    assert len(leaves1) == len(leaves2) > 10
    for a, b in zip(leaves1, leaves2):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(s1.step) == N * 2  # mu = 2 optimizer updates per GRPO step

    # the same rollouts and rewards at every step, and the same evaluations
    h1, h2 = (TR.read_history(base / d / "metrics.jsonl") for d in ("straight", "resumed"))
    assert sorted(h1) == sorted(h2) == list(range(1, N + 1))
    for s in h1:
        for k in ("reward", "accuracy", "format", "response_length", "loss", "kl", "example"):
            assert h1[s][k] == h2[s][k], (s, k)
    assert [h1[s].get("eval_pass@1") for s in h1] == [h2[s].get("eval_pass@1") for s in h1]
    assert [s for s in h1 if "eval_pass@1" in h1[s]] == [3, 4]  # every rl.eval.every = 3 steps, and the last
    for h in h1.values():  # two updates a step (the second one's policy differs from the sampler's), both applied
        assert np.isfinite(h["loss"]) and np.isfinite(h["grad_norm"]) and h["grad_norm"] > 0 and h["applied"] == 1, h
        assert "seq_ratio_mean" not in h, h  # CISPO's token weights, not GSPO's sequence ratio

    # learning happened: rewards varied within groups, the policy moved, its KL to the reference is positive,
    # and the sampler's log-probs of its own tokens equal the trainer's (first update, same params)
    assert any(h1[s]["adv_abs"] > 0 for s in h1)
    assert max(h1[s]["kl"] for s in h1) > 0
    assert max(h1[s]["sampler_trainer_logp_gap_max"] for s in h1) < 1e-4
    # routing replay is on for the MoE model: the rollouts carried the sampler's routes (the share of them the
    # trainer's own router would have chosen differently is reported; same params, so few if any)
    assert all(0 <= h1[s]["routing_mismatch"] < 0.05 for s in h1)
    base_state = _restore(base / "base", cfg, with_ref=False)[1]
    moved = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in
             zip(jax.tree.leaves(s1.params), jax.tree.leaves(base_state.params))]
    assert max(moved) > 0
    # the MTP modules are frozen (no gradient, and no weight decay either)
    for a, b in zip(jax.tree.leaves(s1.params["mtp"]), jax.tree.leaves(base_state.params["mtp"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the reference was refreshed at step 3 (rl.ref_refresh_every=3): it is neither the base nor the policy
    ref = jax.tree.leaves(e1["ref"])
    base_merged = jax.tree.leaves(nnx.merge_state(base_state.params, base_state.router_bias))
    policy = jax.tree.leaves(nnx.merge_state(s1.params, s1.router_bias))
    assert len(ref) == len(base_merged) == len(policy)
    assert any((np.asarray(r) != np.asarray(b)).any() for r, b in zip(ref, base_merged))
    assert any((np.asarray(r) != np.asarray(p)).any() for r, p in zip(ref, policy))

    # the run directory, and `deepjax eval` on it (it reads the policy, not the reference)
    d = base / "resumed"
    for f in ("config.json", "grpo_curves.png", "eval.jsonl"):
        assert os.path.getsize(d / f) > 0
    assert [e["step"] for e in TR.read_jsonl(d / "eval.jsonl")] == [3, 4]  # the killed run's step 3 once
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(d / "tb"))
    from deepjax.rl import evaluate
    # (its default batch of 64 rows: the in-loop evaluation's shape, whose compiled sampler it reuses)
    res = evaluate.run(str(d), k=2, problems=4, max_new_tokens=24, progress=False)
    assert res["step"] == N and len(res["problems"]) == 4


def test_dapo_step(base, tmp_path, monkeypatch):
    """DAPO through the loop: clip-higher, token-level mean, no KL term (no reference model kept); with truncated
    importance sampling against the sampler (the trainer recomputes pi_old; sampler and trainer agree here, so the
    weights are 1 and nothing is truncated).
    Also: the sampler, the old policy's log-probs and the update are held executables (deepjax/held_jit.py). Before
    the second step jax's caches are cleared, as a large trace on the GPU evicts them; nothing compiles again."""
    cfg = load_config("tiny", _args(base, "--config.rl.steps=2", "--config.rl.loss.mu=1", "--config.rl.eval.every=0",
                                    "--config.rl.eval.problems=2", "--config.rl.eval.k=1",
                                    "--config.rl.loss.aggregation=dapo", "--config.rl.loss.eps_high=0.28", "--config.rl.loss.beta=0",
                                    "--config.rl.loss.tis_cap=2",
                                    "--config.train.plot=false"))
    held = lambda run: (sum(h.compiles for h in SP._JITS.values()), UP._jit_logp_fn.compiles,  # noqa: E731
                        run._update.compiles)
    counts, iteration = [], loop.GRPORun.iteration

    def cleared_then_iteration(run, s):
        if s > 0:
            jax.clear_caches()
            counts.append(held(run))
        out = iteration(run, s)
        if s > 0:
            counts.append(held(run))
        return out
    monkeypatch.setattr(loop.GRPORun, "iteration", cleared_then_iteration)
    loop.grpo(cfg, str(tmp_path), progress=False)
    before, after = counts
    assert min(before) >= 1 and after == before, counts  # the sampler, pi_old's log-probs, the update: held
    h = TR.read_history(tmp_path / "metrics.jsonl")[2]
    assert np.isfinite(h["loss"]) and "kl" not in h  # beta = 0: no reference model, no KL
    assert h["tis_frac"] == 0 and abs(h["is_weight_mean"] - 1) < 1e-3


@pytest.mark.parametrize("aggregation,advantage_norm,ratio", [("grpo", "mean", "sequence")])
def test_loss_variants_through_the_loop(base, tmp_path, aggregation, advantage_norm, ratio):
    """The aggregations, advantage modes and ratios the tests above do not run (dr_grpo / std / cispo in the resume
    test, dapo / std / token in test_dapo_step) through `deepjax grpo`'s loop: one step of two updates (the second
    one's policy differs from the sampler's), finite and applied."""
    cfg = load_config("tiny", _args(base, "--config.rl.steps=1", "--config.rl.loss.mu=2", "--config.rl.eval.every=0",
                                    "--config.rl.eval.problems=2", "--config.rl.eval.k=1",
                                    f"--config.rl.loss.aggregation={aggregation}",
                                    f"--config.rl.loss.advantage_norm={advantage_norm}",
                                    f"--config.rl.loss.ratio={ratio}", "--config.train.plot=false"))
    loop.grpo(cfg, str(tmp_path), progress=False)
    hist = TR.read_history(tmp_path / "metrics.jsonl")
    h = hist[1]
    assert np.isfinite(h["loss"]) and np.isfinite(h["grad_norm"]) and h["grad_norm"] > 0 and h["applied"] == 1, h
    assert ("seq_ratio_mean" in h) == (ratio == "sequence"), h  # GSPO's sequence ratio is the one in use


def test_freeze_keeps_mtp_leaves():
    new = {"mtp": {"w": np.ones(2)}, "head": {"w": np.ones(2)}}
    old = {"mtp": {"w": np.zeros(2)}, "head": {"w": np.zeros(2)}}
    out = loop.freeze(new, old)
    assert (out["mtp"]["w"] == 0).all() and (out["head"]["w"] == 1).all()


@pytest.mark.parametrize("field,value,match", [
    ("rl.loss.group_size", "1", "rl.loss.group_size=1"), ("rl.rollout.top_p", "0", "rl.rollout.top_p=0"),
    ("rl.loss.aggregation", "mean", "rl.loss.aggregation='mean'"), ("rl.loss.eps_low", "1.5", "rl.loss.eps_low=1.5"),
    ("rl.loss.beta", "-1", "rl.loss.beta=-1"), ("rl.steps", "0", "rl.steps=0"),
    ("data.max_digits", "12", "data.max_digits=12"), ("data.ops", "+/", "data.ops='\\+/'"),
])
def test_bad_rl_and_task_settings_name_the_field(field, value, match):
    with pytest.raises(ConfigError, match=match):
        load_config("tiny", [f"--config.{field}={value}"])


def test_grpo_needs_a_verifiable_task(tmp_path):
    cfg = load_config("tiny", ["--config.data.source=text", f"--config.data.path={tmp_path}/x.txt"])
    with pytest.raises(ConfigError, match="data.source='text'"):
        loop.GRPORun(cfg, str(tmp_path / "run"))


def test_task_difficulty_options():
    default = tasks.generate("arithmetic", 30, 0, "train")
    assert default == tasks.generate("arithmetic", 30, 0, "train", max_digits=4, ops="+-*")
    assert default[0]["question"] == "Compute 3 + 415"  # the original task, draw for draw
    easy = tasks.generate("arithmetic", 100, 0, "train", max_digits=1, ops="+-")
    for ex in easy:
        a, op, b = tasks.example_meta(ex)["expression"].split()
        assert op in "+-" and 0 <= int(a) <= 9 and 0 <= int(b) <= 9
        assert rewards.accuracy_reward(ex, f"<think>x</think> <answer>{ex['answer']}</answer>") == 1.0
    mul = tasks.generate("arithmetic", 20, 0, "test", max_digits=2, ops="*")
    assert all(int(tasks.example_meta(e)["expression"].split()[0]) <= 99 for e in mul)
    with pytest.raises(ValueError, match="question space too small"):
        tasks.generate("arithmetic", 300, 0, "train", max_digits=1, ops="+-")


def test_r1zero_breakdown_by_hand():
    """The before / after figures pooled over problems, each with a bootstrap standard error over problems."""
    from deepjax.rl import r1zero
    problems = [  # 2 samples each: answers (None = no checkable answer), correct, majority_correct, re-checks, chars
        dict(answers=["1", "2"], correct=[True, False], majority_correct=True, n=2, n_rechecked=1, mean_chars=10.0),
        dict(answers=[None, "3"], correct=[False, True], majority_correct=True, n=2, n_rechecked=0, mean_chars=20.0),
        dict(answers=[None, None], correct=[False, False], majority_correct=False, n=2, n_rechecked=2,
             mean_chars=30.0)]
    b = r1zero.breakdown({"table": [{"k": 2}], "problems": problems}, resamples=400)
    assert b["k"] == 2 and b["n_problems"] == 3
    assert b["pass@1"] == pytest.approx(2 / 6) and b["cons@k"] == pytest.approx(2 / 3)
    assert b["pass@k"] == pytest.approx(2 / 3) and b["answered"] == pytest.approx(3 / 6)
    assert b["accuracy_when_answered"] == pytest.approx(2 / 3) and b["rechecked"] == pytest.approx(3 / 6)
    assert b["mean_chars"] == pytest.approx(20.0)
    # cons@k per problem is 1, 1, 0: its standard error over problems is about sqrt(p (1 - p) / n)
    assert b["se"]["cons@k"] == pytest.approx((2 / 9 / 3) ** 0.5, rel=0.2)
    same = dict(answers=["1"], correct=[True], majority_correct=True, n=1, n_rechecked=0, mean_chars=5.0)
    assert r1zero.breakdown({"table": [{"k": 1}], "problems": [same] * 4})["se"]["pass@1"] == 0.0
    table = r1zero.format_summary(b, b)
    assert "samples that re-check" in table and "±" in table and "mean length (characters)" in table


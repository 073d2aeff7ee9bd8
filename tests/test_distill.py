"""Distillation (`deepjax distill`, deepjax/rl/distill.py): the rejection filter on hand-made traces, each reason; the
logit-KD loss against a numpy hand computation (T^2 scaling, forward and reverse KL, the chunked form and its
gradient; a student equal to its teacher gets zero loss and gradient); the KD step with kd_alpha = 0 is the training
step (the KL still reported), and with the teacher a copy of the student it reports KL 0; a traces-mode run killed
with SIGKILL and resumed equals the straight run bitwise, a logits-mode run stopped and resumed too."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepjax import model as M
from deepjax.config import DistillConfig, load_config
from deepjax.data import datasets, tasks
from deepjax.errors import DataError
from deepjax.rl import distill
from deepjax.train import checkpoint as C
from deepjax.train import loop as T
from deepjax.train import optim
from deepjax.train import run as TR
from deepjax.train import step as TS
from deepjax.parallel import sharding as S

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = ["--config.data.template=plain", "--config.data.max_digits=1", "--config.data.ops=+-",
        "--config.data.num_train=150", "--config.data.num_test=20", "--config.data.seq_len=96",
        "--config.data.global_batch=8"]
# the runs' model: the tiny one without MoE layers and MTP (a third of the compile time; the KD step test above has
# both)
SMALL = ["--config.model.first_k_dense_replace=3", "--config.model.num_nextn_predict_layers=0"]

EX = {"question": "Compute 3 + 4", "answer": "7", "task": "arithmetic", "meta": json.dumps({"expression": "3 + 4"})}
GOOD = "<think>3 + 4 = 7</think> <answer>7</answer>"


# ---- the rejection filter -------------------------------------------------------------------------------------

@pytest.mark.parametrize("completion,finished,reason", [
    (GOOD, True, None),
    ("  <think>3 + 4 = 7</think>\n<answer> 7 </answer>\n", True, None),  # whitespace around the tags is R1 format
    (GOOD, False, "truncated"),  # no EOS: cut at max_new_tokens
    ("<think>3 + 4 = 7</think> The answer is 7.", True, "format"),  # free-form answer
    ("<think>3 + 4 = 7 <answer>7</answer></think> <answer>7</answer>", True, "format"),  # answer tags in the thinking
    ("<think>3 + 4 = 8</think> <answer>8</answer>", True, "wrong_answer"),
    ("<think>3 + 4</think> <answer>3 + 4</answer>", True, "wrong_answer"),  # echoing the question is not an answer
    ("<think>drei plus vier, café</think> <answer>7</answer>", True, "language"),  # é: not an English word
    ("<think>三加四等于七</think> <answer>7</answer>", True, "language"),
])
def test_filter_reasons(completion, finished, reason):
    assert distill.check_trace(EX, completion, finished, DistillConfig()) == reason


def test_filter_switches_and_stats():
    dc = DistillConfig()
    assert distill.language_consistent("<think>1 + 2 = 3</think> <answer>3</answer>")  # no words: consistent
    assert distill.language_consistent("Let me add: three plus four")
    assert not distill.language_consistent("Let me add 这个")
    # each switch off: that check no longer rejects (truncation always does)
    free = "<think>3 + 4 = 7</think> The answer is 7."
    assert distill.check_trace(EX, free, True, dataclasses.replace(dc, require_format=False)) == "wrong_answer"
    assert distill.check_trace(EX, free, True, dataclasses.replace(dc, require_format=False,
                                                                   require_correct=False)) is None
    cjk = "<think>三加四等于七</think> <answer>7</answer>"
    assert distill.check_trace(EX, cjk, True, dataclasses.replace(dc, require_language=False)) is None
    assert distill.check_trace(EX, cjk, True, dataclasses.replace(dc, language="zh")) is None
    off = dataclasses.replace(dc, require_format=False, require_correct=False, require_language=False)
    assert distill.check_trace(EX, GOOD, False, off) == "truncated"

    ex2 = tasks.generate("arithmetic", 1, 0, "train", max_digits=1, ops="+-")[0]
    good2 = tasks.sft_completion(ex2)
    samples = [[(GOOD, True), (GOOD, True), (GOOD, False), ("7", True), ("<think>x</think> <answer>8</answer>", True)],
               [("<think>é</think> <answer>x</answer>", True), (good2, True)]]
    kept, stats = distill.filter_traces([EX, ex2], samples, dataclasses.replace(dc, max_per_prompt=1))
    assert [(r["prompt"], r["sample"]) for r in kept] == [(0, 0), (1, 1)]
    assert stats["rejected"] == {"truncated": 1, "format": 1, "wrong_answer": 2, "language": 0,
                                 "per_prompt_limit": 1}
    # every check counted wherever it fails, whatever rejected the sample first
    assert stats["failed"] == {"truncated": 1, "format": 1, "wrong_answer": 3, "language": 1}
    assert (stats["samples"], stats["kept"], stats["prompts_with_a_trace"]) == (7, 2, 2)
    assert stats["kept"] + sum(stats["rejected"].values()) == stats["samples"]
    assert kept[1] == {"question": ex2["question"], "completion": good2, "answer": ex2["answer"], "task": "arithmetic",
                       "meta": ex2["meta"], "prompt": 1, "sample": 1}


def test_traces_source_trains_the_completion_verbatim(tmp_path):
    """A traces.jsonl line is a record of the `traces` data source whose SFT completion is the trace as sampled."""
    rec = {"question": "Compute 3 + 4", "completion": "  <think>odd  spacing</think>\n<answer>7</answer>",
           "answer": "7", "task": "arithmetic", "meta": "{}", "prompt": 0, "sample": 3}
    r = datasets.trace_record(rec, "t.jsonl:1")
    assert tasks.sft_completion(r) == rec["completion"]
    assert tasks.sft_completion({k: v.encode() for k, v in r.items()}) == rec["completion"]  # as TFDS gives it
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(DataError, match=f"{path}:1: expected a string field 'completion'"):
        list(datasets.read_traces([str(path)]))
    with pytest.raises(Exception, match="data.path"):
        load_config("tiny", ["--config.data.source=traces"])


# ---- the logit-KD loss --------------------------------------------------------------------------------------------

def _np_kl(s, t, T, direction):
    def log_softmax(x):
        x = x / T
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    ls, lt = log_softmax(s.astype(np.float64)), log_softmax(t.astype(np.float64))
    if direction == "forward":
        return (np.exp(lt) * (lt - ls)).sum(-1)
    return (np.exp(ls) * (ls - lt)).sum(-1)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kd_loss_against_a_hand_computation(direction):
    rng = np.random.default_rng(0)
    B, T_, D, E, V = 2, 7, 6, 5, 11
    hs, ht = rng.normal(size=(B, T_, D)).astype(np.float32), rng.normal(size=(B, T_, E)).astype(np.float32)
    ws, wt = rng.normal(size=(D, V)).astype(np.float32), rng.normal(size=(E, V)).astype(np.float32)
    mask = rng.random((B, T_)) < 0.6
    w = (mask / mask.sum()).astype(np.float32)  # the mean over the completion tokens
    s, t = hs @ ws, ht @ wt
    for temp in (1.0, 2.0, 0.5):
        want = temp ** 2 * (w * _np_kl(s, t, temp, direction)).sum()
        got = distill.kd_loss_from_logits(jnp.asarray(s), jnp.asarray(t), jnp.asarray(w), temp, direction)
        np.testing.assert_allclose(float(got), want, rtol=1e-5)
        for chunk in (None, 3, T_):  # chunks of positions, the last one padded
            got_c = distill.kd_loss(hs, ws, ht, wt, w, temp, direction, chunk=chunk)
            np.testing.assert_allclose(float(got_c), want, rtol=1e-5)
    # T^2: the KL at temperature T, scaled by T^2
    kl2 = float(distill.kd_loss_from_logits(s, t, w, 2.0, direction)) / 4
    np.testing.assert_allclose(kl2, (w * _np_kl(s, t, 2.0, direction)).sum(), rtol=1e-5)
    # the chunked form's gradient (each chunk recomputed in the backward) is the whole-logits one; none to the teacher
    ref = jax.grad(lambda a, b: distill.kd_loss_from_logits(a @ b, jnp.asarray(t), w, 2.0, direction), (0, 1))(hs, ws)
    got = jax.grad(lambda a, b, c, d: distill.kd_loss(a, b, c, d, w, 2.0, direction, chunk=3), (0, 1, 2, 3))(
        hs, ws, ht, wt)
    for a, b in zip(ref, got[:2]):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
    assert not np.asarray(got[2]).any() and not np.asarray(got[3]).any()
    # a student equal to its teacher: zero loss, zero gradient
    assert abs(float(distill.kd_loss(hs, ws, hs, ws, w, 2.0, direction))) < 1e-6
    g = jax.grad(lambda a: distill.kd_loss(a, ws, hs, ws, w, 2.0, direction))(hs)
    assert np.abs(np.asarray(g)).max() < 1e-6


def test_kd_step_with_alpha0_is_the_train_step():
    cfg = load_config("tiny")
    m = cfg.model
    graphdef, params = M.init(m, jax.random.key(0))
    teacher = jax.tree.map(lambda x: x * 1.5 if x.ndim >= 2 else x, params)  # another model of the same shape
    rng = np.random.default_rng(0)
    B, L = 2, 24
    tokens = jnp.asarray(rng.integers(3, 200, (B, L)), jnp.int32)
    mask = np.zeros((B, L), np.int32)
    mask[:, 10:] = 1  # completion tokens
    batch = TS.Batch(tokens, jnp.ones((B, L), jnp.int32), jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L)),
                     jnp.asarray(mask))
    optimizer, schedule = optim.make_optimizer(cfg.optim, TS.split_params(params)[0], 10)
    kw = dict(mtp_lambda=0.3, balance_alpha=1e-4, bias_update_speed=1e-3)
    dc0 = dataclasses.replace(cfg.distill, kd_alpha=0.0)
    kd_step = jax.jit(distill.make_kd_step(graphdef, m, graphdef, m, optimizer, dc0, schedule, **kw))
    train_step = jax.jit(TS.make_train_step(graphdef, m, optimizer, schedule, **kw))
    state = lambda: TS.init_state(jax.tree.map(jnp.copy, params), optimizer, 0)  # noqa: E731
    s_kd, m_kd = kd_step(state(), teacher, batch)
    s_tr, m_tr = train_step(state(), batch)
    assert float(m_kd["kd_loss"]) > 0  # still reported (a monitor) at alpha 0
    np.testing.assert_allclose(float(m_kd["loss"]), float(m_tr["loss"]), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(s_kd), jax.tree.leaves(s_tr)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)

    # the teacher a copy of the student: its logits are the student's, KL 0 (its gradient is 0: the kd_loss test)
    _, m_copy = kd_step(state(), params, batch)
    assert abs(float(m_copy["kd_loss"])) < 1e-5


# ---- a run killed and resumed -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny model after 30 SFT steps on one-digit arithmetic: weak, but it writes the format and finishes."""
    root = tmp_path_factory.mktemp("distill")
    cfg = load_config("tiny", TASK + SMALL + [f"--config.data.data_dir={root}/tfds", "--config.train.steps=30",
                                      "--config.optim.lr=3e-3", "--config.train.checkpoint_every=30",
                                      "--config.train.plot=false"])
    T.train(cfg, str(root / "teacher"), progress=False)
    return root


def _args(root, *extra):
    # the filter's correctness and format checks off: a 30-step teacher is rarely right (the checks are tested above)
    return TASK + SMALL + [f"--config.data.data_dir={root}/tfds", f"--config.distill.teacher={root}/teacher",
                   "--config.distill.prompts=16", "--config.distill.k=2", "--config.distill.batch=32",
                   "--config.distill.sampling.max_new_tokens=20", "--config.distill.require_correct=false",
                   "--config.distill.require_format=false", "--config.distill.eval_problems=0",
                   "--config.train.steps=4", "--config.train.checkpoint_every=2", "--config.train.plot=false",
                   "--config.train.log_every=1", "--config.optim.schedule=constant", "--config.optim.warmup_steps=0",
                   "--config.seed=1", *extra]


def _restore(workdir, cfg):
    mesh, rules = S.make_mesh(cfg.mesh), S.rules_for(cfg.mesh.rules)
    *_, abstract = TR.abstract_train_state(cfg, mesh, rules)
    ck = C.Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        return ck.restore(abstract)
    finally:
        ck.close()


def test_traces_run_killed_and_resumed_equals_the_straight_run(teacher, capsys):
    from deepjax import cli
    args = _args(teacher)
    assert cli.main(["distill", "tiny", "--workdir", str(teacher / "straight"), "--no-progress", *args]) == 0
    out = capsys.readouterr().out
    assert "[2/2] student: SFT on" in out and "traces: " in out and "student step 4: loss" in out

    env = dict(os.environ, **{TR.KILL_ENV: "2"})
    killed = subprocess.run([sys.executable, "-m", "deepjax", "distill", "tiny", "--workdir", str(teacher / "resumed"),
                             "--no-progress", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL in the student's stage, after step 2
    assert sorted(os.listdir(teacher / "resumed" / "student" / "checkpoints")) == ["2"]
    assert cli.main(["distill", "tiny", "--workdir", str(teacher / "resumed"), "--no-progress", *args]) == 0
    out = capsys.readouterr().out
    assert "traces already there" in out and "(step 2)" in out

    # the same traces, the same student
    for d in ("straight", "resumed"):
        stats = json.load(open(teacher / d / "traces" / "stats.json"))
        assert stats["kept"] > 0 and stats["kept"] + sum(stats["rejected"].values()) == stats["samples"] == 32
    t1, t2 = (open(teacher / d / "traces" / "traces.jsonl").read() for d in ("straight", "resumed"))
    assert t1 == t2
    scfg = distill.student_config(load_config("tiny", args), teacher / "straight")
    (st1, s1, d1, c1), (st2, s2, d2, _) = (_restore(teacher / d / "student", scfg) for d in ("straight", "resumed"))
    assert st1 == st2 == 4 and d1 == d2 and c1["data"]["source"] == "traces"
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    h1, h2 = (TR.read_history(teacher / d / "student" / "metrics.jsonl") for d in ("straight", "resumed"))
    assert sorted(h1) == sorted(h2) == [1, 2, 3, 4] and all(h1[s]["loss"] == h2[s]["loss"] for s in h1)
    summary = json.load(open(teacher / "resumed" / "distill.json"))
    assert summary["mode"] == "traces" and summary["traces"]["kept"] == stats["kept"]

    # other trace settings in the same work directory are refused, in one line
    assert cli.main(["distill", "tiny", "--workdir", str(teacher / "resumed"), "--no-progress", *args,
                     "--config.distill.k=3"]) == 2
    assert "holds traces made with other settings (k)" in capsys.readouterr().err


def test_logits_run_stopped_and_resumed_equals_the_straight_run(teacher):
    """mode=logits (the KD step in the student's run, the teacher on its mesh): 2 steps then 2 more (a resumed run,
    train.steps raised; constant learning rate) equal 4 straight steps; the KL falls."""
    args = _args(teacher, "--config.distill.mode=logits", "--config.distill.kd_alpha=0.7",
                 "--config.distill.kd_temperature=2", "--config.optim.lr=3e-3")
    cfg = load_config("tiny", args)
    distill.run(cfg, teacher / "kd_straight", progress=False)
    distill.run(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=2)), teacher / "kd_resumed",
                progress=False)
    out = distill.run(cfg, teacher / "kd_resumed", progress=False)
    assert out["mode"] == "logits" and out["student"]["step"] == 4 and "traces" not in out
    (st1, s1, d1, _), (st2, s2, d2, _) = (_restore(teacher / d / "student", cfg) for d in ("kd_straight", "kd_resumed"))
    assert st1 == st2 == 4 and d1 == d2
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    h = TR.read_history(teacher / "kd_straight" / "student" / "metrics.jsonl")
    assert sorted(h) == [1, 2, 3, 4] and h[4]["kd_loss"] < h[1]["kd_loss"]
    assert all(abs(h[s]["objective"] - (0.7 * h[s]["kd_loss"] + 0.3 * h[s]["loss"])) < 1e-4 for s in h)

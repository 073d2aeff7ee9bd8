"""Distillation (`deepjax distill`, deepjax/rl/distill.py): the rejection filter on hand-made traces, each reason; the
logit-KD loss against a numpy hand computation (T^2 scaling, forward and reverse KL, the chunked form and its
gradient; a student equal to its teacher gets zero loss and gradient); the KD step with kd_alpha = 0 is the training
step (the KL still reported), and with the teacher a copy of the student it reports KL 0; a traces-mode run killed
with SIGKILL and resumed equals the straight run bitwise, a logits-mode run stopped and resumed too (and with
distill.on_policy=0 it never samples). On-policy steps: the loss on the student's own samples against a numpy hand
computation over the sampled positions only; the step schedule; config errors; an on-policy run stopped and resumed
equals the straight run."""

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
from deepjax.data import datasets, pipeline, tasks
from deepjax.data.tokenizer import load_tokenizer
from deepjax.errors import DataError
from deepjax.infer import sampling as SP
from deepjax.infer import text
from deepjax.rl import distill
from deepjax.train import checkpoint as C
from deepjax.train import loop as T
from deepjax.train import optim
from deepjax.train import run as TR
from deepjax.train import step as TS
from deepjax.parallel import sharding as S
from deepjax.schema import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = ["--config.data.template=plain", "--config.data.max_digits=1", "--config.data.ops=+-",
        "--config.data.num_train=150", "--config.data.num_test=20", "--config.data.seq_len=96",
        "--config.data.global_batch=8"]
# the runs' model: the tiny one without MoE layers and MTP (a third of the compile time; the KD step test above has
# both)
SMALL = ["--config.model.first_k_dense_replace=3", "--config.model.num_nextn_predict_layers=0"]

CACHE = {"jax_compilation_cache_dir": None, "jax_persistent_cache_min_compile_time_secs": 0.0,
         "jax_persistent_cache_min_entry_size_bytes": 0}


@pytest.fixture(scope="module", autouse=True)
def _compile_once(tmp_path_factory):
    """A persistent compilation cache for this module: the runs below build the same jitted programs again (a straight
    run, a stopped one, its resumption: each a new run object; the SIGKILLed subprocess gets it through the
    environment), and each is compiled once. The executables are the ones a compile makes, so results are the same."""
    from conftest import persistent_compile_cache
    CACHE["jax_compilation_cache_dir"] = str(tmp_path_factory.mktemp("jax_cache"))
    with persistent_compile_cache(CACHE["jax_compilation_cache_dir"]):
        yield


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
    init = jax.jit(lambda p: TS.init_state(p, optimizer, 0))  # fresh buffers each call, not op by op
    state = lambda: init(params)  # noqa: E731
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

    env = dict(os.environ, **{TR.KILL_ENV: "2"}, **{k.upper(): str(v) for k, v in CACHE.items()})
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


def test_logits_run_stopped_and_resumed_equals_the_straight_run(teacher, monkeypatch):
    """mode=logits (the KD step in the student's run, the teacher on its mesh): 2 steps then 2 more (a resumed run,
    train.steps raised; constant learning rate) equal 4 straight steps; the KL falls. distill.on_policy=0 (the
    default) never samples and logs no on-policy fields."""
    def no_sampling(*a, **k):
        raise AssertionError("distill.on_policy=0 sampled")
    monkeypatch.setattr(text, "complete", no_sampling)
    args = _args(teacher, "--config.distill.mode=logits", "--config.distill.kd_alpha=0.7",
                 "--config.distill.kd_temperature=2", "--config.optim.lr=3e-3")
    cfg = load_config("tiny", args)
    assert cfg.distill.on_policy == 0
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
    assert not any("on_policy" in h[s] for s in h)


# ---- on-policy steps ----------------------------------------------------------------------------------------------

def test_on_policy_schedule_and_config_errors(tmp_path, capsys):
    assert [distill.is_on_policy(s, 0.5) for s in range(1, 7)] == [False, True] * 3
    assert [s for s in range(1, 13) if distill.is_on_policy(s, 0.25)] == [4, 8, 12]
    assert sum(distill.is_on_policy(s, 0.3) for s in range(1, 101)) == 30
    assert not any(distill.is_on_policy(s, 0.0) for s in range(1, 50))
    assert all(distill.is_on_policy(s, 1.0) for s in range(1, 50))
    for bad in ("1.5", "-0.1", "nan"):
        with pytest.raises(ConfigError, match="distill.on_policy"):
            load_config("tiny", [f"--config.distill.on_policy={bad}"])
    # no prompts to sample from (plain text; pretrain masks), or not logit distillation: one line, status 2
    from deepjax import cli
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some plain text\n")
    base = ["--config.distill.on_policy=0.5", f"--config.distill.teacher={tmp_path}", "--no-progress"]
    for extra, why in [(["--config.distill.mode=logits", "--config.data.source=text", f"--config.data.path={corpus}"],
                        "data.source='text' has no prompts"),
                       (["--config.distill.mode=logits", "--config.data.mode=pretrain"], "data.mode='pretrain'"),
                       ([], "set distill.mode=logits")]:
        assert cli.main(["distill", "tiny", "--workdir", str(tmp_path / "w"), *base, *extra]) == 2
        err = capsys.readouterr().err
        assert "distill.on_policy=0.5" in err and why in err and "Traceback" not in err and err.count("\n") == 1


def test_on_policy_loss_against_a_hand_computation():
    """The student completes the first document's prompt of each packed row; the on-policy loss (KD term alone, reverse
    KL at T = 2) is T^2 x the mean over exactly the positions that predict a sampled token of the numpy KL of the two
    models' full logits."""
    cfg = load_config("tiny", TASK + SMALL + ["--config.distill.kd_direction=reverse"])
    m, dc = cfg.model, distill.on_policy_config(cfg.distill)
    assert dc.kd_alpha == 1.0 and dc.kd_direction == "reverse"
    graphdef, params = M.init(m, jax.random.key(0))
    teacher = jax.tree.map(lambda x: x * 1.5 if x.ndim >= 2 else x, params)
    tok = load_tokenizer(cfg.data.tokenizer)
    B, L = 8, 112
    docs = [pipeline.Tokenize(tok, "sft", "plain", L, False).map(ex)
            for ex in tasks.generate("arithmetic", 2 * B, 0, "train", max_digits=1, ops="+-")]
    rows = {k: np.zeros((B, L), np.int32) for k in ("tokens", "segment_ids", "positions", "target_mask")}
    for b in range(B):  # two documents packed in each row
        at = 0
        for d, doc in enumerate(docs[2 * b:2 * b + 2]):
            n = len(doc["tokens"])
            for k, v in (("tokens", doc["tokens"]), ("target_mask", doc["target_mask"]), ("segment_ids", d + 1),
                         ("positions", np.arange(n))):
                rows[k][b, at:at + n] = v
            at += n
    prompts = distill.batch_prompts(rows["tokens"], rows["segment_ids"], rows["target_mask"])
    assert prompts == [list(docs[2 * b]["tokens"][:int(np.argmax(docs[2 * b]["target_mask"]))]) for b in range(B)]

    mesh, rules = S.make_mesh(cfg.mesh), S.rules_for(cfg.mesh.rules)
    c = text.complete(graphdef, params, tok, prompts, jax.random.key(3), SP.SamplingConfig(max_new_tokens=8),
                      mesh, rules)
    batch = distill.samples_batch(c, L, tok.pad_id)
    P, N = c.prompt_lengths, c.lengths
    assert N.min() > 0
    for b in range(B):  # prompt, then the sampled tokens (the only targets), then padding
        p, n = P[b], N[b]
        np.testing.assert_array_equal(batch.tokens[b, :p + n], np.concatenate([prompts[b], c.tokens[b, :n]]))
        assert (batch.tokens[b, p + n:] == tok.pad_id).all()
        assert np.flatnonzero(batch.target_mask[b]).tolist() == list(range(p, p + n))
    cut = distill.samples_batch(c, int(P.max()) + 3, tok.pad_id)  # completions cut to fit seq_len
    assert cut.target_mask.sum(1).tolist() == np.minimum(N, P.max() + 3 - P).tolist()

    trainable, bias = TS.split_params(params)
    total, (metrics, _) = jax.jit(lambda tr, bi, te, b: distill.kd_lm_loss(
        tr, bi, te, graphdef, graphdef, b, m, m, dc, 0.3, 1e-4))(trainable, bias, teacher, TS.Batch(*batch))
    s_logits, t_logits = (np.asarray(M.jit_forward(graphdef, p_, batch.tokens, batch.positions,
                                                   batch.segment_ids).logits) for p_ in (params, teacher))
    kl = [_np_kl(s_logits[b, j], t_logits[b, j], 2.0, "reverse")  # position j predicts token j + 1
          for b in range(B) for j in range(P[b] - 1, P[b] + N[b] - 1)]
    want = 4.0 * np.mean(kl)
    np.testing.assert_allclose(float(metrics["kd_loss"]), want, rtol=1e-4)
    np.testing.assert_allclose(float(total), want, rtol=1e-4)  # no cross-entropy on the samples (dense: no balance)
    assert float(metrics["objective"]) == float(metrics["kd_loss"]) and metrics["target_tokens"] == N.sum()


def test_on_policy_run_stopped_and_resumed_equals_the_straight_run(teacher):
    """distill.on_policy=0.5: steps 2 and 4 train on the student's samples, 1 and 3 on the data; 2 steps then 2 more
    (resumed from step 2's checkpoint) equal 4 straight steps, the same samples (each step's key from the seed and
    the step) and the same batches."""
    args = _args(teacher, "--config.distill.mode=logits", "--config.distill.kd_direction=reverse",
                 "--config.distill.on_policy=0.5", "--config.distill.on_policy_sampling.max_new_tokens=12",
                 "--config.optim.lr=3e-3")
    cfg = load_config("tiny", args)
    distill.run(cfg, teacher / "op_straight", progress=False)
    distill.run(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=2)), teacher / "op_resumed",
                progress=False)
    out = distill.run(cfg, teacher / "op_resumed", progress=False)
    assert out["student"]["step"] == 4 and out["student"]["on_policy"] == 1
    (st1, s1, d1, _), (st2, s2, d2, _) = (_restore(teacher / d / "student", cfg) for d in ("op_straight", "op_resumed"))
    assert st1 == st2 == 4 and d1 == d2
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    h1, h2 = (TR.read_history(teacher / d / "student" / "metrics.jsonl") for d in ("op_straight", "op_resumed"))
    assert [h1[s]["on_policy"] for s in sorted(h1)] == [0, 1, 0, 1]
    for s in h1:
        assert all(h1[s][k] == h2[s][k] for k in ("data", "kd_loss", "loss", "objective", "target_tokens"))
    for s in (2, 4):  # the KD term alone on the student's samples, one target per sampled token
        assert h1[s]["objective"] == h1[s]["kd_loss"] and h1[s]["response_length"] == h2[s]["response_length"]
        assert h1[s]["target_tokens"] == round(8 * h1[s]["response_length"])

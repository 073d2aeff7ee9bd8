"""Training: data pipeline (packing, masks, determinism), optimizer, the train step (accumulation, non-finite
guard, aux-loss-free bias update), checkpoints (damage, interrupted writes, other meshes) and the loop (exact
resume after SIGKILL, stopping on non-finite steps, the tiny model learning arithmetic)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from deepjax.train import checkpoint as C
from deepjax.data import datasets
from deepjax.model import moe
from deepjax.train import optim
from deepjax.data import pipeline
from deepjax.data import tasks
from deepjax import model as M
from deepjax.parallel import sharding as S
from deepjax.train import loop as T
from deepjax.train import run as TR
from deepjax.train import step as TS
from deepjax.config import ConfigError, DataConfig, MeshConfig, OptimConfig, load_config
from deepjax.data.tokenizer import ByteTokenizer, plain_prompt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK = ByteTokenizer()


def small_args(tmp, *extra):
    """A CPU-sized run of the tiny model on the arithmetic task."""
    return ["--config.data.template=plain", "--config.data.seq_len=96", "--config.data.global_batch=8",
            "--config.data.num_train=400", "--config.data.num_test=20", f"--config.data.data_dir={tmp}/tfds",
            "--config.train.log_every=1", "--config.train.plot=true", *extra]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def sources(data_dir):
    return datasets.build(DataConfig(num_train=400, num_test=20), data_dir)


def _dc(**kw):
    base = dict(num_train=400, num_test=20, template="plain", seq_len=128)
    return DataConfig(**{**base, **kw})


def _take(it, n):
    return [next(it) for _ in range(n)]


# ---------------------------------------------------------------------------------------------------- pipeline


def test_packing_positions_and_sft_masks(sources):
    b = next(pipeline.make_iterator(_dc(), TOK, sources["train"], 4))
    assert set(b) == set(pipeline.FIELDS) and all(v.shape == (4, 128) and v.dtype == np.int32 for v in b.values())
    questions = {tasks.as_example(sources["train"][i])["question"]: tasks.as_example(sources["train"][i])
                 for i in range(len(sources["train"]))}
    n_docs = 0
    for r in range(4):
        seg, pos, tok, mask = (b[k][r] for k in ("segment_ids", "positions", "tokens", "target_mask"))
        assert (mask[seg == 0] == 0).all()
        for s in range(1, seg.max() + 1):
            sel = seg == s
            idx = np.nonzero(sel)[0]
            assert (np.diff(idx) == 1).all(), "a document is contiguous"
            np.testing.assert_array_equal(pos[sel], np.arange(sel.sum()))
            prompt, completion = TOK.decode(tok[sel & (mask == 0)]), TOK.decode(tok[sel & (mask == 1)])
            assert prompt.startswith("<bos>Question: ")
            ex = questions[prompt[len("<bos>"):][len("Question: "):-len("\nAnswer:")]]
            assert prompt == "<bos>" + plain_prompt(ex["question"])
            assert completion == tasks.sft_completion(ex) + "<eos>"
            n_docs += 1
    assert n_docs > 4, "rows hold several packed documents"
    pre = next(pipeline.make_iterator(_dc(mode="pretrain"), TOK, sources["train"], 4))
    np.testing.assert_array_equal(pre["target_mask"], (pre["segment_ids"] > 0).astype(np.int32))


def test_loss_targets_stay_inside_documents(sources):
    b = next(pipeline.make_iterator(_dc(), TOK, sources["train"], 4))
    batch = TS.Batch(**{k: jnp.asarray(v) for k, v in b.items()})
    for k in range(2):
        targets, valid = map(np.asarray, TS.depth_targets(batch, k))
        seg = b["segment_ids"]
        for r, t in zip(*np.nonzero(valid)):
            assert seg[r, t + k + 1] == seg[r, t] > 0 and b["target_mask"][r, t + k + 1] == 1
            assert targets[r, t] == b["tokens"][r, t + k + 1]
        # the last token of each document predicts nothing
        last = (seg > 0) & (np.pad(seg[:, 1:], ((0, 0), (0, 1))) != seg)
        assert not valid[last].any()


def test_packed_documents_never_attend_to_each_other(sources):
    """Logits of a document inside a packed row equal those of the document run alone."""
    cfg = load_config("tiny").model
    graphdef, params = M.init(cfg, jax.random.key(0))
    b = next(pipeline.make_iterator(_dc(), TOK, sources["train"], 4))
    row = int(np.argmax(b["segment_ids"].max(1)))
    seg = b["segment_ids"][row]
    assert seg.max() >= 2
    out = M.jit_forward(graphdef, params, *(jnp.asarray(b[k][row:row + 1]) for k in ("tokens", "positions",
                                                                                   "segment_ids")))
    for s in range(1, seg.max() + 1):
        sel = seg == s
        alone = M.jit_forward(graphdef, params, jnp.asarray(b["tokens"][row][sel][None]))
        np.testing.assert_allclose(np.asarray(out.logits[0][sel]), np.asarray(alone.logits[0]), rtol=1e-5,
                                   atol=1e-5)


def test_pipeline_is_deterministic_resumable_and_split_by_host(sources):
    src = sources["train"]
    a = _take(pipeline.make_iterator(_dc(), TOK, src, 4), 3)
    b = _take(pipeline.make_iterator(_dc(), TOK, src, 4), 3)
    assert [pipeline.fingerprint(x) for x in a] == [pipeline.fingerprint(x) for x in b]
    other = next(pipeline.make_iterator(_dc(seed=1), TOK, src, 4))
    assert pipeline.fingerprint(other) != pipeline.fingerprint(a[0])
    it = pipeline.make_iterator(_dc(), TOK, src, 4)
    _take(it, 2)
    state = json.loads(json.dumps(it.get_state()))  # it travels as JSON in the checkpoint
    resumed = pipeline.make_iterator(_dc(), TOK, src, 4, state=state)
    assert pipeline.fingerprint(next(resumed)) == pipeline.fingerprint(a[2])

    def docs(batch):
        out = set()
        for r in range(batch["tokens"].shape[0]):
            for s in range(1, batch["segment_ids"][r].max() + 1):
                out.add(tuple(batch["tokens"][r][batch["segment_ids"][r] == s]))
        return out

    hosts = [set().union(*map(docs, _take(pipeline.make_iterator(_dc(), TOK, src, 2, p, 2), 3))) for p in (0, 1)]
    assert hosts[0] and hosts[1] and not hosts[0] & hosts[1]


def test_text_documents_are_chunked_to_the_row_length(tmp_path):
    (tmp_path / "a.txt").write_text("lorem ipsum dolor " * 40)
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "short doc"}) + "\n")
    dc = DataConfig(source="text", path=f"{tmp_path}/a.txt,{tmp_path}/b.jsonl", mode="pretrain", seq_len=32)
    src = datasets.build(dc, str(tmp_path / "tfds"))["train"]
    batches = _take(pipeline.make_iterator(dc, TOK, src, 2), 12)
    text = "".join(TOK.decode(b["tokens"][r][b["segment_ids"][r] > 0]) for b in batches for r in range(2))
    assert "lorem ipsum dolor lorem" in text and "short doc" in text
    for b in batches:
        np.testing.assert_array_equal(b["target_mask"], (b["segment_ids"] > 0).astype(np.int32))


def test_example_longer_than_a_row_is_a_clear_error(sources):
    with pytest.raises(ValueError, match=r"longer than data.seq_len=16"):
        next(pipeline.make_iterator(_dc(seq_len=16), TOK, sources["train"], 2))


# --------------------------------------------------------------------------------------------------- optimizer


def test_deepseek_v3_schedule_shape():
    o = OptimConfig(lr=2.2e-4, schedule="deepseek_v3", warmup_steps=10, constant_steps=20, decay_steps=30,
                    final_ratio=0.1, tail_ratio=7.3e-6 / 2.2e-4, tail_steps=10)
    f = optim.schedule(o, 100)
    v = lambda s: float(f(s))  # noqa: E731
    assert v(0) == 0 and v(5) == pytest.approx(1.1e-4)
    assert v(10) == pytest.approx(2.2e-4) and v(29) == pytest.approx(2.2e-4)
    assert 2.2e-5 < v(45) < 2.2e-4
    assert v(60) == pytest.approx(2.2e-5) and v(89) == pytest.approx(2.2e-5)
    assert v(90) == pytest.approx(7.3e-6) and v(99) == pytest.approx(7.3e-6)
    g = optim.schedule(OptimConfig(lr=1.0, warmup_steps=4, final_ratio=0.1), 20)
    assert float(g(4)) == pytest.approx(1.0) and float(g(20)) == pytest.approx(0.1)
    assert float(optim.schedule(OptimConfig(lr=1.0, schedule="constant", warmup_steps=0), 20)(0)) == 1.0


def test_weight_decay_on_matrices_only():
    _, params = M.abstract_init(load_config("tiny").model)
    mask = optim.decay_mask(TS.split_params(params)[0])
    flat = {M.path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
    assert flat["embed"] and flat["head"] and flat["moe_layers.attn.wkv_a"]  # stacked: rank 3, decayed
    assert flat["moe_layers.ffn.w_gate"] and flat["mtp.0.eh_proj"]
    assert {k for k, v in flat.items() if not v} == {k for k in flat if "norm" in k}  # norms only
    assert "moe_layers.ffn.bias" not in flat  # router biases are not the optimizer's


# -------------------------------------------------------------------------------------------------- train step


@pytest.fixture(scope="module")
def step_setup(sources):
    cfg = load_config("tiny").model
    graphdef, params = M.init(cfg, jax.random.key(0))
    b = next(pipeline.make_iterator(_dc(), TOK, sources["train"], 8))
    return cfg, graphdef, params, TS.Batch(**{k: jnp.asarray(v) for k, v in b.items()})


def _run_step(setup, optimizer, **kw):
    cfg, graphdef, params, batch = setup
    state = TS.init_state(params, optimizer, 0)
    step = jax.jit(TS.make_train_step(graphdef, cfg, optimizer, **kw))
    return state, *step(state, batch)


@pytest.fixture(scope="module")
def adamw_step(step_setup):
    """(AdamW, its jitted train step with the default bias_update_speed 1e-3): compiled once for the tests below."""
    cfg, graphdef, params, _ = step_setup
    opt = optim.adamw(1e-3, TS.split_params(params)[0])
    return opt, jax.jit(TS.make_train_step(graphdef, cfg, opt))


def test_micro_batches_equal_the_whole_batch(step_setup):
    sgd = optax.sgd(0.1)
    _, s1, m1 = _run_step(step_setup, sgd, micro_batches=1)
    _, s2, m2 = _run_step(step_setup, sgd, micro_batches=4)
    for k in ("loss", "mtp_loss", "balance_loss", "grad_norm", "target_tokens"):
        np.testing.assert_allclose(m2[k], m1[k], rtol=2e-5, err_msg=k)
    np.testing.assert_array_equal(m2["maxvio"], m1["maxvio"])
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(s1.router_bias), jax.tree.leaves(s2.router_bias)):
        np.testing.assert_array_equal(a, b)  # same global loads -> same sign update


def test_step_updates_bias_outside_the_optimizer(step_setup, adamw_step):
    opt, step = adamw_step  # bias_update_speed=1e-3
    state = TS.init_state(step_setup[2], opt, 0)
    new, m = step(state, step_setup[3])
    assert int(new.step) == 1 and int(m["applied"]) == 1
    moved = [np.abs(np.asarray(b) - np.asarray(a)) for a, b in
             zip(jax.tree.leaves(state.router_bias), jax.tree.leaves(new.router_bias))]
    assert all(np.allclose(d[d > 0], 1e-3) for d in moved) and any((d > 0).any() for d in moved)
    # the optimizer state holds no moments for the biases
    n_opt = sum(x.size for x in jax.tree.leaves(new.opt_state))
    n_params = sum(x.size for x in jax.tree.leaves(new.params))
    assert n_opt == 2 * n_params + 1  # Adam mu, nu and a count
    _, frozen, _ = _run_step(step_setup, opt, bias_update_speed=0.0)
    for a, b in zip(jax.tree.leaves(state.router_bias), jax.tree.leaves(frozen.router_bias)):
        np.testing.assert_array_equal(a, b)


def test_nonfinite_step_is_not_applied_and_never_saved(step_setup, adamw_step, tmp_path):
    cfg, graphdef, params, batch = step_setup
    trainable, bias = TS.split_params(params)
    poisoned = jax.tree_util.tree_map_with_path(
        lambda p, x: x.at[0, 0].set(jnp.nan) if M.path_str(p).split(".")[0] == "head" else x, trainable)
    assert not bool(TS.state_is_finite(TS.TrainState(0, poisoned, bias, (), 0, 0, 0)))
    opt, step = adamw_step
    state = TS.init_state(nnx_merge(poisoned, bias), opt, 0)
    new, m = step(state, batch)
    assert int(m["applied"]) == 0 and int(new.nonfinite_streak) == 1 and int(new.nonfinite_total) == 1
    assert int(new.step) == 1
    for a, b in zip(jax.tree.leaves((state.params, state.opt_state, state.router_bias)),
                    jax.tree.leaves((new.params, new.opt_state, new.router_bias))):
        np.testing.assert_array_equal(a, b)
    ck = C.Checkpointer(str(tmp_path / "ck"), async_save=False)
    with pytest.raises(C.CheckpointError, match="step 1: the state holds non-finite values"):
        ck.save(1, new, {}, {})
    assert ck.steps() == []


def nnx_merge(trainable, bias):
    from flax import nnx
    return nnx.merge_state(trainable, bias)


def test_bias_update_balances_a_skewed_router():
    """The aux-loss-free rule alone (no gradient) drives a skewed sigmoid router toward balance."""
    cfg = load_config("tiny").model  # noaux_tc, 8 experts in groups, top-2
    E = cfg.n_routed_experts
    rng = np.random.default_rng(0)
    logits_TE = jnp.asarray(rng.normal(size=(512, E)) + np.linspace(2.0, -2.0, E), jnp.float32)  # skewed
    bias = {"moe_layers": {"router_bias": jnp.zeros((1, E), jnp.float32)}}
    valid = jnp.ones((1, 512), bool)

    def load_of(b):
        _, idx, _ = moe.route(logits_TE, b["moe_layers"]["router_bias"][0], cfg)
        return moe.expert_load(idx[None], valid, E)[None]

    start = float(TS.max_violation(load_of(bias))[0])
    for _ in range(400):
        bias = TS.update_router_bias(bias, (load_of(bias), None), 0.01)
    end = float(TS.max_violation(load_of(bias))[0])
    assert start > 1.5 and end < 0.35, (start, end)


# ------------------------------------------------------------------------------------------------- checkpoints


def _ck_state(seed=0):
    return {"w": jnp.arange(1000, dtype=jnp.float32) + seed, "step": jnp.int32(seed)}


def test_damaged_checkpoint_names_step_and_file_and_falls_back_when_told(tmp_path):
    ck = C.Checkpointer(str(tmp_path), keep=5, async_save=False)
    for s in (1, 2):
        assert ck.save(s, _ck_state(s), {"next": s}, {"model": {}})
    ck.wait()
    # a write cut off before Orbax's rename: never listed, never restored
    os.makedirs(tmp_path / "3.orbax-checkpoint-tmp-1234567" / "state")
    (tmp_path / "3.orbax-checkpoint-tmp-1234567" / "state" / "partial").write_bytes(b"\0" * 10)
    ck2 = C.Checkpointer(str(tmp_path), keep=5, async_save=False)
    assert ck2.steps() == [1, 2]
    step, state, data, _ = ck2.restore(jax.eval_shape(_ck_state))
    assert step == 2 and data == {"next": 2} and float(state["w"][0]) == 2.0
    # damage step 2: truncate its largest file
    files = [os.path.join(r, n) for r, _, ns in os.walk(tmp_path / "2") for n in ns if n != C.MANIFEST]
    victim = max(files, key=os.path.getsize)
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    with pytest.raises(C.CheckpointError) as e:
        ck2.restore(jax.eval_shape(_ck_state))
    assert "step 2" in str(e.value) and victim in str(e.value) and "fallback_on_damage" in str(e.value)
    step, state, data, _ = ck2.restore(jax.eval_shape(_ck_state), fallback=True)
    assert step == 1 and data == {"next": 1} and float(state["w"][0]) == 1.0


def test_restore_onto_a_different_mesh(tmp_path):
    cfg = load_config("tiny").model
    saved_mesh = S.make_mesh(MeshConfig(fsdp=8))
    rules = S.rules_for("fsdp_expert_tensor")
    _, params, _ = M.init_sharded(cfg, jax.random.key(0), saved_mesh, rules)
    opt = optim.adamw(1e-3, TS.split_params(params)[0])
    state = TS.init_state(params, opt, 0)
    ck = C.Checkpointer(str(tmp_path), async_save=False)
    ck.save(7, state, {"next": 1}, {"model": {}})
    new_mesh = S.make_mesh(MeshConfig(data=2, fsdp=2, expert=2))
    abstract = jax.eval_shape(lambda: state)
    sh = TS.state_shardings(abstract, new_mesh, rules)
    step, restored, _, _ = ck.restore(S.abstract_with_shardings(abstract, sh))
    assert step == 7
    for a, b, s in zip(jax.tree.leaves(state), jax.tree.leaves(restored), jax.tree.leaves(sh)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert b.sharding.mesh.shape == new_mesh.shape and b.sharding.spec == s.spec


# ------------------------------------------------------------------------------------------------------ the loop


def _train_cli(workdir, args, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "deepjax", "train", "tiny", "--workdir", str(workdir),
                           "--no-progress", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _history(workdir):
    return TR.read_history(os.path.join(workdir, "metrics.jsonl"))



def assert_same_final_state(checkpoint_dirs, abstract, step: int):
    """The newest checkpoint of each directory is `step`, and their states (params, optimizer state, router biases,
    RNG, counters) and data-iterator states are bitwise equal; returns the first state."""
    finals = []
    for d in checkpoint_dirs:
        ck = C.Checkpointer(d)
        got, state, data, _ = ck.restore(abstract)
        ck.close()
        assert got == step
        finals.append((state, data))
    (s1, d1), (s2, d2) = finals
    assert d1 == d2
    leaves1, leaves2 = jax.tree.leaves(s1), jax.tree.leaves(s2)
    assert len(leaves1) == len(leaves2) > 10
    for a, b in zip(leaves1, leaves2):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    return s1

def test_resume_after_sigkill_is_bitwise_exact(tmp_path, data_dir, compile_cache, capsys):
    """`deepjax train` straight to step 4, and in another directory SIGKILLed after step 3 (a subprocess; checkpoint
    2 committed) then run again: the two end bitwise equal. The straight run and the resumption run in this process
    (`cli.main`, a new run reading the directory back), sharing the persistent compilation cache with the killed
    subprocess."""
    from deepjax import cli
    N = 2
    args = small_args(data_dir, f"--config.train.steps={2 * N}", f"--config.train.checkpoint_every={N}")
    train = lambda d: cli.main(["train", "tiny", "--workdir", str(tmp_path / d), "--no-progress", *args])  # noqa: E731
    assert train("straight") == 0
    killed = _train_cli(tmp_path / "resumed", args, {**compile_cache, TR.KILL_ENV: str(N + 1)})
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL, no clean stop
    assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == [str(N)]
    capsys.readouterr()
    assert train("resumed") == 0
    assert f"(step {N})" in capsys.readouterr().out

    # data order: every step saw the same batch
    h1, h2 = _history(tmp_path / "straight"), _history(tmp_path / "resumed")
    assert sorted(h1) == sorted(h2) == list(range(1, 2 * N + 1))
    assert [h1[s]["data"] for s in h1] == [h2[s]["data"] for s in h1]
    assert len({h1[s]["data"] for s in h1}) == 2 * N
    # params, optimizer state, router biases, RNG, counters: bitwise
    cfg = load_config("tiny", args)
    run_abstract = _abstract_state(cfg)
    s1 = assert_same_final_state([str(tmp_path / d / "checkpoints") for d in ("straight", "resumed")],
                                 run_abstract, 2 * N)
    assert any(np.abs(np.asarray(x)).sum() > 0 for x in jax.tree.leaves(s1.router_bias))
    # the run directory
    for f in ("config.json", "train_curves.png"):
        assert os.path.getsize(tmp_path / "resumed" / f) > 0
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(tmp_path / "resumed" / "tb"))
    assert json.load(open(tmp_path / "resumed" / "config.json"))["train"]["steps"] == 2 * N

    # a damaged newest checkpoint: `deepjax train` (in this process) stops with one line naming step and file,
    # status 2. Falling back to the previous step when told, and the run
    # then ending bitwise equal to the straight one: test_checkpoint_faults.py (the same train loop and override).
    victim = max((os.path.join(r, n) for r, _, ns in os.walk(tmp_path / "resumed" / "checkpoints" / str(2 * N))
                  for n in ns if n != C.MANIFEST), key=os.path.getsize)
    with open(victim, "r+b") as f:
        f.truncate(1)
    capsys.readouterr()
    more = args + [f"--config.train.steps={2 * N + 1}"]
    assert cli.main(["train", "tiny", "--workdir", str(tmp_path / "resumed"), "--no-progress", *more]) == 2
    err = capsys.readouterr().err
    assert f"step {2 * N}" in err and victim in err and err.count("\n") == 1, err[-2000:]


def _abstract_state(cfg):
    return TR.abstract_train_state(cfg, S.make_mesh(cfg.mesh), S.rules_for(cfg.mesh.rules))[-1]


def test_training_stops_after_k_nonfinite_steps(tmp_path, data_dir):
    """The loop stops after train.max_nonfinite non-finite steps in a row, and never saves the one that stopped it.
    (One dense and one MoE layer, no MTP module: the loop's behaviour at a fraction of tiny's compile time; the
    step's non-finite guard on the whole tiny model: test_nonfinite_step_is_not_applied_and_never_saved.)"""
    cfg = load_config("tiny", small_args(
        data_dir, "--config.optim.lr=1e30", "--config.optim.schedule=constant", "--config.optim.warmup_steps=0",
        "--config.train.max_nonfinite=2", "--config.train.steps=20", "--config.train.checkpoint_every=1",
        "--config.train.async_checkpoint=false", "--config.train.plot=false",
        "--config.model.num_hidden_layers=2", "--config.model.num_nextn_predict_layers=0"))
    with pytest.raises(TR.NonFiniteError, match=r"step \d+: the loss or gradient was not finite for 2 steps"):
        T.train(cfg, str(tmp_path), progress=False)
    h = _history(tmp_path)
    last = max(h)
    assert last < 20 and [h[last - 1]["applied"], h[last]["applied"]] == [0, 0]
    ck = C.Checkpointer(str(tmp_path / "checkpoints"))
    assert ck.steps() and max(ck.steps()) < last  # the step that stopped the run is not saved
    _, state, _, _ = ck.restore(_abstract_state(cfg))
    assert bool(TS.state_is_finite(state))


def test_tiny_model_learns_arithmetic(tmp_path, data_dir):
    """The tiny preset's SFT loss on the arithmetic task (completion tokens, byte vocabulary) falls from ln(512)
    = 6.24 to below 2.0 in 60 steps of 8 x 96 tokens at lr 5e-3 (its last 10 steps average 1.77, measured; 80
    steps: 1.62)."""
    cfg = load_config("tiny", small_args(data_dir, "--config.train.steps=60", "--config.optim.lr=5e-3",
                                         "--config.train.checkpoint_every=1000", "--config.train.plot=false"))
    T.train(cfg, str(tmp_path), progress=False)
    h = _history(tmp_path)
    first, last10 = h[1]["loss"], np.mean([h[s]["loss"] for s in range(51, 61)])
    assert first > 5.5 and last10 < 2.0, (first, last10)

    # `deepjax eval` on the same run: k samples per held-out problem through the sampler on the run's mesh
    from deepjax import cli
    from deepjax.rl import evaluate
    res = evaluate.run(str(tmp_path), k=2, problems=8, max_new_tokens=24, batch=16, progress=False)
    assert res["step"] == 60 and [r["k"] for r in res["table"]] == [1, 2]
    assert all(0 <= r[m] <= 1 for r in res["table"] for m in ("pass@1", "pass@k", "cons@k"))
    assert len(res["problems"]) == 8 and all(p["n"] == 2 for p in res["problems"])
    held = {ex["question"] for ex in tasks.generate("arithmetic", 8, 0, "test")}
    assert {p["question"] for p in res["problems"]} == held
    assert os.path.getsize(tmp_path / "eval_step60_scaling.png") > 0
    assert json.load(open(tmp_path / "eval_step60.json"))["k"] == 2
    assert cli.main(["eval", str(tmp_path / "nothing-here"), "--no-progress"]) == 1


def test_train_cli_rejects_bad_config(capsys):
    from deepjax import cli
    assert cli.main(["train", "tiny", "--config.optim.micro_batches=3"]) == 2
    assert "optim.micro_batches=3" in capsys.readouterr().err
    assert cli.main(["train", "tiny", "--config.data.source=jsonl_math"]) == 2
    assert "data.path" in capsys.readouterr().err


def test_config_json_round_trips():
    from deepjax.config import from_dict, to_dict
    cfg = load_config("tiny", ["--config.train.steps=7", "--config.data.path=a.jsonl,b.jsonl",
                               "--config.model.rope_scaling.factor=8"])
    assert from_dict(json.loads(json.dumps(to_dict(cfg)))) == cfg
    with pytest.raises(ConfigError, match="model.bogus"):
        from_dict({"model": {"bogus": 1}})
    with pytest.raises(ConfigError, match="train.steps"):
        from_dict({"train": {"steps": "many"}})


def test_vocab_smaller_than_tokenizer_is_named():
    cfg = load_config("tiny", ["--config.model.vocab_size=100"])
    with pytest.raises(ConfigError, match=r"model.vocab_size=100.*263"):
        TR.check_vocab(cfg, TOK)


def test_micro_batches_precast_experts_keep_the_float32_gradient_sum(step_setup):
    """With bf16 compute the micro-batched train step casts the routed expert stacks once (`model.precast_experts`)
    and sums the micro-batches' gradients in float32: the step's gradient (kept as the optimizer state by a
    stand-in optimizer) equals the two halves' float32-parameter gradients summed in float32."""
    import dataclasses

    from flax import nnx
    cfg, _, params, batch = step_setup
    cfg = dataclasses.replace(cfg, dtype="bfloat16")
    graphdef = M.abstract_init(cfg)[0]
    keep = optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p),
                                        lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))
    step = jax.jit(TS.make_train_step(graphdef, cfg, keep, micro_batches=2, bias_update_speed=0.0))
    got = step(TS.init_state(params, keep, 0), batch)[0].opt_state
    trainable, bias = TS.split_params(params)
    denoms = TS.target_counts(batch, cfg.num_nextn_predict_layers)
    n = batch.tokens.shape[0] // 2
    half = lambda i: jax.tree.map(lambda a: a[i * n:(i + 1) * n], batch)  # noqa: E731
    part = jax.jit(jax.grad(lambda p, b: TS.lm_loss(p, bias, graphdef, b, cfg, 0.3, 1e-4, None, denoms, 0.5)[0]))
    want = jax.tree.map(jnp.add, part(trainable, half(0)), part(trainable, half(1)))
    stacks = [M.path_str(p) for p, v in nnx.to_flat_state(M.precast_experts(trainable, jnp.bfloat16))
              if v.dtype == jnp.bfloat16]
    assert len(stacks) == 3
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert a.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-9)

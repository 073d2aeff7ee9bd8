"""Checkpoint faults (issue 23): every kind of damage is named with its step and file before Orbax reads the step,
a damaged or bogus step is never taken as the newest, fallback moves it aside and the retrained steps are saved
again (bitwise equal to the straight run), retention never spends a good step on a damaged one, and metrics.jsonl /
TensorBoard / eval.jsonl hold each step once after a resume. The long soak (SIGKILLs, bit flips, a full disk) is
bench/faults.py."""

from __future__ import annotations

import json
import os
import shutil
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepjax.config import load_config
from deepjax.train import checkpoint as C
from deepjax.train import loop as T
from deepjax.train import run as TR
from test_train import _abstract_state, data_dir, small_args  # noqa: F401  (data_dir: that module's fixture)


def _state(seed: int):
    return {"w": jnp.arange(1 << 16, dtype=jnp.float32) + seed, "b": jnp.full((64,), seed, jnp.bfloat16),
            "step": jnp.int32(seed)}


def _saved(root, steps, keep=10):
    """A Checkpointer over root/checkpoints with `steps` saved (their data state {"next": s})."""
    ck = C.Checkpointer(str(root / "checkpoints"), keep=keep, async_save=True)
    for s in steps:
        assert ck.save(s, _state(s), {"next": s}, {"model": {"seed": s}})
    ck.close()
    return C.Checkpointer(str(root / "checkpoints"), keep=keep)


def _largest(step_dir) -> str:
    files = [os.path.join(r, n) for r, _, ns in os.walk(step_dir) for n in ns if n != C.MANIFEST]
    return max(files, key=os.path.getsize)


def _overwrite(path, n=4096, at=None):
    """n bytes of garbage over a file, its size unchanged."""
    size = os.path.getsize(path)
    at = max(0, size // 2 - n // 2) if at is None else at
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(bytes((i * 37 + 11) % 256 for i in range(min(n, size - at))))
    assert os.path.getsize(path) == size


# kind of damage -> (what it does to step dir d, returns the file the error must name, words the error must hold)
DAMAGE = {
    "truncated data file": lambda d: (_truncate(_largest(d)), "bytes"),
    "4 KiB overwritten in a data file": lambda d: (_over(_largest(d)), "checksum"),
    "garbage in state/_METADATA": lambda d: (_over(os.path.join(d, "state", "_METADATA"), 64), "checksum"),
    "garbage in the data-iterator JSON": lambda d: (_over(os.path.join(d, "data", "metadata"), 8, 0), "checksum"),
    "garbage in _CHECKPOINT_METADATA": lambda d: (_over(os.path.join(d, "_CHECKPOINT_METADATA"), 8, 0), "JSON"),
    "deleted manifest": lambda d: (_delete(os.path.join(d, C.MANIFEST)), "missing"),
    "garbage manifest": lambda d: (_over(os.path.join(d, C.MANIFEST), 16, 0), "unreadable"),
    "deleted state file": lambda d: (_delete(_largest(d)), "missing"),
}


def _truncate(p):
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) // 2)
    return p


def _over(p, n=4096, at=None):
    _overwrite(p, n, at)
    return p


def _delete(p):
    os.remove(p)
    return p


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damage_is_named_and_fallback_moves_it_aside(tmp_path, kind):
    ck = _saved(tmp_path, [1, 2])
    named, words = DAMAGE[kind](ck.step_dir(2))
    with pytest.raises(C.CheckpointError) as e:
        ck.restore(jax.eval_shape(lambda: _state(0)))
    msg = str(e.value)
    assert "step 2" in msg and named in msg and words in msg and "fallback_on_damage" in msg, msg
    assert "\n" not in msg and ck.steps() == [1, 2]  # one line; nothing moved without fallback
    step, state, data, cfg = ck.restore(jax.eval_shape(lambda: _state(0)), fallback=True)
    assert step == 1 and data == {"next": 1} and cfg == {"model": {"seed": 1}} and float(state["w"][1]) == 2.0
    assert ck.steps() == [1] and os.listdir(tmp_path / "damaged") == ["2"]
    # the retrained step is saved again (Orbax raised StepAlreadyExistsError / skipped it before)
    assert ck.save(2, _state(2), {"next": 2}, {"model": {"seed": 2}})
    ck.close()
    step, _, data, _ = C.Checkpointer(str(tmp_path / "checkpoints")).restore(jax.eval_shape(lambda: _state(0)))
    assert (step, data) == (2, {"next": 2})


def test_manifest_is_written_before_the_commit(tmp_path, monkeypatch):
    """The manifest goes into Orbax's temporary directory, so no committed step ever lacks one (a kill between the
    commit and a later manifest write left steps without; those are now damaged)."""
    where = []
    write = C.write_manifest
    monkeypatch.setattr(C, "write_manifest", lambda d, s: (where.append(d), write(d, s)))
    for async_save in (True, False):
        ck = C.Checkpointer(str(tmp_path / str(async_save)), async_save=async_save)
        ck.save(3, _state(3), {"next": 3}, {})
        ck.close()
        assert os.path.exists(os.path.join(ck.step_dir(3), C.MANIFEST))
    assert len(where) == 2 and all(d.endswith("3" + C.TMP_SUFFIX) for d in where), where


def test_bogus_step_directories_never_count_as_newest(tmp_path):
    ck = _saved(tmp_path, [1, 2])
    root = tmp_path / "checkpoints"
    for name in ("3", "abc", "007", "4x"):  # an empty step, three names that are not steps
        os.makedirs(root / name)
    (root / "abc" / "junk").write_text("x")
    ck = C.Checkpointer(str(root))
    assert ck.steps() == [1, 2] and ck.latest_step() == 2
    assert os.listdir(tmp_path / "damaged") == ["3"]  # empty: moved aside at once, it holds no work
    step, _, data, _ = ck.restore(jax.eval_shape(lambda: _state(0)))  # no fallback needed
    assert (step, data) == (2, {"next": 2})
    assert ck.save(3, _state(3), {"next": 3}, {})  # Orbax took the empty 3/ as saved and would skip it
    ck.close()
    assert C.Checkpointer(str(root)).steps() == [1, 2, 3] and sorted(os.listdir(root))[-2:] == ["4x", "abc"]
    # a non-empty step without a manifest: damaged, named, never newest
    os.makedirs(root / "9" / "state")
    (root / "9" / "state" / "_METADATA").write_bytes(b"\x00\xff" * 10)
    with pytest.raises(C.CheckpointError, match=r"step 9 is damaged: .*9/deepjax_manifest.json is missing"):
        C.Checkpointer(str(root)).restore(jax.eval_shape(lambda: _state(0)))
    step, *_ = C.Checkpointer(str(root)).restore(jax.eval_shape(lambda: _state(0)), fallback=True)
    assert step == 3 and sorted(os.listdir(tmp_path / "damaged")) == ["3", "9"]


def test_retention_never_spends_a_good_step_on_a_damaged_one(tmp_path):
    shape = jax.eval_shape(lambda: _state(0))
    # the case: keep=3, newest (60) damaged; the fallback run goes on to 80
    ck = _saved(tmp_path / "a", [10, 20, 30, 40, 50, 60], keep=3)
    assert ck.steps() == [40, 50, 60]
    _truncate(_largest(ck.step_dir(60)))
    step, *_ = ck.restore(shape, fallback=True)
    assert step == 50 and ck.steps() == [40, 50]
    for s in (60, 70):
        ck.save(s, _state(s), {"next": s}, {})
        ck.wait()
        assert 40 in ck.steps() and 50 in ck.steps()  # fewer than 3 newer good steps yet
    ck.save(80, _state(80), {"next": 80}, {})
    ck.close()
    assert ck.steps() == [60, 70, 80]
    for s in ck.steps():
        ck.verify(s)
    # a damaged step between good ones is not counted: the older good one stays
    ck = _saved(tmp_path / "b", [40, 50, 60], keep=3)
    _over(_largest(ck.step_dir(50)))
    step, *_ = ck.restore(shape)
    assert step == 60
    ck.save(70, _state(70), {"next": 70}, {})
    ck.close()
    assert ck.steps() == [40, 50, 60, 70]  # Orbax's max_to_keep deleted 40 here
    ck = C.Checkpointer(str(tmp_path / "b" / "checkpoints"), keep=3)
    ck.save(80, _state(80), {"next": 80}, {})
    ck.close()
    assert ck.steps() == [60, 70, 80]  # three good newer ones: 40 and the damaged 50 go


def _events(tb_file) -> list:
    """(step, kind) of the events of one TensorBoard file (TFRecord framing: length, crc, data, crc)."""
    from tensorboardX.proto import event_pb2
    out = []
    with open(tb_file, "rb") as f:
        while head := f.read(12):
            (n,) = struct.unpack("<Q", head[:8])
            ev = event_pb2.Event.FromString(f.read(n))
            f.read(4)
            out.append((ev.step, ev.WhichOneof("what")))
    return out


def test_metrics_and_eval_logs_hold_each_step_once_after_a_resume(tmp_path):
    log = TR.MetricsLog(str(tmp_path), log_every=1, resume_step=0)
    for s in range(1, 7):
        log.write({"step": s, "loss": float(s)}, s)
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')  # the line a kill cut
    log = TR.MetricsLog(str(tmp_path), log_every=1, resume_step=4)  # resumed from the step-4 checkpoint
    for s in (5, 6, 7):
        log.write({"step": s, "loss": 10.0 * s}, s)
    log.close()
    steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6, 7]
    assert TR.read_history(str(tmp_path / "metrics.jsonl"))[5]["loss"] == 50.0
    files = sorted((os.path.join(tmp_path, "tb", n) for n in os.listdir(tmp_path / "tb")), key=os.path.getmtime)
    assert len(files) == 2 and (5, "session_log") in _events(files[-1])  # TensorBoard hides old events >= 5
    assert (5, "session_log") not in _events(files[0])
    # eval.jsonl (GRPO) the same way
    path = str(tmp_path / "eval.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps({"step": s, "pass@1": 0.1 * s}) + "\n" for s in (2, 4, 6))
    assert [e["step"] for e in TR.truncate_jsonl(path, 4, write=False)] == [2, 4]
    assert len(open(path).readlines()) == 3
    assert [e["step"] for e in TR.truncate_jsonl(path, 4)] == [2, 4] and len(open(path).readlines()) == 2


# ------------------------------------------------------------------------------------------------------ the loop


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_dir, jax_cache_env):  # noqa: F811
    """A tiny run trained straight to step 6, checkpoints every 2 (keep 2): the reference. One dense and one MoE
    layer, no MTP module: the same kinds of state to save and restore at a fraction of tiny's compile time. Its
    programs go to the session's persistent compilation cache, from which the test below loads them."""
    from conftest import persistent_compile_cache
    args = small_args(data_dir, "--config.train.steps=6", "--config.train.checkpoint_every=2",
                      "--config.train.keep_checkpoints=2", "--config.train.plot=false",
                      "--config.model.num_hidden_layers=2", "--config.model.num_nextn_predict_layers=0")
    root = tmp_path_factory.mktemp("straight")
    with persistent_compile_cache(jax_cache_env["JAX_COMPILATION_CACHE_DIR"]):
        T.train(load_config("tiny", args), str(root), progress=False)
    return root, args


def test_damaged_newest_falls_back_resaves_and_ends_equal_to_the_straight_run(straight, tmp_path, capsys,
                                                                             compile_cache):
    ref, args = straight
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    victim = _over(_largest(run / "checkpoints" / "6"))  # same size: only the checksum sees it
    cfg = load_config("tiny", args)
    with pytest.raises(C.CheckpointError, match=f"step 6 is damaged: file {victim} does not match its checksum"):
        T.train(cfg, str(run), progress=False)
    # the repro: restored 4, retrained to 6, then StepAlreadyExistsError on saving 6 again
    T.train(load_config("tiny", args + ["--config.train.fallback_on_damage=true"]), str(run), progress=False)
    out = capsys.readouterr().out
    assert f"moved to {tmp_path}/run/damaged/6, restoring step 4" in out and "(step 4)" in out, out
    assert sorted(os.listdir(run / "checkpoints")) == ["4", "6"] and os.listdir(run / "damaged") == ["6"]
    abstract = _abstract_state(cfg)
    finals = []
    for d in (ref, run):
        ck = C.Checkpointer(str(d / "checkpoints"))
        step, state, data, _ = ck.restore(abstract)
        ck.close()
        finals.append((step, state, data))
    (s1, st1, d1), (s2, st2, d2) = finals
    assert s1 == s2 == 6 and d1 == d2
    for a, b in zip(jax.tree.leaves(st1), jax.tree.leaves(st2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # metrics.jsonl: each step once (steps 5 and 6 were logged by both runs), the same batches
    lines = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]
    h = TR.read_history(str(ref / "metrics.jsonl"))
    assert [r["data"] for r in lines] == [h[s]["data"] for s in range(1, 7)]
    assert [r["loss"] for r in lines] == [h[s]["loss"] for s in range(1, 7)]

"""`deepjax r1` (deepjax/rl/r1.py): the five stage directories end to end at a toy size, killed in stage 3 and resumed
there (the finished stages not run again), a changed stage setting refused in one line, the R1Config overrides and the
non-reasoning stand-in data. What the default pipeline measures is in docs/LOG.md, not asserted here."""

from __future__ import annotations

import json
import os

import pytest

from deepjax import cli
from deepjax.rl import r1
from deepjax.schema import ConfigError
from deepjax.train import loop as T
from deepjax.train import run as TR

# the tiny model cut to one dense layer without MTP (compiles in a fraction of the time), one-digit + and -
ARGS = ["--no-progress", "--seed", "1",
        "--config.model.num_hidden_layers=1", "--config.model.first_k_dense_replace=1",
        "--config.model.num_nextn_predict_layers=0",
        "--config.data.num_train=150", "--config.data.num_test=20", "--config.data.seq_len=96",
        "--config.data.global_batch=8", "--config.train.steps=30", "--config.train.checkpoint_every=5",
        "--config.train.log_every=5",
        # rollouts and every stage's evaluation (64 rows a batch, padded) decode at most 32 new tokens
        "--config.rl.prompts_per_step=4", "--config.rl.loss.group_size=2", "--config.rl.rollout.max_new_tokens=32",
        "--config.rl.eval.problems=4", "--config.rl.loss.beta=0",  # no reference policy to compile
        # the filter's correctness and format checks off: a 30-step base is rarely right (tests/test_distill.py
        # tests the filter); it must still finish (EOS) within max_new_tokens
        "--config.distill.prompts=8", "--config.distill.k=2", "--config.distill.batch=16",
        "--config.distill.sampling.max_new_tokens=64", "--config.distill.require_correct=false",
        "--config.distill.require_format=false",
        "--config.r1.cold_start_examples=16", "--config.r1.cold_start_steps=2", "--config.r1.reasoning_rl_steps=1",
        "--config.r1.non_reasoning_examples=6", "--config.r1.sft_steps=7", "--config.r1.all_rl_steps=1",
        "--config.r1.eval_k=2"]
KILL_STEP = 5  # stage 3's SFT is killed after its step 5 (checkpointed: train.checkpoint_every=5)


class Killed(Exception):
    pass


def _mtimes(root, stages):
    return {s: os.stat(root / s / r1.MARKER).st_mtime_ns for s in stages}


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """The pipeline killed in stage 3's SFT right after its step 5 (checkpointed), then the same command again."""
    root = tmp_path_factory.mktemp("r1")
    mp = pytest.MonkeyPatch()

    def kill_in_stage_3(step, checkpointer):  # the train loop's kill hook, called after step KILL_STEP of every run
        if "3_rejection_sft" in str(checkpointer.directory):
            checkpointer.wait()
            raise Killed(step)

    mp.setenv(TR.KILL_ENV, str(KILL_STEP))
    mp.setattr(T, "kill_if_asked", kill_in_stage_3)
    try:
        with pytest.raises(Killed):
            cli.main(["r1", "--workdir", str(root), *ARGS])
    finally:
        mp.undo()
    before = _mtimes(root, r1.STAGES[:3])
    cks = {s: sorted(os.listdir(root / s / "checkpoints")) for s in r1.STAGES[:4]}
    return root, before, cks


def test_killed_in_stage_3_resumes_there_and_finishes(killed_and_resumed, capsys):
    root, before, cks = killed_and_resumed
    assert not (root / "3_rejection_sft" / r1.MARKER).exists() and not (root / "4_all_rl").exists()
    assert cks["3_rejection_sft"] == ["0", "5"]  # the base's weights as step 0, then the SFT's step 5
    capsys.readouterr()
    assert cli.main(["r1", "--workdir", str(root), *ARGS]) == 0
    out = capsys.readouterr().out
    for i, s in enumerate(r1.STAGES[:3]):
        assert f"[{i}/4] {r1.LABELS[s]} ({s}): done, skipped" in out, out
    assert "[3/4] rejection SFT (3_rejection_sft): rejection sampling" in out
    assert f"3_rejection_sft/checkpoints/{KILL_STEP} (step {KILL_STEP})" in out, out  # resumed, not restarted
    assert "student initialized" not in out
    assert _mtimes(root, r1.STAGES[:3]) == before  # the finished stages were not run or evaluated again
    assert {s: sorted(os.listdir(root / s / "checkpoints")) for s in r1.STAGES[:3]} == \
        {s: cks[s] for s in r1.STAGES[:3]}
    assert sorted(os.listdir(root / "3_rejection_sft" / "checkpoints")) == ["0", "5", "7"]
    assert (root / "4_all_rl" / r1.MARKER).exists()
    assert "held-out (4 problems, k=2)" in out and "rejection SFT" in out and "all-scenario RL" in out

    # a third run has nothing to do
    assert cli.main(["r1", "--workdir", str(root), *ARGS]) == 0
    assert capsys.readouterr().out.count("done, skipped") == 5


def test_every_stage_ran_and_wrote_its_files(killed_and_resumed):
    root, _, _ = killed_and_resumed
    if not (root / "r1.json").exists():  # the resume test finishes the pipeline; run alone, finish it here
        assert cli.main(["r1", "--workdir", str(root), *ARGS]) == 0
    summary = json.load(open(root / "r1.json"))
    assert summary["stages"] == list(r1.STAGES) and summary["seed"] == 1
    for s in r1.STAGES:
        row = summary["eval"][s]
        assert row["n_problems"] == 4 and row["k"] == 2 and 0 <= row["pass@1"] <= 1, (s, row)
        assert os.path.getsize(root / s / r1.EVAL_FILE) > 0
    assert os.path.getsize(root / "r1.png") > 0
    cfg = {s: json.load(open(root / s / "config.json")) for s in r1.STAGES}
    # the chain: base -> cold start -> reasoning RL; base -> rejection SFT (on stage 2's traces) -> all-scenario RL
    assert cfg["1_cold_start"]["distill"]["student_init"] == str(root / "0_base")
    assert cfg["1_cold_start"]["data"]["recheck_share"] == 1.0 and cfg["1_cold_start"]["data"]["freeform_share"] == 0
    assert cfg["1_cold_start"]["data"]["num_train"] == 16 and cfg["1_cold_start"]["train"]["steps"] == 2
    assert cfg["2_reasoning_rl"]["rl"]["init_from"] == str(root / "1_cold_start")
    assert cfg["2_reasoning_rl"]["rl"]["steps"] == 1 and cfg["3_rejection_sft"]["train"]["steps"] == 7
    assert cfg["3_rejection_sft"]["distill"]["student_init"] == str(root / "0_base")
    assert cfg["3_rejection_sft"]["data"]["source"] == "traces"
    assert cfg["4_all_rl"]["rl"]["init_from"] == str(root / "3_rejection_sft")
    stats = json.load(open(root / "3_rejection_sft" / "traces" / "stats.json"))
    assert stats["settings"]["teacher"] == str(root / "2_reasoning_rl") and stats["samples"] == 16
    assert stats["kept"] == summary["traces"]["kept"] > 0
    chat = [json.loads(line) for line in open(root / "3_rejection_sft" / "traces" / "non_reasoning.jsonl")]
    assert len(chat) == 6 and all("<think>" not in r["completion"] for r in chat)
    assert cfg["3_rejection_sft"]["data"]["path"].endswith("traces.jsonl," + str(root / "3_rejection_sft" / "traces" /
                                                                                  "non_reasoning.jsonl"))


def test_a_changed_stage_setting_is_one_error(killed_and_resumed, capsys):
    root, _, _ = killed_and_resumed
    if not (root / "r1.json").exists():
        assert cli.main(["r1", "--workdir", str(root), *ARGS]) == 0
    capsys.readouterr()
    before = _mtimes(root, r1.STAGES)
    assert cli.main(["r1", "--workdir", str(root), *ARGS, "--config.r1.reasoning_rl_steps=3"]) == 2
    err = capsys.readouterr().err
    assert "stage 2_reasoning_rl" in err and "settings.rl.steps" not in err and "config.rl.steps" in err, err
    assert len(err.strip().splitlines()) == 1
    assert cli.main(["r1", "--workdir", str(root), *ARGS, "--config.r1.non_reasoning_examples=7"]) == 2
    assert "stage 3_rejection_sft" in capsys.readouterr().err
    assert _mtimes(root, r1.STAGES) == before  # nothing ran


def test_overrides_and_the_non_reasoning_data():
    cfg, rc = r1.load("r1", ["--config.r1.sft_steps=7", "--config.r1.sft_lr=none", "--config.rl.steps=5"])
    assert rc.sft_steps == 7 and rc.sft_lr is None and cfg.rl.steps == 5
    assert rc.cold_start_steps == r1.R1Config().cold_start_steps
    with pytest.raises(ConfigError, match="config.r1.sft_step: unknown override key"):
        r1.load("r1", ["--config.r1.sft_step=7"])
    with pytest.raises(ConfigError, match="r1.eval_k"):
        r1.apply_overrides(rc, ["--config.r1.eval_k=0"])
    a, b = r1.non_reasoning(40, 0), r1.non_reasoning(40, 0)
    assert a == b and len({r["question"] for r in a}) == 40
    assert all(r["task"] == "chat" and r["completion"] and "<think>" not in r["completion"] for r in a)
    assert r1.non_reasoning(40, 1) != a

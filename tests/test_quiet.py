"""A clean first run: `deepjax r1zero` (whose first stage is `deepjax train`'s loop) at a toy budget, in a fresh
process and an empty work directory as a user starts it, prints its own lines and bars and nothing from the libraries
below it: no TFDS build chatter or nested bars, no absl / orbax / XLA log lines, no Python warnings. The same run is
the r1zero job's end-to-end test: every stage, the before/after table with standard errors, the files, the seed.
(The rise it reports is measured in docs/LOG.md, not asserted here.)"""

import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What the libraries print on a first run that a user can do nothing about (found in the output before it was fixed,
# and its usual neighbours).
NOISE = [
    r"Downloading and preparing dataset",                     # TFDS, before a build (nothing is downloaded)
    r"downloaded and prepared to",                            # TFDS, after it
    r"Generating splits|Generating \w+ examples|Shuffling ",  # TFDS's nested progress bars
    r"\x1b\[A",                                               # a nested bar moving the cursor up
    r"Using custom data configuration",                       # TFDS through absl, per builder config
    r"Variant folder .* has no dataset_info\.json",           # TFDS, looking for the data before it is built
    r"^(WARNING|INFO|ERROR):absl:",                           # absl logging
    r"^[IWE]\d{4} \d\d:\d\d:\d\d",                            # absl / glog / XLA C++ log lines
    r"\b\w*Warning\b: ",                                      # Python warnings (default filters, as a user runs)
    r"An NVIDIA GPU may be present|Unable to initialize backend",  # jax looking for accelerators
]

ARGS = ["r1zero", "--k", "2", "--seed", "3", "--config.train.steps=2", "--config.train.checkpoint_every=2",
        "--config.rl.steps=1", "--config.rl.eval.every=1", "--config.rl.eval.problems=2",
        "--config.rl.prompts_per_step=2", "--config.rl.loss.group_size=2", "--config.rl.rollout.max_new_tokens=8",
        "--config.data.global_batch=4", "--config.data.seq_len=192", "--config.model.num_hidden_layers=2"]


def test_first_run_prints_only_its_own_lines(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               # one CPU device as on a laptop (not conftest's 8), compiled cheaply (conftest's other flags)
               XLA_FLAGS=os.environ["DEEPJAX_TEST_CHEAP_COMPILE"])
    env.pop("PYTHONWARNINGS", None)
    work = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "deepjax", *ARGS, "--workdir", str(work)], cwd=tmp_path,
                       env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    out = r.stdout
    assert r.returncode == 0, out[-3000:]
    lines = [seg for line in out.split("\n") for seg in line.split("\r")]
    noisy = [line for line in lines if any(re.search(p, line) for p in NOISE)]
    assert not noisy, "library noise in a first run:\n" + "\n".join(noisy[:20])
    for stage in ("[1/4] base", "[2/4] evaluating the base", "[3/4] GRPO", "[4/4] evaluating the GRPO policy",
                  "samples with a checkable answer", "run directory:"):
        assert stage in out, stage
    # Only the job's own bars (one at a time, each on its own line), no others.
    bars = {m.group(1) for m in re.finditer(r"(?:^|\r)([^\r\n|:]+):\s+\d+%\|", out, re.M)}
    assert bars <= {"train", "eval", "grpo"}, bars
    # the job's table, files and seed
    assert "samples that re-check" in out and "±" in out
    recs = [json.loads(line) for line in open(work / "grpo" / "metrics.jsonl")]
    assert recs and all(0.0 <= r["rechecked"] <= 1.0 for r in recs)
    summary = json.load(open(work / "r1zero.json"))
    assert summary["seed"] == 3 and summary["before"]["n_problems"] == summary["after"]["n_problems"] == 2
    change = 100 * (summary["after"]["pass@1"] - summary["before"]["pass@1"])
    assert abs(summary["pass@1_change_points"] - change) < 1e-6
    for f in ("r1zero.png", "base/train_curves.png", "grpo/grpo_curves.png", "grpo/eval.jsonl"):
        assert os.path.getsize(work / f) > 0, f
    cfg = json.load(open(work / "grpo" / "config.json"))
    assert cfg["seed"] == cfg["data"]["seed"] == 3 and cfg["rl"]["init_from"] == str(work / "base")

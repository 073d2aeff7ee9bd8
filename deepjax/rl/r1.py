"""`deepjax r1`: DeepSeek-R1's pipeline end to end at CPU scale, one config and one command (docs/r1.md).

    deepjax r1                                             # configs/r1.py (the built-in default), runs/r1
    deepjax r1 configs/r1.py --seed 1 --workdir runs/r1_s1 --config.r1.reasoning_rl_steps=80 --config.rl.lr=1e-4

The run config (`Config`) is what the stages share: the model, the task (data.source, a generated task with a
verifier), the optimizer, checkpoints and logs (train), GRPO (rl: prompts, group, loss, rewards, rollouts, the
held-out problems) and rejection sampling (distill: k, sampling, the filter). What differs between stages is
`R1Config` (`--config.r1.FIELD=VALUE`; a config file may define `get_r1_config()` beside `get_config()`).

Stages, each its own run directory under the work directory (R1 paper, section 2.3; `deepjax r1zero` is R1-Zero):

0. `0_base` (`deepjax train`): the base. R1 starts from DeepSeek-V3-Base; here the tiny model pretrained on data as
   configured (the default: the earlier `deepjax r1zero` job's weak base on one-step sums, whose answers are often
   free-form and sometimes slip);
1. `1_cold_start` (`deepjax train` from 0_base's checkpoint): SFT on r1.cold_start_examples train problems with a
   long chain of thought in a readable format: every completion works the problem, re-checks it by undoing the chain
   and redoes it when the check fails (data.recheck_share = 1, `tasks.sft_completion`), always in
   `<think>...</think> <answer>...</answer>` (data.freeform_share = 0); r1.cold_start_steps steps at r1.sft_lr;
2. `2_reasoning_rl` (`deepjax grpo` from 1_cold_start): r1.reasoning_rl_steps GRPO steps with rl.reward (default
   accuracy + format + language consistency, `rewards.combined`);
3. `3_rejection_sft`: rejection sampling from 2_reasoning_rl (`distill.write_traces`: distill.k samples of each
   train prompt, kept when finished, well-formatted, correct and language-consistent; traces/traces.jsonl,
   traces/stats.json) plus r1.non_reasoning_examples non-reasoning examples (traces/non_reasoning.jsonl: a generated
   stand-in for R1's writing / QA / self-cognition data, see `non_reasoning`), then SFT of 0_base (not of the RL
   policy, as R1) on both (data.source=traces) for r1.sft_steps steps;
4. `4_all_rl` (`deepjax grpo` from 3_rejection_sft): r1.all_rl_steps GRPO steps with rl.reward on the task's prompts
   (R1's second RL stage also trains general prompts with reward models: not here, docs/r1.md).

After each stage its policy is evaluated on the held-out problems (rl.eval.problems test-split problems, r1.eval_k
samples each at rl.eval.temperature / top_p, rl.rollout.max_new_tokens, seed `seed`: the same for every stage):
pass@1, cons@k, pass@k, the share of samples with a checkable answer and the accuracy of those
(`r1zero.breakdown`), the share in R1's format, the share that re-checks, the mean length and the mean
language-consistency reward. Each stage writes `<stage>/r1_eval.json` (the full evaluation) and then
`<stage>/r1_stage.json`, its done marker (its settings, the evaluation row, its times). The pipeline writes
`<workdir>/r1.json` (every stage's row) and `<workdir>/r1.png`.

Restarting the command with the same work directory picks up where it stopped: a stage with its done marker is
skipped (nothing is built or compiled for it), a stage killed midway resumes from its newest checkpoint (the runs
of `deepjax train` / `grpo` resume exactly; the traces are kept once their stats.json is written), the stages after
it run. Before anything runs, every stage's settings are compared with what its directory was made with (the done
marker, else config.json, and the traces' stats.json): a difference is one ConfigError naming the stage and the
fields (use a new --workdir, or delete that stage's directory and the later ones to redo them).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import random
import time
from typing import Optional, Sequence

import numpy as np
from matplotlib.figure import Figure

from deepjax import paths
from deepjax.config import Config, config_file, load_config, set_path, to_dict
from deepjax.data import tasks
from deepjax.infer.sampling import SamplingConfig
from deepjax.model import presets
from deepjax.data.config import DataConfig
from deepjax.rl import distill
from deepjax.rl import evaluate
from deepjax.rl import loop
from deepjax.rl import metrics as RM
from deepjax.rl import r1zero
from deepjax.rl import rewards
from deepjax.rl.config import DistillConfig, EvalConfig, RLConfig
from deepjax.rl.loss import GRPOConfig
from deepjax.schema import ConfigError, check_types, positive
from deepjax.train import loop as T
from deepjax.train import run as TR
from deepjax.train.config import OptimConfig, TrainConfig

STAGES = ("0_base", "1_cold_start", "2_reasoning_rl", "3_rejection_sft", "4_all_rl")
LABELS = {"0_base": "base", "1_cold_start": "cold start", "2_reasoning_rl": "reasoning RL",
          "3_rejection_sft": "rejection SFT", "4_all_rl": "all-scenario RL"}
MARKER = "r1_stage.json"  # a stage's done marker, written last
EVAL_FILE = "r1_eval.json"


@dataclasses.dataclass(frozen=True)
class R1Config:
    """What differs between the stages (`--config.r1.FIELD=VALUE`); the rest is the run config."""

    cold_start_examples: int = 96  # train problems of the cold-start SFT set (data.num_train of stage 1)
    cold_start_steps: int = 300  # SFT steps of stage 1
    reasoning_rl_steps: int = 40  # GRPO steps of stage 2
    non_reasoning_examples: int = 64  # generated non-reasoning examples added to stage 3's SFT data (0: none)
    sft_steps: int = 300  # SFT steps of stage 3 (from the base)
    all_rl_steps: int = 30  # GRPO steps of stage 4
    sft_lr: Optional[float] = 1e-3  # peak learning rate of the SFT stages 1 and 3; None: optim.lr (the base's)
    eval_k: int = 8  # samples per held-out problem in the evaluation after each stage

    def validate(self) -> None:
        check_types(self, "r1.")
        positive(self, "r1", ("cold_start_examples", "cold_start_steps", "reasoning_rl_steps", "sft_steps",
                              "all_rl_steps", "eval_k"))
        positive(self, "r1", ("non_reasoning_examples",), strict=False)
        if self.sft_lr is not None and not self.sft_lr > 0:
            raise ConfigError(f"r1.sft_lr={self.sft_lr!r}: must be positive, or None (= optim.lr)")


def default_config() -> Config:
    """The shared run config of the default pipeline (configs/r1.py): the earlier `deepjax r1zero` job's task and weak
    base (one-digit + and -, half the base's answers free-form); GRPO with Dr. GRPO's aggregation at lr 1e-4 and rollouts at T 0.8
    (stable on long chains in docs/LOG.md's R1-Zero experiments), long enough for a re-checked chain; R1's rewards
    (accuracy + format + language consistency)."""
    return Config(
        model=presets.tiny(),
        seed=0,
        data=DataConfig(source="arithmetic", template="plain", max_digits=1, ops="+-", num_train=170, num_test=24,
                        freeform_share=0.5, seq_len=128, global_batch=16),
        optim=OptimConfig(lr=3e-3, schedule="warmup_cosine", warmup_steps=20),
        train=TrainConfig(steps=400, checkpoint_every=100, log_every=10),
        rl=RLConfig(steps=40, prompts_per_step=8, lr=1e-4,
                    loss=GRPOConfig(beta=0.001, group_size=8, aggregation="dr_grpo"),
                    reward=rewards.RewardConfig(accuracy=1.0, format=0.1, language=0.1),
                    rollout=SamplingConfig(max_new_tokens=92, temperature=0.8),
                    eval=EvalConfig(every=0, problems=24, k=4)),
        distill=DistillConfig(k=4, max_per_prompt=2, batch=128,
                              sampling=SamplingConfig(max_new_tokens=92, temperature=0.6, top_p=0.95)),
    )


# ---- loading: the run config and R1Config ---------------------------------------------------------------------------

def _key(override: str) -> str:
    return override.removeprefix("--").split("=", 1)[0].removeprefix("config.")


def apply_overrides(rc: R1Config, overrides: Sequence[str]) -> R1Config:
    """`--config.r1.FIELD=VALUE` strings applied to `rc`, then validated."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item}: an override must look like --config.r1.FIELD=VALUE")
        name, raw = _key(item).removeprefix("r1."), item.split("=", 1)[1]
        rc = set_path(rc, name.split("."), raw, f"config.r1.{name}")
    rc.validate()
    return rc


def load(name_or_path: str, overrides: Sequence[str] = ()) -> tuple[Config, R1Config]:
    """(run config, R1Config) of a config file (or preset) and `--config.FIELD=VALUE` overrides: those under
    --config.r1. go to R1Config (the file's get_r1_config() when it defines one, else the defaults), the others to
    the run config (`config.load_config`)."""
    mine = [o for o in overrides if _key(o).startswith("r1.")]
    cfg = load_config(name_or_path, [o for o in overrides if o not in mine])  # a bad file fails here, in one line
    rc = R1Config()
    path = config_file(name_or_path)
    if path is not None:
        spec = importlib.util.spec_from_file_location(f"_deepjax_r1_config_{abs(hash(path))}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        if hasattr(mod, "get_r1_config"):
            rc = mod.get_r1_config()
            if not isinstance(rc, R1Config):
                raise ConfigError(f"config file {path!r}: get_r1_config() returned {type(rc).__name__}, not an "
                                  f"R1Config")
    return cfg, apply_overrides(rc, mine)


def with_seed(cfg: Config, seed: int) -> Config:
    return r1zero.with_seed(cfg, seed)


# ---- non-reasoning data (a generated stand-in) ----------------------------------------------------------------------

_WORDS = ("red", "blue", "green", "cat", "dog", "sun", "tree", "river", "stone", "bird", "apple", "house", "moon",
          "road", "book", "fish")
_GREETINGS = ("Hello", "Hi", "Hello there", "Good morning", "Hi, how are you?", "Hey")
_IDENTITY = ("Who are you?", "What are you?", "What can you do?", "Introduce yourself.")


def non_reasoning(n: int, seed: int) -> list[dict]:
    """n distinct non-reasoning prompt / completion pairs, a pure function of (n, seed): greetings and
    self-cognition questions with fixed replies, and copy / capitalize requests over a small word list. Answered
    directly, without a <think> part (R1 gives simple queries no chain of thought). A stand-in for R1's ~200k
    non-reasoning SFT samples (writing, factual QA, self-cognition, translation), which have no offline, CPU-sized
    counterpart here. Records as the `traces` data source reads them (task "chat", no reference answer)."""
    rng = random.Random(f"r1-non-reasoning/{seed}")
    out, seen = [], set()
    fixed = [(q, "Hello! Ask me to compute something.") for q in _GREETINGS]
    fixed += [(q, "I am a tiny model trained by deepjax. I do sums.") for q in _IDENTITY]
    for q, a in fixed[:n]:
        seen.add(q)
        out.append({"question": q, "completion": a, "answer": "", "task": "chat"})
    tries = 0
    while len(out) < n and tries < 100 * n:
        tries += 1
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 4)))
        q, a = rng.choice([(f"Repeat the words: {words}", words), (f"Write in capitals: {words}", words.upper())])
        if q not in seen:
            seen.add(q)
            out.append({"question": q, "completion": a, "answer": "", "task": "chat"})
    return out


# ---- the stages ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Stage:
    name: str  # one of STAGES: its run directory under the work directory
    dir: paths.Path
    cfg: Config  # the stage's run config (its config.json)
    kind: str  # train | cold_start | grpo | rejection_sft
    settings: dict  # what its done marker must match: config, R1 fields outside it, the evaluation, the traces
    traces_cfg: Optional[Config] = None  # rejection_sft: the config `distill.write_traces` samples with


def _jsonable(x):
    return json.loads(json.dumps(x))  # tuples as lists: comparable with what a JSON file gives back


def eval_settings(cfg: Config, rc: R1Config) -> dict:
    e = cfg.rl.eval
    return {"task": cfg.data.source, "task_seed": cfg.data.task_seed, **tasks.options_of(cfg.data),
            "problems": e.problems, "k": rc.eval_k, "temperature": e.temperature, "top_p": e.top_p,
            "max_new_tokens": cfg.rl.rollout.max_new_tokens, "seed": cfg.seed, "reward": dataclasses.asdict(cfg.rl.reward)}


def plan(cfg: Config, rc: R1Config, workdir) -> list[Stage]:
    """The five stages' run directories and configs (cfg.data.data_dir already set), computed before any runs."""
    workdir = paths.Path(workdir)
    dirs = {n: workdir / n for n in STAGES}
    sft_optim = cfg.optim if rc.sft_lr is None else dataclasses.replace(cfg.optim, lr=rc.sft_lr)
    ev = eval_settings(cfg, rc)

    def stage(name, scfg, kind, extra=None, traces_cfg=None):
        settings = {"config": to_dict(scfg), "eval": ev, **(extra or {})}
        return Stage(name, dirs[name], scfg, kind, _jsonable(settings), traces_cfg)

    def from_base(c: Config) -> Config:  # SFT initialized from the base's newest checkpoint (`distill.init_student`)
        return dataclasses.replace(c, optim=sft_optim, distill=dataclasses.replace(
            c.distill, student_init=str(dirs["0_base"]), student_init_step=None))

    def grpo(init: str, steps: int) -> Config:
        return dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, steps=steps, init_from=str(dirs[init]),
                                                               init_step=None))

    cold = from_base(dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, recheck_share=1.0, freeform_share=0.0, num_train=rc.cold_start_examples),
        train=dataclasses.replace(cfg.train, steps=rc.cold_start_steps)))
    traces_cfg = dataclasses.replace(cfg, distill=dataclasses.replace(
        cfg.distill, teacher=str(dirs["2_reasoning_rl"]), teacher_step=None))
    sft = distill.student_config(traces_cfg, dirs["3_rejection_sft"])
    files = [sft.data.path] + ([str(dirs["3_rejection_sft"] / "traces" / "non_reasoning.jsonl")]
                               if rc.non_reasoning_examples else [])
    sft = from_base(dataclasses.replace(sft, data=dataclasses.replace(sft.data, path=",".join(files)),
                                        train=dataclasses.replace(cfg.train, steps=rc.sft_steps)))
    return [stage("0_base", cfg, "train"),
            stage("1_cold_start", cold, "cold_start"),
            stage("2_reasoning_rl", grpo("1_cold_start", rc.reasoning_rl_steps), "grpo"),
            stage("3_rejection_sft", sft, "rejection_sft",
                  {"traces": distill.trace_settings(traces_cfg), "non_reasoning_examples": rc.non_reasoning_examples},
                  traces_cfg),
            stage("4_all_rl", grpo("3_rejection_sft", rc.all_rl_steps), "grpo")]


def _flat(d, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def differences(want: dict, have: dict) -> list[str]:
    """The dotted keys whose values differ between two nested dicts (missing on one side included)."""
    a, b = _flat(want), _flat(have)
    return sorted(k for k in set(a) | set(b) if a.get(k, "<missing>") != b.get(k, "<missing>"))


def _read_json(path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.exists() else None


def check(stages: Sequence[Stage]) -> None:
    """Raises one ConfigError when a stage directory was made with other settings than the ones planned now."""
    for st in stages:
        marker = _read_json(st.dir / MARKER)
        if marker is not None:
            found = [("its done marker " + MARKER, differences(st.settings, marker.get("settings", {})))]
        else:
            found = []
            cfg_json = _read_json(st.dir / "config.json")
            if cfg_json is not None:
                found.append(("config.json", differences(st.settings["config"], cfg_json)))
            stats = _read_json(st.dir / "traces" / "stats.json")
            if stats is not None and "traces" in st.settings:
                found.append(("traces/stats.json", differences(st.settings["traces"], stats.get("settings", {}))))
        for where, diff in found:
            if diff:
                more = f" and {len(diff) - 6} more" if len(diff) > 6 else ""
                raise ConfigError(f"r1: stage {st.name} in {st.dir} was run with other settings ({where}: "
                                  f"{', '.join(diff[:6])}{more} differ); rerun with the settings it was made with, "
                                  f"use a new --workdir, or delete {st.dir} and the later stages to redo them")


# ---- evaluation ---------------------------------------------------------------------------------------------------

def evaluate_stage(cfg: Config, rc: R1Config, stage_dir, progress: bool = True) -> tuple[dict, dict]:
    """(row, full result) of the stage's newest checkpoint on the held-out problems of cfg's task. As
    `evaluate.run`, except that the task comes from the shared config: stage 3's run directory trains on traces
    and has no held-out split of its own."""
    scfg, step, graphdef, params, mesh, rules = TR.load_params(stage_dir)  # the stage's template and tokenizer
    examples = evaluate.held_out(cfg, cfg.rl.eval.problems)
    comps = evaluate.sample_completions(scfg, graphdef, params, mesh, rules, examples, rc.eval_k,
                                        cfg.rl.eval_sampling(), seed=cfg.seed, progress=progress)
    del params
    result = RM.summarize(examples, comps, reward_cfg=cfg.rl.reward)
    flat = [(ex, c) for ex, cs in zip(examples, comps) for c in cs]
    row = r1zero.breakdown(result)
    row.update(step=step,  # breakdown gives the re-check share and the mean length
               format=float(np.mean([rewards.format_reward(ex, c, cfg=cfg.rl.reward) == 1.0 for ex, c in flat])),
               language=float(np.mean([rewards.language_consistency_reward(ex, c, cfg=cfg.rl.reward)
                                       for ex, c in flat])))
    result.update(step=step, k=rc.eval_k, examples=[{"question": ex["question"], "completions": cs[:2]}
                                                    for ex, cs in zip(examples[:8], comps[:8])])
    return row, result


# ---- the pipeline -------------------------------------------------------------------------------------------------

def _run_stage(st: Stage, rc: R1Config, progress: bool) -> dict:
    """Runs (or resumes) one stage's training; returns what its done marker keeps besides the evaluation."""
    if st.kind == "train":
        return {"last": T.train(st.cfg, st.dir, progress=progress)}
    if st.kind == "grpo":
        out = loop.grpo(st.cfg, st.dir, progress=progress)
        return {"last": out["last"]}
    extra = {}
    if st.kind == "rejection_sft":
        stats = distill.write_traces(st.traces_cfg, st.dir, progress)
        why = ", ".join(f"{r.replace('_', ' ')} {n}" for r, n in stats["rejected"].items() if n) or "none"
        print(f"      traces: {stats['kept']} of {stats['samples']} samples kept, {stats['prompts_with_a_trace']} of "
              f"{stats['prompts']} prompts (rejected: {why})", flush=True)
        if rc.non_reasoning_examples:
            recs = non_reasoning(rc.non_reasoning_examples, st.cfg.data.task_seed)
            paths.write_text_atomic(st.dir / "traces" / "non_reasoning.jsonl",
                                    "".join(json.dumps(r) + "\n" for r in recs))  # the same bytes on every run
        extra["traces"] = {k: v for k, v in stats.items() if k not in ("settings", "resumed")}
        print(f"      SFT of the base on {stats['kept']} traces + {rc.non_reasoning_examples} non-reasoning examples, "
              f"{st.cfg.train.steps} steps", flush=True)
    distill.init_student(st.cfg, st.dir)
    extra["last"] = T.train(st.cfg, st.dir, progress=progress)
    return extra


def _describe(st: Stage, rc: R1Config) -> str:
    c = st.cfg
    if st.name == "0_base":
        return (f"{c.train.steps} steps on {c.data.source} (free-form share {c.data.freeform_share:g}, slips "
                f"{c.data.slip_share:g})")
    if st.name == "1_cold_start":
        return (f"SFT of the base on {c.data.num_train} long-CoT problems (worked, re-checked, tagged), "
                f"{c.train.steps} steps")
    if st.kind == "grpo":
        w = c.rl.reward
        return (f"GRPO from {os.path.basename(str(c.rl.init_from))}, {c.rl.steps} steps x {c.rl.prompts_per_step} "
                f"prompts x {c.rl.loss.group_size} samples, reward {w.accuracy:g} accuracy + {w.format:g} format + "
                f"{w.language:g} language")
    d = st.traces_cfg.distill
    return (f"rejection sampling from 2_reasoning_rl ({d.k} samples x {d.prompts or c.data.num_train} prompts), "
            f"then SFT of the base")


def run(cfg: Config, rc: R1Config, workdir, progress: bool = True) -> dict:
    """Runs (or resumes) the stages (module docstring) in `workdir`; returns the summary written to r1.json."""
    rc.validate()
    workdir = paths.run_path(workdir)
    if paths.is_remote(workdir):
        raise paths.StorageError(f"--workdir={str(workdir)}: stage 3 reads its traces as local data files; use a "
                                 f"local work directory")
    TR.check_data_dir(cfg.data.data_dir)
    if cfg.data.source not in tasks.TASKS:
        raise ConfigError(f"data.source={cfg.data.source!r}: the R1 pipeline needs a generated task with a verifier "
                          f"({', '.join(tasks.TASKS)})")
    if cfg.data.data_dir is None:  # one dataset directory for every stage
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data_dir=TR.default_data_dir(workdir)))
    stages = plan(cfg, rc, workdir)
    check(stages)  # before anything runs: a changed setting is an error, not a half-redone pipeline
    rows, times, traces = {}, {}, None
    for i, st in enumerate(stages):
        marker = _read_json(st.dir / MARKER)
        head = f"[{i}/{len(stages) - 1}] {LABELS[st.name]} ({st.name})"
        if marker is not None:
            print(f"{head}: done, skipped ({st.dir / MARKER})", flush=True)
        else:
            print(f"{head}: {_describe(st, rc)} -> {st.dir}", flush=True)
            t0 = time.perf_counter()
            extra = _run_stage(st, rc, progress)
            t1 = time.perf_counter()
            print(f"      evaluating: {cfg.rl.eval.problems} held-out problems x {rc.eval_k} samples", flush=True)
            row, result = evaluate_stage(cfg, rc, st.dir, progress)
            seconds = {"train_s": t1 - t0, "eval_s": time.perf_counter() - t1}
            paths.write_text_atomic(st.dir / EVAL_FILE, json.dumps(result, indent=1))
            marker = {"stage": st.name, "settings": st.settings, "eval": row, "seconds": seconds, **extra}
            paths.write_text_atomic(st.dir / MARKER, json.dumps(marker, indent=1))  # last: the stage is done
        row = marker["eval"]
        rows[st.name], times[st.name] = row, marker["seconds"]
        traces = marker.get("traces", traces)
        print(f"      pass@1 {100 * row['pass@1']:.1f}%, cons@{row['k']} {100 * row['cons@k']:.1f}%, checkable "
              f"{100 * row['answered']:.1f}%, re-checked {100 * row['rechecked']:.1f}%", flush=True)
    summary = {"seed": cfg.seed, "workdir": str(workdir), "stages": list(STAGES), "eval": rows, "times": times,
               "traces": traces, "r1": dataclasses.asdict(rc)}
    paths.write_text_atomic(workdir / "r1.json", json.dumps(summary, indent=1))
    if cfg.train.plot:
        plot(summary, workdir / "r1.png")
    return summary


# ---- the summary --------------------------------------------------------------------------------------------------

ROWS = (("pass@1", "pass@1"), ("cons@k", "cons@{k}"), ("pass@k", "pass@{k}"),
        ("answered", "checkable answer"), ("accuracy_when_answered", "accuracy of those"),
        ("format", "R1 format"), ("rechecked", "re-checks its work"), ("language", "language reward"))


def format_summary(summary: dict) -> str:
    """The stage x metric table `deepjax r1` prints (percentages; mean characters last)."""
    ev = summary["eval"]
    first = ev[STAGES[0]]
    names = [LABELS[s] for s in STAGES]
    w = max(len(n) for n in names) + 2
    title = f"held-out ({first['n_problems']} problems, k={first['k']})"
    lines = [f"{title:<24}" + "".join(f"{n:>{w}}" for n in names)]
    for key, name in ROWS:
        lines.append(f"{name.format(k=first['k']):<24}" + "".join(f"{100 * ev[s][key]:>{w - 1}.1f}%" for s in STAGES))
    lines.append(f"{'mean characters':<24}" + "".join(f"{ev[s]['mean_chars']:>{w}.1f}" for s in STAGES))
    tr = summary.get("traces")
    if tr:
        lines.append(f"rejection sampling: {tr['kept']} of {tr['samples']} samples kept "
                     f"({100 * tr['kept_share']:.1f}%), {tr['prompts_with_a_trace']} of {tr['prompts']} prompts")
    return "\n".join(lines)


def plot(summary: dict, path) -> None:
    ev, workdir = summary["eval"], paths.Path(summary["workdir"])
    k = ev[STAGES[0]]["k"]
    fig = Figure(figsize=(18, 4.5))
    ax = fig.subplots(1, 3)
    keys = [key for key, _ in ROWS if key != "pass@k"]
    labels = [name.format(k=k).replace(" ", "\n", 1) for key, name in ROWS if key != "pass@k"]
    width = 0.8 / len(STAGES)
    for j, s in enumerate(STAGES):
        ax[0].bar([i + (j - (len(STAGES) - 1) / 2) * width for i in range(len(keys))],
                  [100 * ev[s][key] for key in keys], width, label=LABELS[s])
    ax[0].set_xticks(range(len(keys)), labels, fontsize=8), ax[0].set_ylabel("%"), ax[0].legend(fontsize=8)
    ax[0].set_title(f"held-out, {ev[STAGES[0]]['n_problems']} problems x {k} samples, after each stage")
    for s in ("2_reasoning_rl", "4_all_rl"):  # in the bars' colours
        hist = TR.read_history(workdir / s / "metrics.jsonl")
        steps, color = sorted(hist), f"C{STAGES.index(s)}"
        ax[1].plot(steps, [hist[t]["accuracy"] for t in steps], color=color, label=f"{LABELS[s]}: accuracy")
        ax[1].plot(steps, [hist[t]["reward"] for t in steps], "--", color=color, label=f"{LABELS[s]}: reward")
    ax[1].set_xlabel("GRPO step"), ax[1].set_title("rollouts (train prompts)"), ax[1].legend(fontsize=8)
    ax[2].bar(range(len(STAGES)), [ev[s]["mean_chars"] for s in STAGES])
    ax[2].set_xticks(range(len(STAGES)), [LABELS[s].replace(" ", "\n", 1) for s in STAGES], fontsize=8)
    ax[2].set_title("mean completion length (characters)")
    fig.tight_layout()
    paths.save_figure(fig, path, dpi=100)


__all__ = ["R1Config", "Stage", "STAGES", "LABELS", "default_config", "load", "apply_overrides", "with_seed",
           "non_reasoning", "plan", "check", "differences", "evaluate_stage", "run", "format_summary", "plot"]

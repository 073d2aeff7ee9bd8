"""`deepjax r1zero`: the R1-Zero story end to end, small enough for a laptop CPU (about 11 minutes on 2 cores).

    deepjax r1zero                                   # runs/r1zero, the built-in default (configs/r1zero.py)
    deepjax r1zero --seed 1 --workdir runs/r1zero_s1 --config.rl.steps=150

Stages (each resumes if its run directory already holds it):

1. data: three-term chains of one-digit additions and subtractions (`tasks.generate`, data.terms = 3: 4,000
   questions, 400 held out and never trained on), built as a TFDS ArrayRecord dataset;
2. base (`<workdir>/base`, `deepjax train`): the `tiny` MoE-MLA pretrained on worked chains ("9 - 9 = 0, 0 + 1 = 1")
   that are imperfect on purpose, so that the base is weak in the ways R1-Zero's base is: data.freeform_share of
   them state the answer in words instead of <answer> tags (uncheckable), data.slip_share make one slip carried to
   a wrong answer, and data.recheck_share check the chain by undoing it and work it again when the check fails
   (`tasks.sft_completion`). The base states a checkable answer in about 80% of its samples, half of them right;
3. before: the held-out problems (`deepjax eval`: 16 samples each at temperature 0.6, top-p 0.95, as R1);
4. GRPO (`<workdir>/grpo`, `deepjax grpo`): rule-based rewards only (accuracy + 0.1 format), group advantages,
   KL to the base with beta 0.001 (as R1-Zero), Dr. GRPO's aggregation (no 1/|o| length normalization), rollouts at
   temperature 0.8, learning rate 1e-4;
5. after: the same evaluation of the GRPO policy (same problems, k, sampling settings and seed).

Printed and written to `<workdir>/r1zero.json` and `<workdir>/r1zero.png`: pass@1, cons@k and pass@k before and
after, where the change comes from (the share of samples with a checkable answer, and the accuracy of those), the
share of samples that re-check their work and their length, each with its standard error over problems; the plot
adds the rollouts' reward, accuracy, format, re-check share and length per GRPO step. docs/LOG.md has the design's
history (the one-step task it replaces learned the format, not the answers).
"""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np

from matplotlib.figure import Figure

from deepjax import paths
from deepjax.model import presets
from deepjax.config import Config
from deepjax.data.config import DataConfig
from deepjax.rl import evaluate
from deepjax.rl import loop
from deepjax.infer.sampling import SamplingConfig
from deepjax.rl.config import EvalConfig, RLConfig
from deepjax.rl.loss import GRPOConfig
from deepjax.train import loop as T
from deepjax.train import run as TR
from deepjax.train.config import OptimConfig, TrainConfig

K_EVAL = 16  # samples per held-out problem in the before / after evaluation


def default_config() -> Config:
    return Config(
        model=presets.tiny(),
        seed=0,
        data=DataConfig(source="arithmetic", template="plain", max_digits=1, ops="+-", terms=3, num_train=2000,
                        num_test=400, freeform_share=0.3, slip_share=0.3, recheck_share=0.3,
                        # 160-token rows (an example is up to 140 tokens): the base's attention costs T^2 per row,
                        # so 24 x 160 runs ~35% faster than 16 x 256 for about the same tokens (docs/LOG.md,
                        # session 15); 24 divides over 1-4, 6, 8, 12 and 24 devices
                        seq_len=160, global_batch=24),
        optim=OptimConfig(lr=3e-3, schedule="warmup_cosine", warmup_steps=20),
        train=TrainConfig(steps=1200, checkpoint_every=1200, log_every=50),
        rl=RLConfig(steps=100, prompts_per_step=16, lr=1e-4,
                    loss=GRPOConfig(beta=0.001, group_size=8, aggregation="dr_grpo"),
                    rollout=SamplingConfig(max_new_tokens=112, temperature=0.8),
                    eval=EvalConfig(every=0, problems=256, k=8)),
    )


def with_seed(cfg: Config, seed: int) -> Config:
    """The run's seed: parameter init, data order and every sampling key."""
    return dataclasses.replace(cfg, seed=seed, data=dataclasses.replace(cfg.data, seed=seed))


def _per_problem(result: dict) -> dict:
    """Per held-out problem: the numerators / denominators every figure of `breakdown` pools."""
    pr = result["problems"]
    arr = lambda xs: np.asarray(xs, np.float64)  # noqa: E731
    answered = [[a is not None for a in p["answers"]] for p in pr]
    return {"n": arr([p["n"] for p in pr]), "correct": arr([sum(p["correct"]) for p in pr]),
            "majority_correct": arr([p["majority_correct"] for p in pr]), "any": arr([any(p["correct"]) for p in pr]),
            "answered": arr([sum(a) for a in answered]),
            "answered_correct": arr([sum(c for a, c in zip(aa, p["correct"]) if a) for aa, p in zip(answered, pr)]),
            "rechecked": arr([p.get("n_rechecked", 0) for p in pr]),
            "chars": arr([p.get("mean_chars", 0.0) * p["n"] for p in pr])}


def _figures(c: dict) -> dict:
    return {"pass@1": c["correct"].sum() / c["n"].sum(), "cons@k": c["majority_correct"].mean(),
            "pass@k": c["any"].mean(), "answered": c["answered"].sum() / c["n"].sum(),
            "accuracy_when_answered": c["answered_correct"].sum() / max(c["answered"].sum(), 1.0),
            "rechecked": c["rechecked"].sum() / c["n"].sum(), "mean_chars": c["chars"].sum() / c["n"].sum()}


def breakdown(result: dict, resamples: int = 1000, seed: int = 0) -> dict:
    """pass@1 / cons@k / pass@k with k = the samples per problem (the largest k of the table), the share of samples
    whose answer could be extracted (`answered`) and the accuracy among those (`accuracy_when_answered`), the share
    of samples that re-check their work (`tasks.rechecked`) and their mean length in characters; `se` holds each
    figure's standard error over problems (a bootstrap: problems drawn with replacement, `resamples` times)."""
    row = result["table"][-1]
    c = _per_problem(result)
    out = {"k": row["k"], **_figures(c), "n_problems": len(result["problems"])}
    rng = np.random.default_rng(seed)
    n = len(c["n"])
    draws = [_figures({k: v[idx] for k, v in c.items()}) for idx in rng.integers(0, n, (resamples, n))]
    out["se"] = {k: float(np.std([d[k] for d in draws])) for k in draws[0]}
    return out


ROWS = (("pass@1", "pass@1"), ("cons@k", "cons@{k}"), ("pass@k", "pass@{k}"),
        ("answered", "samples with a checkable answer"), ("accuracy_when_answered", "accuracy of those"),
        ("rechecked", "samples that re-check"))


def format_summary(before: dict, after: dict) -> str:
    """The before / after table: each figure with its standard error over problems (± in points)."""
    k = before["k"]
    lines = [f"{'held-out (' + str(before['n_problems']) + ' problems, k=' + str(k) + ')':<34} {'base':>14} "
             f"{'GRPO':>14} {'change':>8}"]
    se = lambda d, key: 100 * d.get("se", {}).get(key, float("nan"))  # noqa: E731
    for key, name in ROWS:
        b, a = 100 * before[key], 100 * after[key]
        lines.append(f"{name.format(k=k):<34} {b:>6.1f}% ± {se(before, key):>4.1f} {a:>6.1f}% ± {se(after, key):>4.1f} "
                     f"{a - b:>+8.1f}")
    b, a = before.get("mean_chars"), after.get("mean_chars")
    if b is not None and a is not None:
        lines.append(f"{'mean length (characters)':<34} {b:>14.1f} {a:>14.1f} {a - b:>+8.1f}")
    return "\n".join(lines)


def plot(before: dict, after: dict, grpo_dir, path) -> None:
    hist = TR.read_history(paths.Path(grpo_dir) / "metrics.jsonl")
    evals = TR.read_jsonl(paths.Path(grpo_dir) / "eval.jsonl")
    fig = Figure(figsize=(21, 4.2))
    ax = fig.subplots(1, 4)
    keys = ["pass@1", "cons@k", "pass@k", "answered", "accuracy_when_answered", "rechecked"]
    labels = ["pass@1", f"cons@{before['k']}", f"pass@{before['k']}", "checkable\nanswer", "accuracy of\nthose",
              "re-checks"]
    x = range(len(keys))
    se = lambda d, k: 100 * d.get("se", {}).get(k, 0.0)  # noqa: E731
    ax[0].bar([i - 0.2 for i in x], [100 * before.get(k, 0.0) for k in keys], 0.4, label="base",
              yerr=[se(before, k) for k in keys])
    ax[0].bar([i + 0.2 for i in x], [100 * after.get(k, 0.0) for k in keys], 0.4, label="after GRPO",
              yerr=[se(after, k) for k in keys])
    ax[0].set_xticks(list(x), labels), ax[0].set_ylabel("%"), ax[0].legend()
    ax[0].set_title(f"held-out, {before['n_problems']} problems x {before['k']} samples")
    steps = sorted(hist)
    get = lambda k: [hist[s].get(k, np.nan) for s in steps]  # noqa: E731
    for k, name in (("reward", "reward"), ("accuracy", "accuracy"), ("format", "format"),
                    ("rechecked", "re-checks")):
        ax[1].plot(steps, get(k), label=name)
    ax[1].set_xlabel("GRPO step"), ax[1].set_title("rollouts (train prompts)"), ax[1].legend()
    ax[2].plot(steps, get("response_length"))
    ax[2].set_xlabel("GRPO step"), ax[2].set_title("rollout length (tokens)")
    if evals:
        ax[3].plot([0] + [e["step"] for e in evals], [100 * before["pass@1"]] + [100 * e["pass@1"] for e in evals],
                   "o-")
    ax[3].set_xlabel("GRPO step"), ax[3].set_ylabel("%"), ax[3].set_title("held-out pass@1 during GRPO")
    fig.tight_layout()
    paths.save_figure(fig, path, dpi=100)


def run(cfg: Config, workdir, k: int = K_EVAL, progress: bool = True) -> dict:
    """Runs the stages (module docstring) in `workdir` (local or gs://); returns the summary written to
    r1zero.json."""
    workdir = paths.run_path(workdir)
    TR.check_data_dir(cfg.data.data_dir)
    base_dir, grpo_dir = workdir / "base", workdir / "grpo"
    if cfg.data.data_dir is None:  # one dataset for both stages (a local cache under a gs:// workdir)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data_dir=TR.default_data_dir(workdir)))
    r = cfg.rl
    times = {}

    def held_out(d):
        res = evaluate.run(d, k=k, problems=r.eval.problems, temperature=r.eval.temperature, top_p=r.eval.top_p,
                           max_new_tokens=r.rollout.max_new_tokens, seed=cfg.seed, progress=progress)
        return breakdown(res)

    t = time.perf_counter()
    print(f"[1/4] base: tiny MoE-MLA, {cfg.train.steps} steps on {cfg.data.source} "
          f"(max_digits {cfg.data.max_digits}, ops {cfg.data.ops!r}) -> {base_dir}", flush=True)
    T.train(cfg, base_dir, progress=progress)
    times["base_s"] = time.perf_counter() - t

    t = time.perf_counter()
    print(f"[2/4] evaluating the base: {r.eval.problems} held-out problems x {k} samples", flush=True)
    before = held_out(base_dir)
    print(f"      base pass@1 {100 * before['pass@1']:.1f}%", flush=True)
    times["eval_before_s"] = time.perf_counter() - t

    t = time.perf_counter()
    print(f"[3/4] GRPO: {r.steps} steps x {r.prompts_per_step} prompts x {r.loss.group_size} samples -> {grpo_dir}",
          flush=True)
    grpo_cfg = dataclasses.replace(cfg, rl=dataclasses.replace(r, init_from=str(base_dir), init_step=None))
    loop.grpo(grpo_cfg, grpo_dir, progress=progress)
    times["grpo_s"] = time.perf_counter() - t

    t = time.perf_counter()
    print("[4/4] evaluating the GRPO policy", flush=True)
    after = held_out(grpo_dir)
    times["eval_after_s"] = time.perf_counter() - t

    summary = {"seed": cfg.seed, "before": before, "after": after,
               "pass@1_change_points": 100 * (after["pass@1"] - before["pass@1"]), "times": times,
               "workdir": str(workdir)}
    paths.write_text_atomic(workdir / "r1zero.json", json.dumps(summary, indent=1))
    if cfg.train.plot:
        plot(before, after, grpo_dir, workdir / "r1zero.png")
    return summary


__all__ = ["default_config", "with_seed", "run", "breakdown", "format_summary", "plot", "K_EVAL"]

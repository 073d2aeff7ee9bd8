"""R1's distillation claim at CPU scale (issue 21.4; docs/distill.md, "The distillation claim at small scale").

R1 (section 4.1): Qwen-32B trained by large-scale RL reaches 47.0 on AIME 2024, the same model SFT-trained on R1's
verified traces (R1-Distill-Qwen-32B) 72.6: distilling a stronger model beats RL on the small one. Here, on the
R1-Zero task of `deepjax r1zero` (three-term one-digit chains; deepjax/rl/r1zero.py):

1. teacher (`<workdir>/teacher`, one run, seed --teacher-seed): a LARGER MoE-MLA (--teacher-hidden / --teacher-layers,
   the other widths scaled with it) through the whole `r1zero.run`: base on the worked chains, GRPO, evaluation;
2. for each seed, a student of r1zero's default size (`presets.tiny`, or the --student-* sizes):
   (a) `<workdir>/s<seed>`: `r1zero.run` on its defaults: base, then GRPO directly (the RL student);
   (b) `<workdir>/s<seed>/distill`: `distill.run` in mode=traces: the teacher samples --trace-k completions of each
       TRAIN prompt (temperature 0.6, top-p 0.95, as R1), the rejection filter keeps the correct, well-formatted,
       one-language ones, and the SAME base as (a) is SFT-trained on them (R1-Distill);
3. held-out pass@1 and cons@k (k = --k samples of --problems held-out problems, temperature 0.6, top-p 0.95; the
   standard errors are `r1zero.breakdown`'s bootstrap over problems) for the teacher, (a) and (b), per seed and mean.
   (a) and the teacher take r1zero.json's "after" evaluation; (b) is evaluated by the same calls
   (`evaluate.held_out` / `sample_completions`, `metrics.summarize`, `r1zero.breakdown`), same problems, k, sampling
   and seed, with the task's data config in place of the traces source.

Compute, matched per seed: (b)'s SFT steps are chosen so that its training FLOPs equal (a)'s GRPO FLOPs (the
shared base excluded: both start from it). FLOPs = 6 x N x tokens for a forward + backward, 2 x N x tokens for a
forward (a sampled token, a prefill token, a log-prob), N the matmul-active parameters of the main model
(`transformer.count_active_params` less the embedding lookup; the MTP head and the attention's T^2 term left out,
in every stage alike). GRPO per step: rows = prompts x G, tokens = rows x (mean prompt tokens + the step's mean
response length, metrics.jsonl), FLOPs = (2 sampling + 2 reference log-probs when beta > 0 + 6 mu) x N x tokens.
SFT per step: 6 x N x global_batch x seq_len (packed rows, padding counted). The teacher's trace sampling,
2 x N_teacher x samples x (prompt + completion tokens; the completion length of the kept traces stands for all),
is NOT in the match (R1 does not count it: one teacher serves every student), and is reported beside it, as is the
teacher's own training.

    PYTHONPATH=. python bench/distill_claim.py /tmp/claim                    # everything, from scratch (~2 h here)
    PYTHONPATH=. python bench/distill_claim.py /tmp/dc/claim --reuse-students '/tmp/exp2/s{seed}'   # docs/distill.md
    PYTHONPATH=. python bench/distill_claim.py /tmp/smoke --smoke --seeds 0  # a tiny run: 5.5 min on 2 loaded cores

Every stage is skipped when its output exists (r1zero.json, distill/traces/stats.json + the student's checkpoint,
distill/eval.json), so a rerun resumes. --reuse-students copies a seed's finished `deepjax r1zero --seed S` run
(base/, grpo/, r1zero.json) in when its config equals the one this script would run (else an error). Writes
<workdir>/distill_claim.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time

import numpy as np

from deepjax import paths
from deepjax.config import to_dict
from deepjax.data import tasks
from deepjax.data.tokenizer import load_tokenizer
from deepjax.infer import text
from deepjax.infer.sampling import SamplingConfig
from deepjax.model import transformer
from deepjax.rl import distill, evaluate, r1zero
from deepjax.rl import metrics as RM
from deepjax.rl.config import DistillConfig
from deepjax.train import run as TR


# ---- compute ------------------------------------------------------------------------------------------------------

def matmul_params(model_cfg) -> int:
    """N: parameters a token's forward multiplies by (main model: the chosen experts, no embedding lookup, no MTP)."""
    _, params = transformer.abstract_init(model_cfg)
    return transformer.count_active_params(model_cfg, params) - model_cfg.vocab_size * model_cfg.hidden_size


def sft_flops(n: int, steps: int, global_batch: int, seq_len: int) -> float:
    """6 N per token of every packed row (padding included)."""
    return 6.0 * n * steps * global_batch * seq_len


def grpo_step_flops(n: int, rows: int, prompt_tokens: float, response_tokens: float, beta: float, mu: int) -> float:
    """One GRPO step: rows sampled (2 N per prompt and response token), their reference log-probs (2 N, beta > 0
    only) and mu updates on them (6 N each)."""
    per_token = 2.0 + (2.0 if beta > 0 else 0.0) + 6.0 * mu
    return per_token * n * rows * (prompt_tokens + response_tokens)


def grpo_flops(n: int, history: list[dict], rows: int, prompt_tokens: float, beta: float, mu: int) -> float:
    """A GRPO run from its metrics.jsonl lines (each step's mean `response_length`)."""
    return sum(grpo_step_flops(n, rows, prompt_tokens, h["response_length"], beta, mu) for h in history)


def sampling_flops(n: int, samples: int, tokens_per_sample: float) -> float:
    return 2.0 * n * samples * tokens_per_sample


def matched_sft_steps(target_flops: float, n: int, global_batch: int, seq_len: int) -> int:
    """The SFT steps whose FLOPs come nearest to target_flops (at least 1)."""
    return max(1, int(round(target_flops / sft_flops(n, 1, global_batch, seq_len))))


def mean_prompt_tokens(cfg) -> float:
    """Mean prompt length (BOS + template + question) of the train prompts, in the run's tokenizer."""
    tok = load_tokenizer(cfg.data.tokenizer)
    qs = [ex["question"] for ex in tasks.generate(cfg.data.source, cfg.data.num_train, cfg.data.task_seed, "train",
                                                     **tasks.options_of(cfg.data))]
    return float(np.mean([len(p) for p in text.prompt_ids(tok, cfg.data.template, qs)]))


def run_flops(cfg, run_dir) -> dict:
    """Training FLOPs of an r1zero run directory: base (SFT) and GRPO, with N and the token counts used."""
    n = matmul_params(cfg.model)
    base = sft_flops(n, cfg.train.steps, cfg.data.global_batch, cfg.data.seq_len)
    hist = [h for h in TR.read_jsonl(paths.Path(run_dir) / "grpo" / "metrics.jsonl") if "response_length" in h]
    r = cfg.rl
    rows = r.prompts_per_step * r.loss.group_size
    p = mean_prompt_tokens(cfg)
    return {"n_matmul_params": n, "base": base, "grpo": grpo_flops(n, hist, rows, p, r.loss.beta, r.loss.mu),
            "grpo_steps": len(hist), "grpo_rows_per_step": rows, "prompt_tokens": p,
            "mean_response_tokens": float(np.mean([h["response_length"] for h in hist])) if hist else 0.0}


# ---- configs ------------------------------------------------------------------------------------------------------

def scaled_model(model_cfg, hidden: int, layers: int):
    """The tiny preset at another width / depth, every width scaled with hidden (as presets.tiny's ratios)."""
    if hidden == model_cfg.hidden_size and layers == model_cfg.num_hidden_layers:
        return model_cfg
    return dataclasses.replace(model_cfg, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=2 * hidden,
                               moe_intermediate_size=hidden // 2, q_lora_rank=hidden // 2, kv_lora_rank=hidden // 2)


def r1zero_config(args, seed: int, teacher: bool):
    cfg = r1zero.default_config()
    # the base's rows as when docs/distill.md's figures were measured (r1zero's default was 16 x 256 then)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=256, global_batch=16))
    hidden, layers = (args.teacher_hidden, args.teacher_layers) if teacher else (args.student_hidden,
                                                                                 args.student_layers)
    base_steps = args.teacher_base_steps if teacher else args.student_base_steps
    grpo_steps = args.teacher_grpo_steps if teacher else args.grpo_steps
    rl = dataclasses.replace(cfg.rl, steps=grpo_steps, eval=dataclasses.replace(cfg.rl.eval, problems=args.problems))
    if args.smoke:
        rl = dataclasses.replace(rl, prompts_per_step=4, loss=dataclasses.replace(rl.loss, group_size=4),
                                 rollout=dataclasses.replace(rl.rollout, max_new_tokens=args.new_tokens),
                                 eval=dataclasses.replace(rl.eval, k=2))
    cfg = dataclasses.replace(cfg, model=scaled_model(cfg.model, hidden, layers), rl=rl,
                              train=dataclasses.replace(cfg.train, steps=base_steps, checkpoint_every=base_steps))
    return r1zero.with_seed(cfg, seed)


def comparable(d: dict) -> dict:
    """A config dict without what differs between equal runs in other places (paths) and without the distill
    section (r1zero does not read it; it gained fields after some runs were made)."""
    d = json.loads(json.dumps(d))
    d.pop("distill", None)
    d.get("data", {}).pop("data_dir", None)
    d.get("rl", {}).pop("init_from", None)
    for k in ("train",):
        d.get(k, {}).pop("plot", None)
    return d


def check_run(cfg, run_dir, stage: str) -> None:
    """The run directory's config (stage: base or grpo) equals cfg's, paths aside; else SystemExit naming the fields."""
    have = comparable(json.loads((paths.Path(run_dir) / stage / "config.json").read_text()))
    want = comparable(to_dict(cfg))
    diff = [f"{s}.{k}" for s in want for k in (want[s] if isinstance(want[s], dict) else [None])
            if (have.get(s, {}).get(k) if k else have.get(s)) != (want[s].get(k) if k else want[s])]
    if diff:
        raise SystemExit(f"{run_dir}/{stage}: made with another config ({', '.join(diff[:8])}); use a new workdir")


def r1zero_stage(cfg, run_dir, args, reuse: str | None = None) -> dict:
    """r1zero.run in run_dir, or its r1zero.json when there (copied from `reuse` first when given)."""
    run_dir = paths.Path(run_dir)
    if not (run_dir / "r1zero.json").exists() and reuse and (paths.Path(reuse) / "r1zero.json").exists():
        check_run(cfg, reuse, "base"), check_run(cfg, reuse, "grpo")
        for part in ("base", "grpo"):
            shutil.copytree(paths.Path(reuse) / part, run_dir / part, dirs_exist_ok=True)
        shutil.copy(paths.Path(reuse) / "r1zero.json", run_dir / "r1zero.json")
        print(f"      reused {reuse} (same config): base/, grpo/, r1zero.json", flush=True)
    if (run_dir / "r1zero.json").exists():
        check_run(cfg, run_dir, "base"), check_run(cfg, run_dir, "grpo")
        return json.loads((run_dir / "r1zero.json").read_text())
    return r1zero.run(cfg, run_dir, k=args.k, progress=args.progress)


def distill_config(cfg, args, teacher_dir, base_dir, steps: int):
    dc = DistillConfig(teacher=str(teacher_dir), student_init=str(base_dir), k=args.trace_k,
                       prompts=args.trace_prompts,
                       sampling=SamplingConfig(max_new_tokens=cfg.rl.rollout.max_new_tokens, temperature=0.6,
                                               top_p=0.95),
                       require_correct=not args.smoke, require_format=not args.smoke, eval_problems=0)
    optim = dataclasses.replace(cfg.optim, lr=args.sft_lr, warmup_steps=min(cfg.optim.warmup_steps, steps))
    train = dataclasses.replace(cfg.train, steps=steps, checkpoint_every=steps, log_every=min(50, steps))
    return dataclasses.replace(cfg, distill=dc, optim=optim, train=train)


def held_out(run_dir, task_cfg, args) -> dict:
    """r1zero's held-out evaluation (evaluate.run's calls) of any run directory, on task_cfg's task and settings:
    the same problems, k, sampling and seed as the r1zero.json of a run with task_cfg."""
    cfg, step, graphdef, params, mesh, rules = TR.load_params(run_dir)
    model_cfg = cfg if cfg.data.source in tasks.TASKS else dataclasses.replace(cfg, data=task_cfg.data)
    r = task_cfg.rl
    examples = evaluate.held_out(task_cfg, r.eval.problems)
    sc = SamplingConfig(max_new_tokens=r.rollout.max_new_tokens, temperature=r.eval.temperature, top_p=r.eval.top_p)
    comps = evaluate.sample_completions(model_cfg, graphdef, params, mesh, rules, examples, args.k, sc,
                                        task_cfg.seed, 64, args.progress)
    out = r1zero.breakdown(RM.summarize(examples, comps, reward_cfg=r.reward))
    out["step"] = step
    return out


def traces_tokens(cfg, traces_path) -> float:
    """Mean completion tokens (+ EOS) of the kept traces, in the teacher's tokenizer (the same one here)."""
    tok = load_tokenizer(cfg.data.tokenizer)
    rows = [json.loads(line) for line in paths.Path(traces_path).read_text().splitlines() if line.strip()]
    return float(np.mean([len(tok.encode(r["completion"], add_bos=False)) + 1 for r in rows])) if rows else 0.0


# ---- the table ----------------------------------------------------------------------------------------------------

def pct(d: dict, key: str) -> str:
    return f"{100 * d[key]:.1f} ± {100 * d['se'][key]:.1f}"


def table(out: dict) -> str:
    k = out["k"]
    t = out["teacher"]
    lines = [f"teacher (seed {t['seed']}, {t['n_matmul_params'] / 1e3:.0f}k matmul params): base pass@1 "
             f"{pct(t['before'], 'pass@1')} -> GRPO pass@1 {pct(t['after'], 'pass@1')}, cons@{k} "
             f"{pct(t['after'], 'cons@k')}; training {t['flops']['base'] + t['flops']['grpo']:.3g} FLOPs "
             f"(base {t['flops']['base']:.3g}, GRPO {t['flops']['grpo']:.3g})", "",
             f"| seed | student base pass@1 | (a) GRPO pass@1 | (b) distilled pass@1 | (a) cons@{k} | (b) cons@{k} "
             f"| (a) GRPO FLOPs | (b) SFT FLOPs (steps) | traces kept | teacher sampling FLOPs |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in out["seeds"]:
        lines.append(f"| {s['seed']} | {pct(s['base'], 'pass@1')} | {pct(s['grpo'], 'pass@1')} | "
                     f"{pct(s['distill'], 'pass@1')} | {pct(s['grpo'], 'cons@k')} | {pct(s['distill'], 'cons@k')} | "
                     f"{s['flops']['grpo']:.3g} | {s['flops']['sft']:.3g} ({s['sft_steps']}) | "
                     f"{s['traces']['kept']} of {s['traces']['samples']} | {s['flops']['teacher_sampling']:.3g} |")
    m = out["mean"]
    lines.append(f"| mean | {100 * m['base']['pass@1']:.1f} | {100 * m['grpo']['pass@1']:.1f} | "
                 f"{100 * m['distill']['pass@1']:.1f} | {100 * m['grpo']['cons@k']:.1f} | "
                 f"{100 * m['distill']['cons@k']:.1f} | | | | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("workdir")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--teacher-seed", type=int, default=0)
    p.add_argument("--teacher-hidden", type=int, default=128)
    p.add_argument("--teacher-layers", type=int, default=4)
    p.add_argument("--teacher-base-steps", type=int, default=1000)
    p.add_argument("--teacher-grpo-steps", type=int, default=100)
    p.add_argument("--student-hidden", type=int, default=64)
    p.add_argument("--student-layers", type=int, default=3)
    p.add_argument("--student-base-steps", type=int, default=1200)
    p.add_argument("--grpo-steps", type=int, default=100)
    p.add_argument("--trace-k", type=int, default=2, help="teacher samples per train prompt")
    p.add_argument("--trace-prompts", type=int, default=0, help="train prompts the teacher answers (0: all)")
    p.add_argument("--sft-lr", type=float, default=1e-3)
    p.add_argument("--sft-steps", type=int, default=0, help="(b)'s SFT steps; 0: matched to (a)'s GRPO FLOPs")
    p.add_argument("--problems", type=int, default=256, help="held-out problems")
    p.add_argument("--k", type=int, default=r1zero.K_EVAL, help="samples per held-out problem (cons@k)")
    p.add_argument("--new-tokens", type=int, default=112, help="--smoke only: rollout / sample length")
    p.add_argument("--reuse-students", default=None,
                   help="a finished `deepjax r1zero --seed S` run per seed, as a pattern with {seed}")
    p.add_argument("--smoke", action="store_true",
                   help="a tiny run: base 100 / GRPO 2 steps, 8 problems, the filter on truncation only")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.teacher_base_steps = args.student_base_steps = 100
        args.teacher_grpo_steps = args.grpo_steps = 2
        args.problems, args.k, args.trace_prompts, args.trace_k, args.new_tokens = 8, 2, 16, 2, 48
        args.teacher_hidden, args.teacher_layers = 96, 3
    w = paths.Path(args.workdir).absolute()
    w.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    times = {}

    t0 = time.perf_counter()
    tcfg = r1zero_config(args, args.teacher_seed, teacher=True)
    print(f"== teacher: {args.teacher_hidden} wide x {args.teacher_layers} layers, base {args.teacher_base_steps} "
          f"steps + GRPO {args.teacher_grpo_steps} steps -> {w / 'teacher'}", flush=True)
    tsum = r1zero_stage(tcfg, w / "teacher", args)
    teacher = {"seed": args.teacher_seed, "before": tsum["before"], "after": tsum["after"],
               "n_matmul_params": matmul_params(tcfg.model), "flops": run_flops(tcfg, w / "teacher"),
               "times": tsum.get("times")}
    times["teacher_s"] = time.perf_counter() - t0

    seeds = []
    for seed in args.seeds:
        t0 = time.perf_counter()
        scfg = r1zero_config(args, seed, teacher=False)
        sdir = w / f"s{seed}"
        sdir.mkdir(parents=True, exist_ok=True)
        print(f"== seed {seed} (a): student base + GRPO -> {sdir}", flush=True)
        ssum = r1zero_stage(scfg, sdir, args, args.reuse_students.format(seed=seed) if args.reuse_students else None)
        fl = run_flops(scfg, sdir)
        n = fl["n_matmul_params"]
        steps = args.sft_steps or matched_sft_steps(fl["grpo"], n, scfg.data.global_batch, scfg.data.seq_len)
        dcfg = distill_config(scfg, args, w / "teacher" / "grpo", sdir / "base", steps)
        print(f"== seed {seed} (b): the same base SFT-trained on the teacher's filtered traces, {steps} steps "
              f"({sft_flops(n, steps, scfg.data.global_batch, scfg.data.seq_len):.3g} FLOPs; (a)'s GRPO: "
              f"{fl['grpo']:.3g}) -> {sdir / 'distill'}", flush=True)
        dsum = distill.run(dcfg, sdir / "distill", progress=args.progress)
        ev_path = sdir / "distill" / "eval.json"
        if ev_path.exists():
            dev = json.loads(ev_path.read_text())
        else:
            dev = held_out(sdir / "distill" / "student", scfg, args)
            paths.write_text_atomic(ev_path, json.dumps(dev, indent=1))
        st = dsum["traces"]
        tt = traces_tokens(tcfg, sdir / "distill" / "traces" / "traces.jsonl")
        seeds.append({
            "seed": seed, "base": ssum["before"], "grpo": ssum["after"], "distill": dev, "sft_steps": steps,
            "traces": {k: st[k] for k in ("samples", "kept", "kept_share", "prompts", "prompts_with_a_trace",
                                          "rejected")},
            "flops": {"n_matmul_params": n, "base": fl["base"], "grpo": fl["grpo"],
                      "sft": sft_flops(n, steps, scfg.data.global_batch, scfg.data.seq_len),
                      "teacher_sampling": sampling_flops(teacher["n_matmul_params"], st["samples"],
                                                         fl["prompt_tokens"] + tt),
                      "trace_completion_tokens": tt, "prompt_tokens": fl["prompt_tokens"],
                      "grpo_mean_response_tokens": fl["mean_response_tokens"]},
            "times": {"r1zero": ssum.get("times"), "distill": dsum.get("times")}})
        times[f"seed{seed}_s"] = time.perf_counter() - t0
        print(f"      seed {seed}: pass@1 base {100 * ssum['before']['pass@1']:.1f}, (a) GRPO "
              f"{100 * ssum['after']['pass@1']:.1f}, (b) distilled {100 * dev['pass@1']:.1f}", flush=True)

    keys = ("pass@1", "cons@k", "pass@k", "answered", "accuracy_when_answered")
    mean = {m: {k: float(np.mean([s[m][k] for s in seeds])) for k in keys} for m in ("base", "grpo", "distill")}
    times["total_s"] = time.perf_counter() - t_all
    out = {"k": args.k, "problems": args.problems, "args": vars(args), "teacher": teacher, "seeds": seeds,
           "mean": mean, "times": times,
           "compute": "FLOPs = 6 N tokens (forward + backward), 2 N tokens (forward / sampling); N = matmul-active "
                      "params of the main model; (b)'s SFT steps match (a)'s GRPO FLOPs; the shared base and the "
                      "teacher's training and trace sampling are reported, not matched"}
    paths.write_text_atomic(w / "distill_claim.json", json.dumps(out, indent=1))
    print(table(out))
    print(f"total {times['total_s']:.0f} s; {w / 'distill_claim.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

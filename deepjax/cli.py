"""The `deepjax` command: parses the command line, loads the config, dispatches.

    deepjax info [CONFIG] [--config.FIELD=VALUE ...] [--batch B] [--length T]
    deepjax train CONFIG [--config.FIELD=VALUE ...] [--workdir DIR] [--no-progress]
    deepjax grpo CONFIG [--config.FIELD=VALUE ...] [--workdir DIR] [--no-progress]
    deepjax r1zero [CONFIG] [--config.FIELD=VALUE ...] [--workdir runs/r1zero] [--seed S] [--k 16]
    deepjax distill CONFIG --config.distill.teacher=DIR [--config.FIELD=VALUE ...] [--workdir DIR] [--no-progress]
    deepjax r1 [CONFIG] [--config.FIELD=VALUE ...] [--config.r1.FIELD=VALUE ...] [--workdir runs/r1] [--seed S]
    deepjax eval WORKDIR [--k 8] [--problems 100] [--temperature 0.6] [--top-p 0.95] [--max-new-tokens 64]
    deepjax sample SOURCE [--prompt TEXT ...] [--prompts-file F] [--template r1|plain|chat|none] [--max-new-tokens 128]
                   [--temperature 0.6] [--top-p 0.95] [--top-k 0] [--seed 0] [--config.model.FIELD=VALUE ...]
    deepjax convert HF_DIR RUN_DIR [--run-config CONFIG] [--config.FIELD=VALUE ...] [--no-progress]
    deepjax convert RUN_DIR HF_DIR [--step N] [--fp8] [--dtype bfloat16] [--shard-size 4GB] [--no-progress]

CONFIG is a file defining `get_config()` (`configs/tiny.py`) or a preset name (`tiny`, `bench`, `deepseek_v3`,
...); default `tiny`. `info` builds the model, prints its parameter table and runs one jitted forward pass on a
random batch. `train` runs or resumes training (deepjax/train/loop.py) in the work directory (default
runs/<config name>); `grpo` runs or resumes GRPO (deepjax/rl/loop.py), from rl.init_from's checkpoint.
`r1zero` runs the whole R1-Zero story (deepjax/rl/r1zero.py; default config configs/r1zero.py). `distill` trains
CONFIG's model from a teacher run, on its filtered sampled traces or on its logits (deepjax/rl/distill.py). `r1` runs
DeepSeek-R1's four stages, each its own run directory (deepjax/rl/r1.py; default config configs/r1.py).
`sample` streams completions from a run or an HF checkpoint directory (deepjax/infer/sample.py). `convert` turns an HF
safetensors checkpoint into a run directory or back, tensor by tensor (deepjax/train/convert.py).

What the user can fix (a `deepjax.errors.UserError`: a bad config, data or tokenizer file, a mesh that does not fit the
devices, a damaged checkpoint, a run stopped by non-finite steps) prints one line naming the field, file, line or step
and exits with status 2; a missing run directory exits with 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from deepjax import model as M
from deepjax import paths
from deepjax.config import Config, apply_overrides, from_dict, load_config
from deepjax.errors import NonFiniteError, UserError, one_line
from deepjax.infer import sample as SA
from deepjax.model.config import ModelConfig
from deepjax.parallel import distributed as D
from deepjax.parallel import sharding as S
from deepjax.rl import distill
from deepjax.rl import evaluate
from deepjax.rl import loop
from deepjax.rl import r1
from deepjax.rl import r1zero
from deepjax.train import convert as CV
from deepjax.train import loop as T
from deepjax.train.run import load_params

# Model order for the parameter table (the state itself is sorted by name).
GROUP_ORDER = ("embed", "dense_layers", "moe_layers", "norm", "head", "mtp")
# Above this `info` builds shapes only (jax.eval_shape): a float32 init of 2B parameters is already 8 GB.
FORWARD_MAX_PARAMS = 2_000_000_000


# ---- info ---------------------------------------------------------------------------------------

def _shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def describe_model(m: ModelConfig) -> str:
    q = f"q_lora {m.q_lora_rank}" if m.q_lora_rank is not None else "plain q_proj"
    return (f"vocab {m.vocab_size}, hidden {m.hidden_size}, {m.num_hidden_layers} layers ({m.n_dense_layers} dense, "
            f"{m.n_moe_layers} MoE), {m.num_attention_heads} heads, MLA {q} kv_lora {m.kv_lora_rank}\n"
            f"experts: {m.n_routed_experts} routed, top-{m.num_experts_per_tok} ({m.scoring_func}/{m.topk_method}, "
            f"{m.n_group} groups keep {m.topk_group}), {m.n_shared_experts} shared; "
            f"MTP depth {m.num_nextn_predict_layers}; dtype {m.dtype}, params {m.param_dtype}")


def param_report(m: ModelConfig, params) -> str:
    """One row per variable under a row per top-level group (embed, dense_layers, moe_layers, norm, head,
    mtp), then the totals."""
    groups: dict[str, list[tuple[str, tuple]]] = {g: [] for g in GROUP_ORDER}
    for path, shape, _ in M.param_table(params):
        group, _, rest = path.partition(".")
        groups.setdefault(group, []).append((rest, shape))
    width = max(len(rest) for rows in groups.values() for rest, _ in rows) + 4
    lines = [f"{'parameters':<{width}} {'count':>17}  shape"]
    for group, rows in groups.items():
        if not rows:
            continue
        n = sum(int(np.prod(s)) for _, s in rows)
        if len(rows) == 1:  # embed, head, norm: one variable, one line
            lines.append(f"{'.'.join(filter(None, (group, rows[0][0]))):<{width}} {n:>17,}  {_shape(rows[0][1])}")
            continue
        lines.append(f"{group:<{width}} {n:>17,}")
        for rest, s in rows:
            lines.append(f"  {rest:<{width - 2}} {int(np.prod(s)):>17,}  {_shape(s)}")
    main = M.count_params(params, include_mtp=False)
    total = M.count_params(params)
    active = M.count_active_params(m, params)
    lines += [
        "",
        f"{'main model (without MTP)':<{width}} {main:>17,}",
        f"{'MTP modules':<{width}} {total - main:>17,}",
        f"{'total':<{width}} {total:>17,}",
        f"{'activated per token':<{width}} {active:>17,}  (main model less the "
        f"{m.n_routed_experts - m.num_experts_per_tok} unchosen experts of each MoE layer)",
    ]
    return "\n".join(lines)


def _timed(fn):
    t = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t


def _load_lines(name: str, load_LE: np.ndarray, balance_L: np.ndarray) -> list[str]:
    """Expert load per MoE layer: min / mean / max tokens per expert and MaxVio = max / mean - 1 (V3 paper)."""
    lines = []
    for i, (load_E, bal) in enumerate(zip(load_LE, balance_L)):
        mean = load_E.mean()
        vio = load_E.max() / mean - 1 if mean > 0 else float("nan")
        lines.append(f"  {name(i):<14} min {load_E.min():6.0f}  mean {mean:8.1f}  max {load_E.max():6.0f}  "
                     f"MaxVio {vio:5.2f}  balance loss {bal:.4f}")
    return lines


def forward_report(cfg: Config, graphdef, params, batch: int, length: int) -> str:
    m = cfg.model
    tokens_BT = jax.random.randint(jax.random.key(cfg.seed + 1), (batch, length), 0, m.vocab_size, jnp.int32)
    out, first = _timed(lambda: M.jit_forward(graphdef, params, tokens_BT))
    n_steady = 3
    _, steady = _timed(lambda: [M.jit_forward(graphdef, params, tokens_BT) for _ in range(n_steady)])
    lines = [f"forward on random tokens {_shape(tokens_BT.shape)}:"]
    for field, value in out._asdict().items():
        desc = "None" if value is None else f"{_shape(value.shape)} {value.dtype}"
        lines.append(f"  {field:<16} {desc}")
    finite = bool(jnp.isfinite(out.logits).all())
    lines.append(f"  logits finite: {finite}, std {float(out.logits.std()):.4f}; "
                 f"dropped (token, expert) assignments: {int(out.dropped_tokens)}")
    lines.append("expert load (tokens per routed expert):")
    k = m.first_k_dense_replace
    lines += _load_lines(lambda i: f"layer {k + i}", np.asarray(out.expert_load), np.asarray(out.balance_loss))
    if out.mtp_expert_load is not None:
        lines += _load_lines(lambda i: f"mtp {i + 1}", np.asarray(out.mtp_expert_load),
                             np.asarray(out.mtp_balance_loss))
    lines.append(f"timing: first forward (trace + compile + run) {first:.2f} s, "
                 f"then {steady / n_steady * 1e3:.2f} ms per forward")
    return "\n".join(lines)


def info(cfg: Config, name: str, batch: int, length: int) -> None:
    devices = jax.devices()
    print(f"config: {name}")
    print(f"device: {len(devices)} x {devices[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print(describe_model(cfg.model))
    print()
    graphdef, params = M.abstract_init(cfg.model)
    n = M.count_params(params)
    if n <= FORWARD_MAX_PARAMS:
        (graphdef, params), secs = _timed(lambda: M.init(cfg.model, jax.random.key(cfg.seed)))
        print(param_report(cfg.model, params))
        print(f"init (trace + compile + run): {secs:.2f} s")
        print()
        print(forward_report(cfg, graphdef, params, batch, length))
    else:
        print(param_report(cfg.model, params))
        print()
        print(f"forward: skipped ({n:,} parameters > {FORWARD_MAX_PARAMS:,}); "
              "the table above comes from shapes only (jax.eval_shape)")


# ---- command line -------------------------------------------------------------------------------

def _positive_int(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {s}")
    return v


def _size(s: str) -> int:
    """A byte count: 4GB, 500MB, 123456 (K/M/G/T are powers of 1024: safetensors shards as HF sizes them)."""
    units = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "M": 1 << 20, "MB": 1 << 20, "G": 1 << 30, "GB": 1 << 30,
             "T": 1 << 40, "TB": 1 << 40}
    t = s.strip().upper()
    num = t.rstrip("KMGTB")
    try:
        v = int(float(num) * units[t[len(num):]])
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"not a size: {s!r} (e.g. 4GB, 500MB)") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {s}")
    return v


def _job(sub, name: str, help: str, description: str, epilog: str, config: str, workdir: str):
    """A subcommand that runs a job in a work directory: CONFIG, --workdir, --no-progress."""
    p = sub.add_parser(name, help=help, description=description, epilog=epilog)
    p.add_argument("config", nargs="?", default=config, help=f"configs/NAME.py file or preset name (default: {config})")
    p.add_argument("--workdir", default=None, help=f"run directory (default: {workdir})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="deepjax", description="DeepSeek-V3/R1 in JAX.",
        epilog="Config fields are overridden with --config.FIELD=VALUE, e.g. --config.model.n_routed_experts=16.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("info", help="parameter table and one forward pass of a config",
                       description="Builds the model, prints its parameters and runs one jitted forward pass on "
                                   f"a random batch (shapes only above {FORWARD_MAX_PARAMS:,} parameters).",
                       epilog="Any config field: --config.model.FIELD=VALUE (repeatable).")
    p.add_argument("config", nargs="?", default="tiny",
                   help="configs/NAME.py file or preset name (default: tiny)")
    p.add_argument("--batch", type=_positive_int, default=2, help="rows of the random batch (default 2)")
    p.add_argument("--length", type=_positive_int, default=32, help="tokens per row (default 32)")
    _job(sub, "train", "train (or resume) a model: data, optimizer, checkpoints, logs",
         "Trains CONFIG for train.steps optimizer steps in --workdir: builds the dataset (TFDS), runs the jitted "
         "train step, writes checkpoints, metrics.jsonl, TensorBoard events and train_curves.png. Rerun the same "
         "command to resume from the newest checkpoint.",
         "Any config field: --config.SECTION.FIELD=VALUE (sections: model, data, optim, train, mesh), e.g. "
         "--config.train.steps=400 --config.optim.lr=3e-3.", "tiny", "runs/<config name>")
    _job(sub, "grpo", "GRPO with rule-based rewards (R1-Zero): rollouts, rewards, policy updates",
         "Runs rl.steps GRPO steps in --workdir: rl.prompts_per_step prompts of data.source's train split, "
         "rl.loss.group_size sampled completions each, accuracy + format rewards, group advantages, rl.loss.mu policy "
         "updates; held-out pass@1 every rl.eval.every steps; checkpoints, metrics.jsonl, eval.jsonl, TensorBoard "
         "events and grpo_curves.png. Rerun the same command to resume.",
         "Start from a trained run with --config.rl.init_from=DIR (its model config must match). Any config field: "
         "--config.SECTION.FIELD=VALUE (sections: rl, model, data, optim, train, mesh), e.g. --config.rl.loss.beta=0 "
         "--config.rl.loss.group_size=16.", "tiny", "runs/<config name>_grpo")
    p = _job(sub, "r1zero", "the R1-Zero story on a CPU: weak base, eval, GRPO, eval again",
             "Builds the task data, pretrains the tiny MoE-MLA to a weak base, evaluates held-out pass@1, runs GRPO "
             "with rule-based rewards, evaluates again and prints before/after; writes r1zero.json and r1zero.png "
             "(plus each stage's own run directory: base/, grpo/). About 11 minutes on 2 CPU cores.",
             "Any config field: --config.SECTION.FIELD=VALUE, e.g. --config.rl.steps=120 --config.train.steps=600.",
             "r1zero", "runs/r1zero, or runs/r1zero_s<SEED>")
    p.add_argument("--seed", type=int, default=0, help="init, data order and sampling seed (default 0)")
    p.add_argument("--k", type=_positive_int, default=16, help="samples per held-out problem (default 16)")
    _job(sub, "distill", "distill a teacher run into CONFIG's model: its verified traces, or its logits",
         "Trains CONFIG's model (the student) from the teacher run directory distill.teacher, in --workdir. "
         "distill.mode=traces (R1-Distill): the teacher samples distill.k completions of each train prompt of "
         "data.source, a rejection filter keeps the finished, well-formatted, correct, language-consistent ones "
         "(traces/traces.jsonl, traces/stats.json), and the student is SFT-trained on them (student/). "
         "distill.mode=logits (same tokenizer): the student trains on data.source with kd_alpha x T^2 x "
         "KL(teacher_T || student_T) on the completion tokens + (1 - kd_alpha) x the hard-label loss. Then teacher "
         "and student are evaluated on held-out problems (distill.json). Rerun the same command to resume.",
         "Any config field: --config.SECTION.FIELD=VALUE (sections: distill, model, data, optim, train, mesh, rl), "
         "e.g. --config.distill.teacher=runs/r1zero/grpo --config.distill.k=8 --config.distill.mode=logits "
         "--config.distill.kd_temperature=2 (docs/distill.md).", "tiny", "runs/<config name>_distill")
    p = _job(sub, "r1", "DeepSeek-R1's pipeline on a CPU: cold start, reasoning RL, rejection sampling + SFT, RL",
             "Runs the base, then R1's four stages, each its own run directory in --workdir: 1_cold_start (SFT of "
             "the base on long, re-checked, tagged chains of thought), 2_reasoning_rl (GRPO: accuracy + format + "
             "language rewards), 3_rejection_sft (correct, readable samples of stage 2 plus non-reasoning examples; "
             "SFT of the base on them), 4_all_rl (GRPO again); evaluates each on held-out problems and prints a "
             "stage x metric table (r1.json, r1.png). Rerun the same command to resume where it stopped.",
             "Shared fields: --config.SECTION.FIELD=VALUE (model, data, optim, train, mesh, rl, distill); the stages' "
             "own: --config.r1.FIELD=VALUE, e.g. --config.r1.reasoning_rl_steps=80 --config.r1.sft_steps=400 "
             "(docs/r1.md).", "r1", "runs/r1, or runs/r1_s<SEED>")
    p.add_argument("--seed", type=int, default=0, help="init, data order and sampling seed (default 0)")
    p = sub.add_parser("eval", help="pass@1 / pass@k / cons@k of a trained run on held-out problems",
                       description="Samples --k answers per held-out problem of the run's task from the newest "
                                   "checkpoint in WORKDIR and reports pass@1 (from the k samples), pass@k (unbiased) "
                                   "and cons@k (majority vote) for k = 1, 2, 4, ...; writes eval_step<N>.json and "
                                   "eval_step<N>_scaling.png into WORKDIR.")
    p.add_argument("workdir", help="a `deepjax train` or `deepjax grpo` run directory")
    p.add_argument("--k", type=_positive_int, default=8, help="samples per problem (default 8)")
    p.add_argument("--problems", type=_positive_int, default=100, help="held-out problems (default 100)")
    p.add_argument("--temperature", type=float, default=0.6, help="default 0.6 (as R1)")
    p.add_argument("--top-p", type=float, default=0.95, help="default 0.95 (as R1)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=64)
    p.add_argument("--batch", type=_positive_int, default=64, help="rows per generate call (default 64)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p = sub.add_parser("sample", help="complete prompts from a run or an HF checkpoint, streamed as decoded",
                       description="Samples a completion of each prompt (--prompt, --prompts-file) from SOURCE: a "
                                   "`deepjax train` / `grpo` run directory (its newest checkpoint) or an HF "
                                   "checkpoint directory (config.json + *.safetensors + tokenizer.json), on one "
                                   "device. One prompt is streamed as it is decoded, several print as each finishes; "
                                   "the last line is N tokens in S s (T tokens/s).",
                       epilog="Model fields that keep the parameters' shapes: --config.model.FIELD=VALUE (e.g. "
                              "--config.model.dtype=bfloat16); sampler fields: --config.sampling.FIELD=VALUE "
                              f"({', '.join(SA.SAMPLING_OVERRIDES)}).")
    SA.add_arguments(p)
    p = sub.add_parser(
        "convert", help="HF safetensors checkpoint <-> deepjax run directory, tensor by tensor",
        usage="deepjax convert HF_DIR RUN_DIR [--run-config CONFIG] [--config.FIELD=VALUE ...]\n"
              "       deepjax convert RUN_DIR HF_DIR [--step N] [--fp8] [--dtype DTYPE] [--shard-size SIZE]",
        description="Converts SOURCE into DEST, a new directory; the direction follows SOURCE. An HF checkpoint "
                    "directory (config.json + *.safetensors; FP8 weights with weight_scale_inv are dequantized) "
                    "becomes a run directory with a step-0 checkpoint: what `deepjax train` would save right after "
                    "initializing with these weights (optimizer state at its init), read by --config.rl.init_from, "
                    "`deepjax eval` / `sample`, and resumed by `deepjax train` / `grpo` --workdir DEST. A run "
                    "directory (its newest or --step checkpoint) becomes an HF checkpoint directory: config.json, "
                    "safetensors shards, model.safetensors.index.json. Tensors are converted one at a time: memory "
                    "stays near the largest tensor, whatever the model's size.",
        epilog="HF -> run: the model comes from HF_DIR/config.json; --run-config CONFIG (a configs/NAME.py file or "
               "preset) gives the other sections (data, optim, train, mesh, seed) and must have that model; "
               "--config.FIELD=VALUE overrides, e.g. --config.model.param_dtype=bfloat16 (HF config.json carries no "
               "parameter dtype: default float32). Examples: deepjax convert DeepSeek-V3/ runs/v3 "
               "--config.model.param_dtype=bfloat16; deepjax convert runs/tiny hf/tiny --fp8")
    p.add_argument("source", help="an HF checkpoint directory or a deepjax run directory")
    p.add_argument("dest", help="the directory to write (new, or empty)")
    p.add_argument("--to", choices=("run", "hf"), default=None,
                   help="the direction, checked against SOURCE (default: the one SOURCE gives)")
    p.add_argument("--run-config", default=None, metavar="CONFIG",
                   help="HF -> run: config file or preset for the run directory's config.json")
    p.add_argument("--step", type=int, default=None, metavar="N",
                   help="run -> HF: checkpoint step (default: the newest)")
    p.add_argument("--fp8", action="store_true",
                   help="run -> HF: the linear weights DeepSeek-V3 releases in FP8 as E4M3 with a float32 "
                        "weight_scale_inv per 128x128 block (config.json gets its quantization_config)")
    p.add_argument("--dtype", choices=sorted(CV.DTYPES), default=None,
                   help="run -> HF: dtype of the tensors (not FP8 ones; default: as stored)")
    p.add_argument("--shard-size", type=_size, default=4 << 30, metavar="SIZE",
                   help="run -> HF: largest safetensors file (default 4GB)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


# jax's persistent compilation cache for the commands (what XLA compiled, its autotuning results included), so a
# resumed or repeated run on a GPU or TPU does not compile again (the bench preset's training step with its layers as
# a Python loop compiles for about 3 minutes on an H100). DEEPJAX_COMPILE_CACHE=DIR picks the directory (a gs:// path
# too, with etils[epath]; on several hosts only process 0 writes, so a local directory helps process 0 alone),
# =off turns it off; JAX_COMPILATION_CACHE_DIR, when set, wins. Off by default where no GPU or TPU plugin is
# installed or JAX_PLATFORMS=cpu, where compiles are short. Decided without starting jax's backend, which must wait
# for jax.distributed.initialize on several processes (deepjax.parallel.distributed).
COMPILE_CACHE_ENV = "DEEPJAX_COMPILE_CACHE"
COMPILE_CACHE_MIN_SECS = 5.0  # compiles shorter than this are not written
ACCELERATOR_PLUGINS = ("jax_cuda13_plugin", "jax_cuda12_plugin", "libtpu", "jax_rocm7_plugin",
                       "jax_rocm60_plugin")


def _accelerator_installed() -> bool:
    platforms = os.environ.get("JAX_PLATFORMS", "").lower()
    if platforms and all(p.strip() == "cpu" for p in platforms.split(",")):
        return False
    return any(importlib.util.find_spec(m) is not None for m in ACCELERATOR_PLUGINS)


def compile_cache() -> Optional[str]:
    """Turns on jax's persistent compilation cache (see COMPILE_CACHE_ENV); its directory, or None when off."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]  # jax reads it itself
    d = os.environ.get(COMPILE_CACHE_ENV, "")
    if d.lower() in ("off", "0", "false", "none") or (not d and not _accelerator_installed()):
        return None
    secs = os.environ.get(COMPILE_CACHE_ENV + "_MIN_SECS", str(COMPILE_CACHE_MIN_SECS))
    try:
        secs = float(secs)
    except ValueError:
        raise UserError(f"{COMPILE_CACHE_ENV}_MIN_SECS={secs!r}: not a number of seconds") from None
    d = d or paths.local_cache("xla")
    jax.config.update("jax_compilation_cache_dir", d)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", secs)
    return d


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = parser()
    args, rest = ap.parse_known_args(argv)
    if args.command is None:
        ap.print_help()
        return 0
    try:
        compile_cache()
    except UserError as e:
        return _user_error(e)
    if args.command == "sample":
        return sample_command(args, rest)
    if args.command == "convert":
        return convert_command(args, rest)
    if args.command == "eval":
        if rest:
            print(f"deepjax: error: unrecognized arguments: {' '.join(rest)}", file=sys.stderr)
            return 2
        return eval_command(args)
    unknown = [r for r in rest if not r.startswith("--config.")]
    if unknown:
        print(f"deepjax: error: unrecognized arguments: {' '.join(unknown)} "
              "(config fields are set with --config.FIELD=VALUE)", file=sys.stderr)
        return 2
    if args.command == "r1":  # before load_config: --config.r1.* are R1Config's fields
        return r1_command(args, rest)
    try:
        cfg = load_config(args.config, rest)
    except UserError as e:
        return _user_error(e)
    name = " ".join([args.config, *rest])
    if args.command == "train":
        return train_command(cfg, args)
    if args.command == "grpo":
        return grpo_command(cfg, args)
    if args.command == "r1zero":
        return r1zero_command(cfg, args)
    if args.command == "distill":
        return distill_command(cfg, args)
    info(cfg, name, args.batch, args.length)
    return 0


def _user_error(e: Exception) -> int:
    """A user error as one line on stderr (`deepjax: error: ...`, or `deepjax: stopped: ...` for a run stopped by
    non-finite steps); its exit status, 2."""
    print(f"deepjax: {'stopped' if isinstance(e, NonFiniteError) else 'error'}: {one_line(e)}", file=sys.stderr)
    return 2


def eval_command(args) -> int:
    try:
        res = evaluate.run(args.workdir, k=args.k, problems=args.problems, temperature=args.temperature,
                           top_p=args.top_p, max_new_tokens=args.max_new_tokens, batch=args.batch, seed=args.seed,
                           step=args.step, progress=not args.no_progress)
    except (UserError, ValueError) as e:  # ValueError: evaluate's own argument checks (--k, --problems, ...)
        return _user_error(e)
    except FileNotFoundError as e:
        print(f"deepjax: error: {one_line(e)}", file=sys.stderr)
        return 1
    print(f"{res['task']}, step {res['step']}: {res['n_problems']} held-out problems, k={res['k']}, "
          f"temperature {res['temperature']}, top-p {res['top_p']}")
    print(evaluate.format_table(res["table"]))
    print(f"written: {args.workdir}/eval_step{res['step']}.json, eval_step{res['step']}_scaling.png")
    return 0


def convert_command(args, rest) -> int:
    """`deepjax convert` (deepjax/train/convert.py): bad input is one line with status 2, a missing SOURCE status 1."""
    unknown = [r for r in rest if not r.startswith("--config.")]
    if unknown:
        print(f"deepjax: error: unrecognized arguments: {' '.join(unknown)}", file=sys.stderr)
        return 2
    try:
        base = load_config(args.run_config) if args.run_config is not None else None
        out = CV.convert(args.source, args.dest, to=args.to, base=base, overrides=rest, step=args.step, fp8=args.fp8,
                         dtype=args.dtype, max_shard_bytes=args.shard_size, progress=not args.no_progress)
    except UserError as e:
        return _user_error(e)
    except FileNotFoundError as e:
        print(f"deepjax: error: {one_line(e)}", file=sys.stderr)
        return 1
    what = (f"run directory (checkpoint step {out['step']})" if out["to"] == "run" else
            f"HF checkpoint directory (from step {out['step']})")
    b = out["bytes"]
    size = next((f"{b / 2**k:.2f} {u}" for k, u in ((30, "GiB"), (20, "MiB"), (10, "KiB")) if b >= 2**k), f"{b} B")
    print(f"converted {out['tensors']} tensors ({size}) in {out['seconds']:.1f} s: {what} {out['path']}")
    return 0


def _sample_run_config(workdir: str) -> Config:
    with paths.Path(workdir, "config.json").open() as f:
        try:
            return from_dict(json.load(f))
        except json.JSONDecodeError as e:
            raise ValueError(f"{workdir}/config.json: not valid JSON ({e.msg})") from None


def _sample_source(args, model_overrides: list[str]):
    """(SOURCE without its weights, a function giving it its weights on one device with the model overrides). A
    run directory is read with train.run.load_params (deepjax/infer does not import train)."""
    path = args.source.rstrip("/") or args.source
    override = lambda m: apply_overrides(Config(model=m), model_overrides).model  # noqa: E731
    if SA.source_kind(path) == "hf":
        if args.step is not None:
            raise ValueError(f"--step {args.step}: {path} is an HF checkpoint directory (--step picks a run's "
                             "checkpoint)")
        src = SA.hf_source(path, args.tokenizer)
        load = SA.load_hf_weights
    else:
        cfg = _sample_run_config(path)
        tok = SA.tokenizer_of(args.tokenizer or cfg.data.tokenizer,
                              "--tokenizer" if args.tokenizer else f"data.tokenizer of {path}/config.json")
        SA.check_vocab(cfg.model, tok, path)
        src = SA.Source(path, "run", cfg.model, None, None, tok, cfg.data.template, SA.chat_dir_of(tok))
        ckdir = paths.Path(path, "checkpoints")
        if not any(d.name.isdigit() for d in ckdir.iterdir()):
            raise FileNotFoundError(f"{ckdir}: no checkpoint saved yet")

        def load(src):
            mesh = S.make_mesh(S.MeshConfig(fsdp=1), devices=jax.devices()[:1])  # one device, sampled outside it
            _, step, graphdef, params, _, _ = load_params(path, args.step, mesh, S.rules_for(cfg.mesh.rules))
            return dataclasses.replace(src, graphdef=graphdef, params=params, step=step)
    override(src.model)  # a bad override fails before the weights are read

    def with_weights(src: SA.Source) -> SA.Source:
        src = load(src)
        return SA.with_model_config(src, override(src.model))
    return src, with_weights


def sample_command(args, rest) -> int:
    """`deepjax sample` (deepjax/infer/sample.py): every input checked before the weights are read, each error one
    line with status 2."""
    unknown = [r for r in rest if not r.startswith(("--config.model.", "--config.sampling."))]
    if unknown:
        print(f"deepjax: error: unrecognized arguments: {' '.join(unknown)} (overrides: --config.model.FIELD=VALUE, "
              "--config.sampling.FIELD=VALUE)", file=sys.stderr)
        return 2
    try:
        prompts = SA.read_prompts(args.prompt, args.prompts_file)
        sc = SA.sampling_config(args.max_new_tokens, args.temperature, args.top_p, args.top_k,
                                [r for r in rest if r.startswith("--config.sampling.")])
        src, load = _sample_source(args, [r for r in rest if r.startswith("--config.model.")])
        src, ids, sc = SA.encode(src, prompts, args.template, sc)
        src = load(src)
    except (UserError, ValueError, OSError) as e:
        # one line: a damaged checkpoint's message goes on with training's fallback hint, which is not ours
        print(f"deepjax: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    try:
        SA.run(src, prompts, ids, sc, args.seed, args.batch)
    except KeyboardInterrupt:  # Ctrl-C while streaming: no traceback
        print("\ndeepjax: interrupted", file=sys.stderr)
        return 130
    return 0


# The batches each job splits over the mesh's batch shards, checked before the job builds anything.
_BATCHES = {
    "train": lambda c: {f"data.global_batch={c.data.global_batch}": c.data.global_batch},
    "grpo": lambda c: {f"rl.prompts_per_step x rl.loss.group_size = {c.rl.prompts_per_step} x {c.rl.loss.group_size}":
                       c.rl.prompts_per_step * c.rl.loss.group_size},
}
_BATCHES["r1zero"] = lambda c: {**_BATCHES["train"](c), **_BATCHES["grpo"](c)}
_BATCHES["distill"] = _BATCHES["train"]
_BATCHES["r1"] = _BATCHES["r1zero"]


def _run_job(fn, cfg: Config, args, suffix: str = ""):
    """(status, result) of fn(cfg, workdir, progress), the mesh and batch checked first (no model built for a mesh
    that does not fit); a user error is one line and status 2, a missing file one line and status 1."""
    workdir = args.workdir or os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0] + suffix)
    args.workdir = workdir
    print(f"workdir: {paths.shown(workdir)}", flush=True)
    try:
        D.check_mesh(cfg.mesh, _BATCHES[args.command](cfg))
        return 0, fn(cfg, workdir, progress=not args.no_progress)
    except UserError as e:
        return _user_error(e), None
    except FileNotFoundError as e:
        print(f"deepjax: error: {one_line(e)}", file=sys.stderr)
        return 1, None


def r1zero_command(cfg: Config, args) -> int:
    cfg = r1zero.with_seed(cfg, args.seed)
    if args.workdir is None:
        args.workdir = os.path.join("runs", "r1zero" if args.seed == 0 else f"r1zero_s{args.seed}")
    status, out = _run_job(lambda c, w, progress: r1zero.run(c, w, k=args.k, progress=progress), cfg, args)
    if status:
        return status
    print()
    print(r1zero.format_summary(out["before"], out["after"]))
    t = out["times"]
    print(f"time: base {t['base_s']:.0f} s, evals {t['eval_before_s'] + t['eval_after_s']:.0f} s, "
          f"GRPO {t['grpo_s']:.0f} s")
    print(f"run directory: {out['workdir']} (r1zero.json, r1zero.png, base/, grpo/)")
    return 0


def r1_command(args, rest) -> int:
    try:
        cfg, rc = r1.load(args.config, rest)
    except UserError as e:
        return _user_error(e)
    cfg = r1.with_seed(cfg, args.seed)
    if args.workdir is None:
        args.workdir = os.path.join("runs", "r1" if args.seed == 0 else f"r1_s{args.seed}")
    status, out = _run_job(lambda c, w, progress: r1.run(c, rc, w, progress=progress), cfg, args)
    if status:
        return status
    print()
    print(r1.format_summary(out))
    t = out["times"]
    print("time: " + ", ".join(f"{r1.LABELS[s]} {t[s]['train_s'] + t[s]['eval_s']:.0f} s" for s in r1.STAGES))
    print(f"run directory: {out['workdir']} (r1.json, r1.png, {', '.join(s + '/' for s in r1.STAGES)})")
    return 0


def distill_command(cfg: Config, args) -> int:
    status, out = _run_job(distill.run, cfg, args, suffix="_distill")
    if status:
        return status
    print()
    print(distill.format_summary(out))
    print(f"run directory: {out['workdir']} (distill.json, "
          f"{'traces/, ' if out['mode'] == 'traces' else ''}student/)")
    return 0


def grpo_command(cfg: Config, args) -> int:
    status, out = _run_job(loop.grpo, cfg, args, suffix="_grpo")
    if status:
        return status
    last, ev = out["last"], out["eval"]
    if last:
        print(f"GRPO step {last['step']}: reward {last['reward']:.3f}, rollout accuracy {last['accuracy']:.3f}, "
              f"response length {last['response_length']:.1f}")
    if ev:
        print(f"held-out ({ev['n_problems']} problems, k={ev['k']}): pass@1 {100 * ev['pass@1']:.1f}%, "
              f"cons@{ev['k']} {100 * ev['cons@k']:.1f}%")
    print(f"run directory: {paths.shown(args.workdir)} (metrics.jsonl, eval.jsonl, tb/, grpo_curves.png, "
          "checkpoints/)")
    return 0


def train_command(cfg: Config, args) -> int:
    status, last = _run_job(T.train, cfg, args)
    if status:
        return status
    workdir = args.workdir
    if last:
        print(f"step {last['step']}: loss {last['loss']:.4f}, mtp loss {last['mtp_loss']:.4f}, "
              f"MaxVio {sum(last['maxvio']) / len(last['maxvio']):.3f} (mean over MoE layers)")
    print(f"run directory: {paths.shown(workdir)} (metrics.jsonl, tb/, train_curves.png, checkpoints/)")
    return 0

"""Seconds per GRPO iteration: deepjax's own loop (`deepjax grpo`) beside TRL's `GRPOTrainer` (HF transformers
generate) on the same model shape, lengths and GPU, in one process run (TRL in a subprocess, first).

    PYTHONPATH=. python bench/grpo_bench.py          # bench preset, 64 prompts x G 8 x 512 new tokens, mu 1 and 2
    PYTHONPATH=. python bench/grpo_bench.py --preset tiny --prompts 2 --group 2 --new 8 --no-trl     # CPU smoke

On the GPU machine (one H200). TRL and `datasets` are not on its image: carry their wheels (the device README's
recipe; .whl/ is ignored by .gitignore, and the same folder holds the wheels deepjax already needs there, such as
tensorboardx; keep one version of each package). Here, once:

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
        -d .whl trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19

(trl needs accelerate, pandas, pyarrow, psutil, jinja2, pyyaml, transformers >= 4.56.2, all on the image; datasets
needs dill, multiprocess, xxhash, fsspec, huggingface-hub, of which dill and multiprocess are not. 1.8 MB in all;
checked here against transformers 5.17 and huggingface-hub 1.33, the image's.) Then one device call, with `.whl` carried (TRL runs first, while the GPU is still free of JAX's pool):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
        .whl/*.whl && export PYTHONPATH=/tmp/site || exit; \\
    set -o pipefail; PYTHONUNBUFFERED=1 PYTHONPATH=.:$PYTHONPATH python3 bench/grpo_bench.py 2>&1 | tee $OUT/log

A TRL that does not import prints one skip line and the table shows deepjax alone. --no-deepjax / --no-trl run one
side (two calls, when one does not fit a call's 10 minutes). deepjax's GRPO step takes the rows in --micro-batches
sequential parts (rl.micro_batches: gradient accumulation, exact; default 8 here, 64 rows of prompt + --new tokens
each; 4 on a GPU with 110 GiB or more for JAX, an H200) with --remat (default none). On an H100 80GB 8 peak at
49.9 GiB and update in 1.32 s (session 24; 4 asked 58.8 GiB of temporaries there and did not fit; docs/LOG.md). An update that runs out of memory
prints its error line; more micro-batches, then --remat full, are the knobs to try.

What one iteration is, on each side (--prompts x --group completions of up to --new tokens, temperature 1):
  deepjax  the body of `deepjax.rl.loop.grpo`'s step loop, run on a `GRPORun` built from the config as `deepjax
           grpo` builds it: `next_prompts`, `rollout` (text.complete: the product's sampler and its decode path, on
           the run's mesh), `score` (deepjax.rl.rewards.combined), `group_advantages`, `batch` (the rollouts as
           training arrays; the reference's log-probs when beta > 0), `update` (mu optimizer steps of the jitted,
           donated GRPO step, each on the whole batch in micro-batches; metrics fetched to the host),
           `step_record`: `GRPORun.iteration`, which `grpo` calls. Seconds from `next_prompts` to the record, as
           `rollout_s + update_s` of metrics.jsonl; generate_s is `rollout` alone.
  TRL      bench/anchors/trl_grpo.py: generate (all rows in one call), rewards (the same `combined`), advantages,
           (old log-probs when mu > 1, reference log-probs when beta > 0,) mu optimizer steps over the whole batch in
           --trl-micro row chunks; seconds between the ends of the optimizer steps that close two iterations.
Both: random weights of the same shape (the bench preset = hf_deepseek_v3.bench_cfg), bf16 compute, AdamW (deepjax
on float32 master weights, --param-dtype; TRL on bf16 weights by default, --trl-dtype: its faster setting, and the
one hf_deepseek_v3.py times HF training with), generated arithmetic problems in the same template and byte-level
token ids (so the same prompt lengths, and the same EOS id: random weights rarely sample it, so rows run to --new
tokens), beta --beta (default 0: no reference model on either side).

Excluded: building the model, the optimizer state and the trainer; compilation (deepjax) and CUDA / allocator
warm-up (TRL): --warmup (deepjax) and --trl-warmup untimed iterations before the first mu (later mus reuse the warm
process; on deepjax's side the same run and compiled step, only rl.loss.mu changed, so nothing compiles again). The
held-out evaluation and checkpoints of `deepjax grpo` are not part of an iteration. The prompts come from
deepjax.data.tasks without TFDS / Grain (the GPU image has neither): `Run`'s data sources are the generated lists,
and Grain's prompt iterator, when Grain is absent, a seeded shuffle of them (`generated_prompts`).

--sampler-alone then times the sampler alone on the same rows and prompts, as the rollout calls it and as
bench/sampling_bench.py does (bf16 weights, greedy, no routes): issue 19.3's comparison inside one process.

Prints one JSON line per measurement, then a table: seconds per iteration for each mu on each side and TRL /
deepjax (target: at least 20x).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import traceback
import tempfile
import time
import types

import numpy as np

TARGET = 20.0  # TRL seconds per iteration / deepjax's (issue 19)


def emit(**kw):
    print(json.dumps(kw, default=str), flush=True)
    return kw


# ------------------------------------------------------------------------------------------------------ prompts


class _SeededPrompts:
    """The records of a list one at a time in a seeded shuffled order, reshuffled each pass (what
    `pipeline.prompt_iterator` gives through Grain), with the iterator's get_state / set_state."""

    def __init__(self, records, seed: int, state=None):
        self.records, self.seed, self.i, self.order = records, seed, 0, (None, None)
        if state is not None:
            self.set_state(state)

    def __iter__(self):
        return self

    def __next__(self):
        n = len(self.records)
        epoch, j = divmod(self.i, n)
        if self.order[0] != epoch:
            self.order = (epoch, np.random.default_rng((self.seed, epoch)).permutation(n))
        self.i += 1
        return self.records[int(self.order[1][j])]

    def get_state(self) -> dict:
        return {"i": self.i}

    def set_state(self, state: dict) -> None:
        self.i = int(state["i"])


@contextlib.contextmanager
def generated_prompts():
    """`GRPORun` without TFDS: `Run`'s data sources are deepjax.data.tasks' generated lists (what the TFDS builder
    stores, as str); when Grain does not import, `pipeline.prompt_iterator` is a seeded shuffle of them. Yields
    which prompt iterator the run got ("grain" or "seeded shuffle")."""
    from deepjax.data import tasks
    from deepjax.train import run as TR

    def build_sources(cfg, workdir):
        d = cfg.data
        return {split: tasks.generate(d.source, n, d.task_seed, split, **tasks.options_of(d))
                for split, n in (("train", d.num_train), ("test", d.num_test))}

    saved = TR.build_sources
    TR.build_sources = build_sources
    try:
        try:
            from deepjax.data import pipeline  # noqa: F401  (Grain)
            kind = "grain"
        except ImportError:
            import deepjax.data
            stub = types.ModuleType("deepjax.data.pipeline")
            stub.prompt_iterator = lambda data_cfg, source, state=None: _SeededPrompts(source, data_cfg.seed, state)
            sys.modules["deepjax.data.pipeline"] = deepjax.data.pipeline = stub
            kind = "seeded shuffle"
        yield kind
    finally:
        TR.build_sources = saved


# ------------------------------------------------------------------------------------------------------ deepjax


def config(args, probe: bool = False):
    from deepjax.config import load_config

    sets = ["--config.model.dtype=bfloat16", f"--config.model.param_dtype={args.param_dtype}",
            "--config.data.source=arithmetic", f"--config.data.template={args.template}",
            f"--config.rl.prompts_per_step={args.prompts}", f"--config.rl.loss.group_size={args.group}",
            f"--config.rl.loss.mu={args.mu[0]}", f"--config.rl.rollout.max_new_tokens={args.new}",
            "--config.rl.rollout.temperature=1.0", f"--config.rl.loss.beta={args.beta}",
            f"--config.rl.steps={args.warmup + args.steps * len(args.mu)}", f"--config.seed={args.seed}",
            f"--config.rl.micro_batches={micro_batches(args, probe)}", f"--config.model.remat={args.remat}"]
    return load_config(args.preset, sets + [s if s.startswith("--") else f"--config.{s}" for s in args.set])


BIG_GPU_GIB = 110  # a GPU with at least this much memory for JAX (an H200: ~132 GiB) takes 4 micro-batches


def micro_batches(args, probe: bool = False) -> int:
    """--micro-batches, or by default the fewest measured to fit at the bench shape: gcd(8, rows) (8 at the bench
    shape: its fastest that fits an H100, whose 4 asked 58.8 GiB of temporaries beside ~22 GiB of weights and
    optimizer state, session 24), or gcd(4, rows) on a GPU with BIG_GPU_GIB or more for JAX (an H200). probe:
    JAX may start on the device to ask its memory (deepjax's side only: TRL's side runs first, in a subprocess,
    while JAX has not taken the GPU)."""
    if args.micro_batches or not probe:
        return args.micro_batches or math.gcd(8, args.prompts * args.group)
    import jax  # lazy on purpose: TRL's subprocess runs first, before JAX takes the GPU

    stats = jax.devices()[0].memory_stats() or {}
    parts = 4 if stats.get("bytes_limit", 0) >= BIG_GPU_GIB * 2**30 else 8
    return math.gcd(parts, args.prompts * args.group)


def with_mu(cfg, mu: int):
    return dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, loss=dataclasses.replace(cfg.rl.loss, mu=mu)))


_PARTS: dict[str, float] = {}  # --breakdown: seconds of each part of the iteration (outputs ready), summed per call


_GC: dict = {"s": 0.0, "n": 0, "t": None}  # --breakdown: Python's garbage collections in an iteration


def _gc_timer(phase: str, info: dict) -> None:
    """gc.callbacks hook: seconds and count of full (generation 2) collections, which walk every tracked object."""
    if info.get("generation") != 2:
        return
    if phase == "start":
        _GC["t"] = time.perf_counter()
    elif _GC["t"] is not None:
        _GC["s"] += time.perf_counter() - _GC["t"]
        _GC["n"] += 1
        _GC["t"] = None


def timed_parts(run):
    """--breakdown: wraps the pieces one iteration calls so that each blocks on its outputs and adds its seconds to
    _PARTS: prompts (`next_prompts`), sampler (`text.SP.jit_generate`, the rollout's sampler call), to_host (its
    outputs to the host: `text.D.host_arrays`), score (`score`), advantages (`group_advantages`), batch (`batch`: the
    rollouts as training arrays on the mesh), update (`update`: the mu optimizer steps, metrics fetched). What the
    iteration spends outside them (the rollout's text decode, the prompts' padding and transfer, the reference's
    refresh when it falls due, the metrics record) is `other`. Python's
    full garbage collections are timed too (gc_full_s / gc_full_n: their seconds also fall in whichever part ran)."""
    import jax

    from deepjax.infer import text
    from deepjax.rl import loop

    def wrap(owner, name, part):
        inner = getattr(owner, name)

        def call(*a, **k):
            t = time.perf_counter()
            out = jax.block_until_ready(inner(*a, **k))
            _PARTS[part] = _PARTS.get(part, 0.0) + time.perf_counter() - t
            return out

        setattr(owner, name, call)

    gc.callbacks.append(_gc_timer)
    wrap(text.SP, "jit_generate", "sampler")
    wrap(text.D, "host_arrays", "to_host")
    wrap(loop.G, "group_advantages", "advantages")
    for name, part in (("next_prompts", "prompts"), ("score", "score"), ("batch", "batch"), ("update", "update")):
        wrap(run, name, part)


def iteration(run, s: int) -> dict:
    """One iteration of `deepjax grpo`'s loop (`GRPORun.iteration`: evaluation and checkpoints aside), timed."""
    _PARTS.clear()
    _GC.update(s=0.0, n=0)
    t0 = time.perf_counter()
    rec = run.iteration(s)
    s_total = time.perf_counter() - t0
    extra = {"sampler_call_s": _PARTS.get("sampler", 0.0),
             "parts_s": {**_PARTS, "other": s_total - sum(_PARTS.values())},
             # full collections inside the iteration (their seconds are also in whichever part they fell in)
             "gc_full_s": _GC["s"], "gc_full_n": _GC["n"]} if _PARTS else {}
    n_tokens = int(round(rec["response_length"] * run.rows))
    return {"s": s_total, "rollout_s": rec["rollout_s"], "update_s": rec["update_s"], "generate_s": rec["generate_s"],
            "generate_tokens_per_s": n_tokens / rec["generate_s"], "completion_tokens": n_tokens, **extra,
            "response_length": rec["response_length"], "stopped": rec["stopped"], "reward": rec["reward"],
            "loss": rec.get("loss"), "grad_norm": rec["grad_norm"], "applied": rec["applied"],
            "routing_mismatch": rec.get("routing_mismatch"),
            # the sampler / trainer mismatch (issue 20.5): on the first update of a batch the policy is the sampler's,
            # so |old_logp - logp| and the ratio exp(logp - old_logp) measure only the numerical difference
            **{k: rec.get(k) for k in ("sampler_trainer_logp_gap", "sampler_trainer_logp_gap_max",
                                       "ratio_max", "clip_frac")}}


def traced_iteration(run, s: int, part: str, out: str) -> None:
    """--trace: one more iteration with `part` (update: `GRPORun.update`; sampler: the rollout's `jit_generate`)
    under jax.profiler.trace into `out`, then bench/profile.py's summary of its GPU kernels (top kernels, and for
    the sampler the decode loop alone)."""
    import jax

    from deepjax.infer import text

    owner, name = (run, "update") if part == "update" else (text.SP, "jit_generate")
    inner = getattr(owner, name)

    def traced(*a, **k):
        with jax.profiler.trace(out, create_perfetto_trace=True):
            return jax.block_until_ready(inner(*a, **k))

    setattr(owner, name, traced)
    try:
        emit(what="deepjax_traced_iteration", part=part, dir=out, **iteration(run, s))
    finally:
        setattr(owner, name, inner)
    import importlib.util  # lazy on purpose: only --trace loads bench/profile.py (by path: `profile` is also stdlib)

    spec = importlib.util.spec_from_file_location("bench_profile", os.path.join(os.path.dirname(__file__), "profile.py"))
    P = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(P)
    from deepjax import held_jit  # lazy on purpose: as the imports above, only --trace needs it

    sources = {}
    # each held function's most recent executable (the traced one; its shapes' others share its module name)
    for i, exe in enumerate(next(reversed(h.executables.values())) for h in list(held_jit._LIVE) if h.executables):
        try:
            text_i = exe.as_text()
        except Exception:  # noqa: BLE001  (a backend without the text form: no sources, the kernel names stay)
            continue
        with open(os.path.join(out, f"hlo_{i}.txt"), "w") as fh:  # for mapping a trace's kernels later
            fh.write(text_i)
        sources.update(P.hlo_sources(text_i))
    P.summarize(out, top=30, top_host=8, split_at=0.5 if part == "sampler" else None, sources=sources)


def sampler_alone(run, s: int, reps: int = 2) -> None:
    """Issue 19.3's comparison in one process: the same rows and prompts as the rollout, the sampler alone
    (`sampling.jit_generate`, no text decode, no scoring): as the rollout calls it (float32 master weights,
    temperature 1, routes recorded, the tokenizer's EOS: the loop checks for the end every
    `sampling.STOP_CHECK_EVERY` steps), the same with the check after every step (`as_rollout_check_each_step`),
    the same without EOS ids (`as_rollout_no_eos`: the loop's trip count known), then as bench/sampling_bench.py
    times it (bf16 weights, greedy, no routes). One JSON line each with tokens/s (new tokens over the call); the
    rollout's own tokens/s is the iterations' generate_tokens_per_s."""
    import jax
    import jax.numpy as jnp

    from deepjax.infer import sampling as SP
    from deepjax.infer import text

    P, L, sc = text.sampler_inputs(run.tokenizer, run.rollout_prompts(run.next_prompts()), run.sampling)
    P, L = jnp.asarray(P), jnp.asarray(L)
    params = run.policy_params()
    bf16 = SP.compute_params(params, run.cfg.model.dtype)  # as sampling_bench's: the router's gate stays float32
    every, held = SP.STOP_CHECK_EVERY, dict(SP._JITS)  # (the rollout's compiled sampler, restored after)
    modes = (("as_rollout", params, sc, every), ("as_rollout_check_each_step", params, sc, 1),
             ("as_rollout_no_eos", params, dataclasses.replace(sc, eos_ids=()), every),
             ("as_sampling_bench", bf16, dataclasses.replace(sc, temperature=0.0, record_routes=False,
                                                             record_support=False, eos_ids=()), every))
    for name, p, c, stop_every in modes:
        SP.STOP_CHECK_EVERY = stop_every
        SP._JITS.clear()  # traced anew: the check interval is read while tracing
        try:
            key = jax.random.key(s)
            jax.block_until_ready(SP.jit_generate(run.graphdef, p, P, L, key, c).tokens)
            best, n = float("inf"), 0
            for _ in range(reps):
                t = time.perf_counter()
                out = SP.jit_generate(run.graphdef, p, P, L, key, c)
                n = int(jax.device_get(out.lengths).sum())
                best = min(best, time.perf_counter() - t)
        finally:
            SP.STOP_CHECK_EVERY = every
            SP._JITS.clear()
            SP._JITS.update(held)
        emit(what="deepjax_sampler_alone", mode=name, rows=int(P.shape[0]), prompt_width=int(P.shape[1]),
             new_tokens=n, s=best, tokens_per_s=n / best, temperature=c.temperature,
             record_routes=c.record_routes, eos_ids=list(c.eos_ids), stop_check_every=stop_every)


def run_deepjax(args) -> dict:
    """{mu: median seconds per iteration} (or {"error": ...}); one JSON line per iteration and per mu."""
    import jax

    from deepjax import model as M
    from deepjax.infer import text
    from deepjax.rl import loop

    dev = jax.devices()[0]
    emit(what="device", kind=dev.device_kind, backend=jax.default_backend(), jax=jax.__version__,
         devices=jax.device_count())
    from deepjax.model import ops
    from train_bench import ops_settings  # bench/ is on sys.path when this script runs

    settings = ops_settings(args.ops or None)
    for name, value in settings.items():
        setattr(ops, name, value)
    if settings:
        emit(what="ops", **{k: repr(v) for k, v in settings.items()})
    cfg = config(args, probe=True)
    workdir = tempfile.mkdtemp(prefix="grpo_bench_")
    out: dict = {}
    run = None
    try:
        t = time.perf_counter()
        with generated_prompts() as prompts_kind:
            run = loop.GRPORun(cfg, workdir)
        rows = run.rows
        emit(what="deepjax_run", preset=args.preset, params=M.count_params(run.policy_params()),
             dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype, rows=rows, new=args.new, beta=args.beta,
             micro_batches=cfg.rl.micro_batches,
             template=args.template, decode_path=text.decode_path(run.sampling, run.mesh, rows),
             mesh=dict(run.mesh.shape), prompt_iterator=prompts_kind, build_s=time.perf_counter() - t)
        if args.breakdown:
            timed_parts(run)
        s = 0
        for i, mu in enumerate(args.mu):
            run.cfg = with_mu(cfg, mu)  # GRPORun.update reads rl.loss.mu; the jitted step does not depend on it
            for w in range(args.warmup if i == 0 else 0):
                t = time.perf_counter()
                iteration(run, s)
                s += 1
                emit(what="deepjax_grpo_warmup", mu=mu, iteration=w, s=time.perf_counter() - t,
                     note="compiles the sampler and the update" if w == 0 else "untimed")
            recs = []
            for k in range(args.steps):
                recs.append(iteration(run, s))
                s += 1
                emit(what="deepjax_grpo_iteration", mu=mu, iteration=k, **recs[-1])
            times = [r["s"] for r in recs]
            out[mu] = {k: statistics.median(r[k] for r in recs) for k in ("s", "rollout_s", "update_s")}
            emit(what="deepjax_grpo", mu=mu, s_per_iteration=out[mu]["s"], iterations_s=times, rows=rows,
                 new=args.new)
        if args.sampler_alone:
            sampler_alone(run, s)
        for part in args.trace or ():
            traced_iteration(run, s, part, os.path.join(args.trace_dir, part))
            s += 1
        if jax.default_backend() == "gpu":
            stats = dev.memory_stats() or {}
            emit(what="deepjax_memory", peak_gib=stats.get("peak_bytes_in_use", 0) / 2**30,
                 limit_gib=stats.get("bytes_limit", 0) / 2**30)
    except Exception as e:  # one line (an out-of-memory update says so), and the table still prints
        traceback.print_exc()  # (stderr) where it failed
        emit(what="deepjax_grpo", error=f"{type(e).__name__}: {str(e)[:600]}")
        out["error"] = f"{type(e).__name__}"
    finally:
        if run is not None:
            run.checkpointer.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------------------------------- TRL


def hf_config_file(args, tmp: str):
    """None for the bench shape unchanged (the anchor's own `bench_cfg`), else a config.json of the model."""
    from deepjax.model import presets

    cfg = config(args).model
    d = cfg.to_hf()
    same = {k: v for k, v in d.items() if k != "torch_dtype"} == \
        {k: v for k, v in presets.bench().to_hf().items() if k != "torch_dtype"}
    if args.preset == "bench" and same:
        return None
    path = os.path.join(tmp, "hf_config.json")
    with open(path, "w") as f:
        json.dump(d, f)
    return path


def run_trl(args) -> dict:
    """{mu: seconds per iteration} from bench/anchors/trl_grpo.py (or {"skipped"/"error": why})."""
    here = os.path.dirname(os.path.abspath(__file__))
    tmp = tempfile.mkdtemp(prefix="grpo_bench_trl_")
    try:
        hf = hf_config_file(args, tmp)
        cmd = [args.trl_python, os.path.join(here, "anchors", "trl_grpo.py"), "--prompts", str(args.prompts),
               "--group", str(args.group), "--new", str(args.new), "--mu", *map(str, args.mu),
               "--steps", str(args.trl_steps or args.steps), "--warmup", str(args.trl_warmup),
               "--micro", str(args.trl_micro),
               "--beta", str(args.beta), "--template", args.template, "--dtype", args.trl_dtype] + \
            (["--hf-config", hf] if hf else [])
        env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", JAX_PLATFORMS="cpu",
                   TOKENIZERS_PARALLELISM="false")
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out: dict = {}
    for line in p.stdout.splitlines():
        try:
            d = json.loads(line)
        except ValueError:
            continue
        if not isinstance(d, dict) or "what" not in d:
            continue
        print(line, flush=True)
        if d["what"] == "trl_grpo" and "skipped" in d:
            out["skipped"] = d["skipped"]
        elif d["what"] == "trl_grpo" and "s_per_iteration" in d:
            out[d["mu"]] = {"s": d["s_per_iteration"], "rollout_s": statistics.median(d["rollout_s"] or [0.0])}
        elif d["what"] == "trl_grpo" and "error" in d:
            out[d["mu"]] = {"error": d["error"]}
    if p.returncode:
        out.setdefault("error", f"anchor exit status {p.returncode}")
        emit(what="trl_grpo", error=f"exit status {p.returncode}", stderr_tail=p.stderr[-3000:])
    return out


# ---------------------------------------------------------------------------------------------------------- main


def table(args, dj: dict, trl: dict) -> None:
    def s(d, mu, key="s"):
        v = d.get(mu, {})
        return v.get(key) if isinstance(v, dict) else None

    fmt = lambda v, w, p=2: f"{v:>{w}.{p}f}" if isinstance(v, (int, float)) else f"{'-':>{w}}"  # noqa: E731
    print(f"\n{args.preset} preset, bf16 compute, deepjax {args.param_dtype} / TRL {args.trl_dtype} params; "
          f"{args.prompts} prompts x G {args.group} x {args.new} new tokens ({args.prompts * args.group} rollouts), "
          f"template {args.template}, beta {args.beta:g}; seconds per GRPO iteration (median of {args.steps}), "
          f"target TRL / deepjax >= {TARGET:g}x")
    print(f"{'mu':>3} {'deepjax s':>10} {'rollout s':>10} {'update s':>9} {'TRL s':>9} {'TRL rollout s':>14} "
          f"{'TRL / deepjax':>14} {'target':>7}")
    for mu in args.mu:
        a, b = s(dj, mu), s(trl, mu)
        ratio = b / a if a and b else None
        ok = "-" if ratio is None else ("met" if ratio >= TARGET else "MISSED")
        print(f"{mu:>3} {fmt(a, 10)} {fmt(s(dj, mu, 'rollout_s'), 10)} {fmt(s(dj, mu, 'update_s'), 9)} "
              f"{fmt(b, 9)} {fmt(s(trl, mu, 'rollout_s'), 14)} {fmt(ratio, 13, 1) + ('x' if ratio else ' ')} "
              f"{ok:>7}")
    for side, d in (("deepjax", dj), ("TRL", trl)):
        for k in ("skipped", "error"):
            if k in d:
                print(f"{side}: {k}: {d[k]}")
        for mu in args.mu:
            if isinstance(d.get(mu), dict) and "error" in d[mu]:
                print(f"{side} mu {mu}: error: {d[mu]['error']}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bench", help="a deepjax config or preset name (deepjax.model.presets)")
    ap.add_argument("--prompts", type=int, default=64, help="prompts per iteration (rl.prompts_per_step)")
    ap.add_argument("--group", type=int, default=8, help="completions per prompt (rl.loss.group_size)")
    ap.add_argument("--new", type=int, default=512, help="max new tokens per completion (rl.rollout.max_new_tokens)")
    ap.add_argument("--mu", type=int, nargs="+", default=[1, 2], help="optimizer updates per batch (rl.loss.mu)")
    ap.add_argument("--steps", type=int, default=1, help="timed iterations per mu (the median is reported)")
    ap.add_argument("--warmup", type=int, default=2, help="deepjax's untimed iterations before the first mu (on an "
                    "H100 its first iteration after the compiling one still spent 0.33 s more on the host)")
    ap.add_argument("--trl-warmup", type=int, default=1, help="TRL's untimed iterations before the first mu (its "
                    "first after warm-up ran as fast as the next: session 14)")
    ap.add_argument("--template", default="plain", help="prompt template: plain | r1 (data.template)")
    ap.add_argument("--beta", type=float, default=0.0, help="KL coefficient on both sides (0: no reference model)")
    ap.add_argument("--param-dtype", default="float32", help="deepjax's model.param_dtype (TRL: float32 + bf16 "
                    "autocast)")
    ap.add_argument("--remat", default="none", help="model.remat of the update (none | full | save_dots | "
                    "save_outputs | save_experts)")
    ap.add_argument("--micro-batches", type=int, default=None, help="rl.micro_batches: the update's rows in this many "
                    "sequential parts (must divide --prompts x --group; default: the greatest common divisor of 8 "
                    "and the rows)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="more deepjax config overrides, e.g. --set model.remat=full (repeatable)")
    ap.add_argument("--ops", nargs="+", default=[], metavar="NAME=VALUE",
                    help="deepjax.model.ops settings for deepjax's side (as bench/train_bench.py's --ops), e.g. --ops "
                    "GATHER_ROWS=True")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sampler-alone", action="store_true", help="after the iterations, time the sampler alone on "
                    "the same rows: as the rollout calls it, and as sampling_bench does (bf16, greedy)")
    ap.add_argument("--breakdown", action="store_true", help="time each part of an iteration, blocking on its "
                    "outputs (the sampler call, its outputs to the host, scoring, advantages, the batch, the update; "
                    "`timed_parts`): parts_s per iteration, sampler_call_s the sampler's")
    ap.add_argument("--trace", nargs="+", choices=("update", "sampler"), help="after the iterations, one more for "
                    "each part named, with that part under jax.profiler.trace (into --trace-dir/PART), and a summary "
                    "of its GPU kernels")
    ap.add_argument("--trace-dir", default="/tmp/grpo_trace", help="where --trace writes")
    ap.add_argument("--no-trl", action="store_true", help="skip the TRL anchor")
    ap.add_argument("--no-deepjax", action="store_true", help="run only the TRL anchor")
    ap.add_argument("--trl-steps", type=int, default=None, help="TRL's timed iterations per mu (default --steps; "
                    "each ~55 s at the bench shape on an H100)")
    ap.add_argument("--trl-micro", type=int, default=32, help="TRL rows per forward / backward "
                    "(per_device_train_batch_size; gradient accumulation over the rest)")
    ap.add_argument("--trl-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                    help="TRL's model weights (float32: fp32 master weights under bf16 autocast, as deepjax)")
    ap.add_argument("--trl-python", default=sys.executable, help="the Python that runs the TRL anchor")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.trl_warmup < 0 or args.prompts < 1 or args.group < 2 or args.new < 1:
        ap.error("--steps >= 1, --warmup >= 0, --trl-warmup >= 0, --prompts >= 1, --group >= 2, --new >= 1")

    # TRL first: the GPU is still free (JAX takes its memory pool when deepjax's side first touches the device).
    trl = {"skipped": "--no-trl"} if args.no_trl else run_trl(args)
    if args.no_trl:
        emit(what="trl_grpo", skipped="--no-trl")
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # TRL is done: the GPU is deepjax's
    dj = {"skipped": "--no-deepjax"} if args.no_deepjax else run_deepjax(args)
    for mu in args.mu:
        a, b = dj.get(mu), trl.get(mu)
        if isinstance(a, dict) and isinstance(b, dict) and a.get("s") and b.get("s"):
            emit(what="ratio_trl_over_deepjax", mu=mu, value=b["s"] / a["s"], target=TARGET)
    table(args, dj, trl)


if __name__ == "__main__":
    main()

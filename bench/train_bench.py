"""Training throughput of one device: the step `deepjax train` jits (AdamW as `make_optimizer` builds it, under the
run's mesh, state donated), per `ModelConfig.kernels`, beside the HF transformers anchor measured in the same call.

    JAX_PLATFORMS=cuda PYTHONPATH=. python bench/train_bench.py --kernels xla tokamax
    JAX_PLATFORMS=cuda PYTHONPATH=. python bench/train_bench.py --kernels tokamax --shapes 8x2048 2x8192 \
        --remat none full save_dots save_outputs save_experts --param-dtype float32 bfloat16     # issue 32's table
    JAX_PLATFORMS=cuda PYTHONPATH=. python bench/train_bench.py --kernels tokamax --remat none full \
        --layer-loop scan python --param-dtype bfloat16     # the layer stacks as a scan or a Python loop
    PYTHONPATH=. python bench/train_bench.py --batch 1 --seq 64 --steps 1 --preset tiny --no-hf --kernels xla  # CPU
    JAX_PLATFORMS=cuda PYTHONPATH=. python bench/train_bench.py --kernels tokamax --batch 64 --no-hf \
        --mesh data=1 fsdp=-1 expert=1   --mesh fsdp=1 expert=8        # 8 GPUs: FSDP, then expert parallel (issue 24)

Bench preset, B 8 x T 2048, bf16 compute, fp32 params; each row a packed batch of --docs documents (segment ids
1..N). One subprocess per configuration (`memory_stats()` peaks are per process), then bench/anchors/hf_deepseek_v3.py
(stopped after its training line). Prints one JSON line each, then a table:

    step_ms   mean over --steps after the compiling call and 2 warmup steps
    mfu       tokens/s x matmul_flops_per_token / the bf16 8192^3 matmul rate measured in the same process
              (per device on a mesh of several: tokens/s per device)

--ops NAME=VALUE ... (repeatable: one row each) sets `deepjax.model.ops` module settings in that row's process
(GMM_FORWARD, GMM_INPUT_GRAD, TOKAMAX_BWD_HEAD_PAD, ...): A/B rows of one kernel choice in one command.

--mesh AXIS=N ... (repeatable: one row each) runs the step on a `deepjax.parallel.sharding.MeshConfig` over all
devices (data / fsdp / expert / tensor, one of them -1 for the rest), --batch being the global batch; default: one
device, as `deepjax train` runs there.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import subprocess
import sys
import threading
import time
import traceback

import jax
import jax.numpy as jnp

from deepjax import model as M
from deepjax.config import set_path
from deepjax.model import ops, presets
from deepjax.parallel import sharding as S
from deepjax.train import optim, step as TS
from deepjax.train.config import OptimConfig, TrainConfig


def emit(**kw):
    print(json.dumps(kw, default=str), flush=True)
    return kw


def matmul_peak(n: int) -> float:
    """bf16 n^3 matmul FLOP/s (as the HF anchor measures its peak)."""
    a = jnp.ones((n, n), jnp.bfloat16)
    f = jax.jit(lambda a, b: a @ b)
    for _ in range(3):
        f(a, a).block_until_ready()
    t = time.perf_counter()
    for _ in range(20):
        y = f(a, a)
    y.block_until_ready()
    return 2 * n ** 3 / ((time.perf_counter() - t) / 20)


def make_batch(B: int, T: int, docs: int, vocab: int) -> TS.Batch:
    """Random tokens; each row `docs` packed documents of T // docs tokens (the last takes the remainder)."""
    seg_T = jnp.minimum(jnp.arange(T) // (T // docs), docs - 1)
    pos_T = jnp.arange(T) - seg_T * (T // docs)
    tok = jax.random.randint(jax.random.key(1), (B, T), 0, vocab, jnp.int32)
    row = lambda x: jnp.broadcast_to(x.astype(jnp.int32), (B, T))  # noqa: E731
    return TS.Batch(tok, row(seg_T + 1), row(pos_T))


def ops_settings(items) -> dict:
    """--ops NAME=VALUE ...: `deepjax.model.ops` module settings, VALUE a Python literal (else a string); a name ops
    does not have is an error."""
    import ast
    out = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not hasattr(ops, name):
            raise SystemExit(f"--ops {item}: NAME=VALUE with NAME a setting of deepjax.model.ops")
        try:
            out[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[name] = value
    return out


def one(args) -> dict:
    """One configuration, in this process: its JSON record."""
    k = args.one
    settings = ops_settings(args.ops[0] if args.ops else None)
    for name, value in settings.items():
        setattr(ops, name, value)
    rec = dict(what="train_step", kernels=k, preset=args.preset, B=args.batch, T=args.seq, docs=args.docs,
               remat=args.remat[0], layer_loop=args.layer_loop[0], attention=args.attention[0],
               param_dtype=args.param_dtype[0], jax=jax.__version__,
               device=jax.devices()[0].device_kind)
    if settings:
        rec["ops"] = settings
    try:
        rec["resolved"] = ops.resolve(k, jnp.bfloat16)
    except Exception as e:  # noqa: BLE001
        rec["resolved"] = f"unavailable ({type(e).__name__}: {e})"[:200]
    cfg = dataclasses.replace(getattr(presets, args.preset)(), dtype="bfloat16", param_dtype=args.param_dtype[0],
                              remat=args.remat[0], layer_loop=args.layer_loop[0], attention=args.attention[0],
                              kernels=k)
    cfg.validate()
    o, t = OptimConfig(), TrainConfig()
    # as deepjax/train/run.py (abstract_train_state, Run, jit_update) and loop.py (TrainRun) on one device
    mc = mesh_config(args.mesh[0] if args.mesh else [])
    mesh = S.make_mesh(mc, None if args.mesh else jax.devices()[:1])
    rules = S.rules_for(mc.rules)
    rec.update(mesh={k: int(v) for k, v in mesh.shape.items()}, devices=int(mesh.devices.size))
    graphdef, params, _ = M.init_sharded(cfg, jax.random.key(0), mesh, rules)
    active = M.count_active_params(cfg, params)
    optimizer, schedule = optim.make_optimizer(o, TS.split_params(params)[0], t.steps)
    shardings = TS.state_shardings(jax.eval_shape(lambda p: TS.init_state(p, optimizer, 0), params), mesh, rules)
    state = jax.jit(lambda p: TS.init_state(p, optimizer, 0), out_shardings=shardings)(params)
    del params
    B, T = args.batch, args.seq
    batch = jax.device_put(make_batch(B, T, args.docs, cfg.vocab_size), S.batch_spec(mesh, rules))
    with S.use_mesh(mesh, rules):
        fn = TS.make_train_step(graphdef, cfg, optimizer, schedule, micro_batches=o.micro_batches,
                                mtp_lambda=t.mtp_lambda, balance_alpha=t.balance_alpha,
                                bias_update_speed=t.bias_update_speed)
        step = jax.jit(fn, donate_argnums=0, out_shardings=(shardings, None))
        t0 = time.perf_counter()
        state, m = step(state, batch)
        first = float(m["loss"])
        compile_s = time.perf_counter() - t0
        state, m, dt = timed(step, state, batch, 2, args.steps)
        last = float(m["loss"])
        stats = jax.devices()[0].memory_stats() or {}
        if args.profile:
            name = f"{k}_{cfg.attention}_{cfg.remat}_{cfg.layer_loop}_{cfg.param_dtype}_{B}x{T}" + "".join(
                f"_{a}{n}" for a, n in rec["mesh"].items() if n > 1)
            with jax.profiler.trace(os.path.join(args.profile, name), create_perfetto_trace=True):
                for _ in range(3):
                    state, m = step(state, batch)
                jax.block_until_ready(m)
        tuned = autotuned(args, fn, shardings, state, batch) if args.autotune and rec["resolved"] == "tokamax" else {}
    del state, m
    pk = matmul_peak(8192 if jax.default_backend() != "cpu" else 512)
    tps = B * T / dt
    mem = stats.get("peak_bytes_in_use")
    n_dev = rec["devices"]
    return dict(rec, tokens_per_s=tps, tokens_per_s_per_device=tps / n_dev, step_ms=dt * 1e3,
                mfu=tps / n_dev * TS.matmul_flops_per_token(cfg, T, active) / pk,
                peak_tflops=pk / 1e12, compile_s=compile_s, peak_mem_gib=None if mem is None else mem / 2 ** 30,
                loss_first=first, loss_last=last, finite=math.isfinite(first) and math.isfinite(last),
                active_params=active, **tuned)


def timed(step, state, batch, warmup: int, steps: int):
    """(state, metrics, seconds per step) of `steps` steps after `warmup` untimed ones."""
    for _ in range(warmup):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    return state, m, (time.perf_counter() - t0) / steps


def mesh_config(items: list) -> S.MeshConfig:
    """A MeshConfig from AXIS=N items (e.g. ["fsdp=2", "expert=4"]; the axes not named are 1), parsed as the
    `--config.mesh.AXIS=N` overrides are (`config.set_path`: an unknown axis or value is one error naming it)."""
    mc = S.MeshConfig(fsdp=1)
    for it in items:
        axis, _, n = it.partition("=")
        mc = set_path(mc, [axis], n, f"--mesh {it}")
    mc.validate()
    return mc


def autotuned(args, fn, shardings, state, batch) -> dict:
    """tokamax's autotuner over every tokamax op in the step (its shipped configs miss the bench shapes: "Autotuning
    cache miss"), the result written to --autotune as JSON (`tokamax.AutotuningResult.dumps`), then the step
    re-traced under it and timed: {tuned_tokens_per_s, tuned_step_ms, autotune_s} or {autotune_error}."""
    tk = ops._tokamax()
    try:
        t0 = time.perf_counter()
        res = tk.autotune(jax.jit(fn, donate_argnums=0, out_shardings=(shardings, None)).lower(state, batch),
                          progress_bar=False)
        tune_s = time.perf_counter() - t0
        with open(args.autotune, "w") as f:
            res.dump(f, prune_errors=True)
        with res:  # configs are picked when the ops are traced: a fresh function object, so a fresh trace
            step = jax.jit(lambda s, b: fn(s, b), donate_argnums=0, out_shardings=(shardings, None))
            state, m, dt = timed(step, state, batch, 3, args.steps)
        return dict(tuned_tokens_per_s=args.batch * args.seq / dt, tuned_step_ms=dt * 1e3, autotune_s=tune_s,
                    tuned_loss_last=float(m["loss"]))
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        return dict(autotune_error=f"{type(e).__name__}: {str(e)[:300]}")


def child(cmd: list, env: dict, timeout: float, stop_at: str = "") -> tuple[list, str]:
    """(JSON records on stdout, stderr tail) of `cmd`; killed after `timeout` s, or once a record has what=stop_at."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    killed, err, recs = [], [], []
    timer = threading.Timer(timeout, lambda: (killed.append(1), p.kill()))
    timer.start()
    drain = threading.Thread(target=lambda: err.extend(p.stderr), daemon=True)
    drain.start()
    for line in p.stdout:
        if line.startswith("{"):
            recs.append(json.loads(line))
            print(line, end="", flush=True)
            if recs[-1].get("what") == stop_at:
                p.kill()  # the HF anchor's generate measurement, not wanted here
                break
    p.wait(), timer.cancel(), drain.join(5)
    return recs, (f"timed out after {timeout:.0f} s; " if killed else "") + "".join(err)[-2000:]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", nargs="+", default=["xla", "tokamax", "auto"], help="ModelConfig.kernels values")
    ap.add_argument("--preset", default="bench",
                    choices=["bench", "tiny", "deepseek_v2_lite", "deepseek_v2", "deepseek_v3"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--docs", type=int, default=1, help="packed documents per row (segment ids 1..N)")
    ap.add_argument("--remat", nargs="+", default=["none"],
                    help="ModelConfig.remat policies, one row each: none | full | save_dots | save_outputs | "
                    "save_experts")
    ap.add_argument("--layer-loop", nargs="+", default=["auto"], choices=["auto", "scan", "python"],
                    help="ModelConfig.layer_loop values, one row each: the layer stacks as a lax.scan or a Python "
                    "loop (auto: the loop on GPU for the bench preset)")
    ap.add_argument("--attention", nargs="+", default=["auto"], choices=["auto", "xla", "tokamax", "cudnn"],
                    help="ModelConfig.attention values, one row each (auto: as --kernels resolves)")
    ap.add_argument("--param-dtype", nargs="+", default=["float32"], help="parameter dtypes, one row each")
    ap.add_argument("--shapes", nargs="+", metavar="BxT",
                    help="batch x length shapes, one row (and one HF anchor) each; default --batch x --seq")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (after the compile and 2 warmup steps)")
    ap.add_argument("--mesh", nargs="+", action="append", metavar="AXIS=N",
                    help="a mesh over all devices, e.g. --mesh fsdp=2 expert=4 (repeatable: one row each)")
    ap.add_argument("--profile", metavar="DIR",
                    help="trace 3 more steps of each configuration into "
                    "DIR/KERNELS_ATTENTION_REMAT_LAYERLOOP_PARAMDTYPE_BxT")
    ap.add_argument("--autotune", metavar="FILE", help="after timing a tokamax configuration, run tokamax's "
                    "autotuner on its step, write the configs to FILE (JSON) and time the step again under them")
    ap.add_argument("--timeout", type=float, default=540.0, help="seconds per subprocess")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF transformers anchor")
    ap.add_argument("--ops", nargs="+", action="append", metavar="NAME=VALUE",
                    help="deepjax.model.ops settings for a row (repeatable: one row each), e.g. --ops "
                    "GMM_FORWARD=triton GMM_INPUT_GRAD=triton --ops 'TOKAMAX_BWD_HEAD_PAD={}'")
    ap.add_argument("--one", metavar="KERNELS", help=argparse.SUPPRESS)  # child: one configuration
    args = ap.parse_args(argv)
    if not 1 <= args.docs <= args.seq:
        ap.error(f"--docs {args.docs}: between 1 and --seq")
    if args.one:
        try:
            emit(**one(args))
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            emit(what="train_step", kernels=args.one, error=f"{type(e).__name__}: {str(e)[:400]}")
        return
    try:
        shapes = [tuple(int(v) for v in sh.lower().split("x")) for sh in args.shapes] if args.shapes else \
            [(args.batch, args.seq)]
    except ValueError:
        ap.error(f"--shapes {' '.join(args.shapes)}: each BxT, e.g. 8x2048")
    me, here = os.path.abspath(__file__), os.path.dirname(os.path.abspath(__file__))
    f = lambda x, p: "-" if x is None else f"{x:,.{p}f}"  # noqa: E731
    table = ["| B x T | kernels | remat | params | mesh | resolved | tokens/s | per device | step ms | MFU | "
             "compile s | peak GiB | loss first -> last | x HF |", "|---" * 14 + "|"]
    device = ""
    for B, T in shapes:
        rows = []
        for k in args.kernels:
            for remat, loop, attn, pd, mesh, opset in itertools.product(
                    args.remat, args.layer_loop, args.attention, args.param_dtype, args.mesh or [None],
                    args.ops or [None]):
                ops_settings(opset)  # a bad setting stops here, before any child runs
                common = ["--preset", args.preset, "--batch", str(B), "--seq", str(T), "--docs", str(args.docs),
                          "--remat", remat, "--layer-loop", loop, "--attention", attn, "--param-dtype", pd,
                          "--steps", str(args.steps)] + (
                    ["--profile", args.profile] if args.profile else []) + (
                    ["--autotune", args.autotune] if args.autotune else []) + (["--mesh", *mesh] if mesh else []) + (
                    ["--ops", *opset] if opset else [])
                recs, err = child([sys.executable, me, "--one", k, *common], dict(os.environ), args.timeout)
                r = next((r for r in recs if r.get("what") == "train_step"), None)
                rows.append(r or emit(what="train_step", kernels=k, ops=ops_settings(opset), remat=remat,
                                      layer_loop=loop, attention=attn,
                                      param_dtype=pd, B=B, T=T, mesh=mesh, error=f"no result: {err}"))
        hf = None
        if not args.no_hf:
            env = dict(os.environ, B=str(B), T=str(T))
            recs, err = child([sys.executable, os.path.join(here, "anchors", "hf_deepseek_v3.py")], env, args.timeout,
                              stop_at="hf_train_step")
            hf = next((r for r in recs if r.get("what") == "hf_train_step"), None)
            if hf is None:
                oom = "out of memory" in err.lower() or "outofmemory" in err.lower()
                hf = emit(what="hf_train_step", B=B, T=T, error="out of memory" if oom else f"no result: {err}")
        for r in rows:
            device = device or r.get("device", "")
            mesh = ",".join(f"{a}{n}" for a, n in (r.get("mesh") or {}).items() if n > 1) or "1 device"
            loop = "".join(f" ({r[f]})" for f in ("layer_loop", "attention") if r.get(f, "auto") != "auto")
            loop += "".join(f" {n}={v}" for n, v in (r.get("ops") or {}).items())
            head = f"| {B} x {T} | {r['kernels']} | {r.get('remat')}{loop} | {r.get('param_dtype')} | {mesh} |"
            if "error" in r:
                table.append(f"{head} error: {r['error'][:100]} | | | | | | | | |")
                continue
            xhf = f(r["tokens_per_s"] / hf["tokens_per_s"], 2) if hf and "error" not in hf else "-"
            table.append(f"{head} {str(r['resolved'])[:40]} | {f(r['tokens_per_s'], 0)} | "
                         f"{f(r.get('tokens_per_s_per_device'), 0)} | {f(r['step_ms'], 1)} | "
                         f"{f(r['mfu'], 3)} | {f(r['compile_s'], 1)} | {f(r['peak_mem_gib'], 2)} | "
                         f"{r['loss_first']:.3f} -> {r['loss_last']:.3f} | {xhf} |")
        if hf and "error" in hf:
            table.append(f"| {B} x {T} | HF transformers | - | float32 | 1 device | {hf['error'][:60]} "
                         "| | | | | | | | |")
        elif hf:
            table.append(f"| {B} x {T} | HF transformers | - | float32 | 1 device | torch eager | "
                         f"{f(hf['tokens_per_s'], 0)} | {f(hf['tokens_per_s'], 0)} | "
                         f"{f(hf['step_s'] * 1e3, 1)} | {f(hf['mfu'], 3)} | - | {f(hf['max_mem_gib'], 2)} | "
                         f"{hf['loss']:.3f} | 1.00 |")
    print(f"\n{device}, {args.preset} preset, {args.docs} doc(s)/row, bf16 compute, AdamW\n")
    print("\n".join(table))

if __name__ == "__main__":
    main()

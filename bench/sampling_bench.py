"""Decode throughput of deepjax's sampler on the `bench` preset (bf16), beside HF transformers in the same run.

    PYTHONPATH=. python bench/sampling_bench.py                 # batch 1 and 64, prompt 128, 256 new tokens
    PYTHONPATH=. python bench/sampling_bench.py --no-hf --batches 1 8 64
    PYTHONPATH=. python bench/sampling_bench.py --module     # also the unfused module path (sampling.decoder='model')
    PYTHONPATH=. python bench/sampling_bench.py --kernels auto xla   # with and without the Pallas kernels
    PYTHONPATH=. python bench/sampling_bench.py --no-hf --batches 64 256 --mesh expert=8   # experts over 8 devices

The path column is the decoder `sampling.decoder=auto` resolves to for that batch (`sampling.resolve_decoder`):
`pallas` / `fused` (one device, up to FUSED_DECODE_MAX_TOKENS rows) or `model` (the model's modules; always under
--mesh, which shards the parameters and rows over a `MeshConfig` of all devices as `deepjax eval` / `grpo` do).

Prints JSON lines, then a table: tokens/s (new tokens over the whole generate call, prefill included, as HF's
figure), decode-only tokens/s, the cache bytes per token, and the memory-bandwidth roofline of one decode step:

    bytes per step = weights a step must read (embedding row, attention, dense FFN, shared experts, the
                     routed experts the batch selects: E (1 - (1 - K/E)^B) per layer expected under uniform
                     routing, the head) + the cache read (B x positions x layers x (C + R) x 2 bytes)
    roofline tokens/s = B / (bytes per step / measured copy bandwidth)

The copy bandwidth is measured here (as bench/anchors/jax_peak.py: read + write of a 2 GiB array, donated).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from deepjax import model as M
from deepjax.model import presets
from deepjax.infer import sampling as SP
from deepjax.parallel import distributed as D
from deepjax.parallel import sharding as S


def emit(**kw):
    print(json.dumps(kw), flush=True)
    return kw


def copy_bandwidth() -> float:
    """Read + write bytes per second of x * 1.0001 over a 2 GiB array, the output donated back as the next input.
    Without the donation each call allocates a fresh 2 GiB output: under XLA_PYTHON_CLIENT_PREALLOCATE=false the
    first calls' allocations dominated and this read 0.4-0.6 TB/s instead of ~2.9 (docs/LOG.md, session 6)."""
    x = jax.random.normal(jax.random.key(0), (1024, 1024, 512), jnp.float32)  # 2 GiB
    nbytes = x.nbytes
    cp = jax.jit(lambda x: x * 1.0001, donate_argnums=0)
    for _ in range(3):
        x = cp(x)
    x.block_until_ready()
    t = time.perf_counter()
    for _ in range(20):
        x = cp(x)
    x.block_until_ready()
    bw = 2 * nbytes / ((time.perf_counter() - t) / 20)
    del x
    return bw


def step_bytes(cfg, params, B: int, positions: int) -> dict:
    """Bytes one decode step must read (see the module docstring)."""
    item = jnp.dtype(cfg.param_dtype).itemsize
    E, K, D, I = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.hidden_size, cfg.moe_intermediate_size
    total = M.count_params(params, include_mtp=False)
    routed_all = cfg.n_moe_layers * E * 3 * D * I
    embed = cfg.vocab_size * D
    distinct = E * (1 - (1 - K / E) ** B)
    weights = (total - routed_all - embed + cfg.n_moe_layers * distinct * 3 * D * I) * item + B * D * item
    cache = B * positions * SP.cache_bytes_per_token(cfg)
    return {"weights": weights, "cache": cache, "total": weights + cache, "experts_read_per_layer": distinct}


def time_generate(graphdef, params, cfg, B: int, prompt: int, new: int, reps: int, fused: bool = True,
                  kernels: str = "auto", kernel_set=SP.KN.KERNELS, kernel_tuning: tuple = (), mesh=None,
                  rules=None) -> dict:
    """Times `jit_generate` on B random prompts; with `mesh`, under it (rows over its batch axes), as
    `text.complete` runs on a mesh of several devices."""
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, cfg.vocab_size, (B, prompt)).astype(np.int32)
    lengths = np.full((B,), prompt, np.int32)
    if mesh is None:
        prompts, lengths = jnp.asarray(prompts), jnp.asarray(lengths)
        scope = contextlib.nullcontext
    else:
        prompts, lengths = D.from_host(prompts, mesh, rules), D.from_host(lengths, mesh, rules)
        scope = lambda: S.use_mesh(mesh, rules)  # noqa: E731
    out = {}
    for n in (1, new):  # 1 new token: prefill (+ one sample); the difference is the decode loop
        decoder = "model" if not fused else {"auto": "auto", "xla": "fused"}.get(kernels, kernels)
        sc = SP.SamplingConfig(max_new_tokens=n, temperature=0.0, decoder=decoder, kernel_set=kernel_set,
                               kernel_tuning=kernel_tuning)
        with scope():
            t = time.perf_counter()
            jax.block_until_ready(SP.jit_generate(graphdef, params, prompts, lengths, jax.random.key(0), sc))
            compile_s = time.perf_counter() - t
            times = []
            for r in range(reps):
                t = time.perf_counter()
                o = jax.block_until_ready(SP.jit_generate(graphdef, params, prompts, lengths, jax.random.key(r), sc))
                times.append(time.perf_counter() - t)
        assert int(o.lengths.min()) == n
        out[n] = (min(times), compile_s)
    total, first = out[new][0], out[1][0]
    decoder = SP.resolve_decoder(sc, None, B, one_device=mesh is None)  # the decoder jit_generate took
    path = decoder + (f"({','.join(kernel_set)})" if decoder == "pallas" and kernel_set != SP.KN.KERNELS else "")
    return {"batch": B, "path": path, "devices": 1 if mesh is None else int(mesh.devices.size),
            "tokens": np.asarray(o.tokens[:, :16]).tolist(), "new_tokens": B * new, "s": total,
            "tokens_per_s": B * new / total,
            "decode_tokens_per_s": B * (new - 1) / max(total - first, 1e-9), "prefill_s": first,
            "compile_s": out[new][1]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-hf", action="store_true", help="skip the HF transformers anchor")
    ap.add_argument("--module", action="store_true", help="also time the unfused module path (sampling.decoder='model')")
    ap.add_argument("--preset", default="bench", choices=["bench", "tiny", "deepseek_v2_lite"],
                    help="model shape (tiny: a CPU smoke run)")
    ap.add_argument("--mesh", nargs="+", metavar="AXIS=N", help="sample under a mesh of all devices, e.g. --mesh "
                    "expert=8 (axes not named are 1): the model's modules, sharded, as deepjax eval / grpo")
    ap.add_argument("--kernels", nargs="+", default=["auto"], help="fused path's kernels: auto (Pallas on GPU) | "
                    "xla | pallas | a comma list of Pallas kernels (attention,route,experts); several are timed one "
                    "after the other")
    ap.add_argument("--tuning", nargs="+", action="append", metavar="KERNEL.SETTING=VALUE",
                    help="Pallas kernel tuning overrides (SamplingConfig.kernel_tuning, VALUE a Python literal), "
                    "e.g. --tuning grouped.decode_min_tokens=256 (the fused decode's experts as grouped matmuls): "
                    "one more row of the fused path each, beside the defaults' (repeatable)")
    args = ap.parse_args(argv)
    tunings = [()]
    for group in args.tuning or []:
        try:
            SP.KN.tuning(group)
        except ValueError as e:
            ap.error(f"--tuning {' '.join(group)}: {e}")
        tunings.append(tuple(group))

    dev = jax.devices()[0]
    emit(what="device", kind=dev.device_kind, backend=jax.default_backend(), jax=jax.__version__)
    bw = copy_bandwidth()
    emit(what="copy_bandwidth_tb_s", value=bw / 1e12)
    cfg = dataclasses.replace(getattr(presets, args.preset)(), dtype="bfloat16", param_dtype="bfloat16")
    mesh = rules = None
    if args.mesh:
        from train_bench import mesh_config  # bench/ is on sys.path when this script runs

        mc = mesh_config(args.mesh)
        mesh, rules = S.make_mesh(mc), S.rules_for(mc.rules)
        graphdef, params, _ = M.init_sharded(cfg, jax.random.key(0), mesh, rules)
        emit(what="mesh", **{k: int(v) for k, v in mesh.shape.items()})
    else:
        graphdef, params = M.init(cfg, jax.random.key(0))
    emit(what="model", preset=args.preset, params=M.count_params(params), cache_bytes_per_token=SP.cache_bytes_per_token(cfg))
    rows = []
    for B in args.batches:
        runs = [(True, k, t) for k in args.kernels for t in tunings] + ([(False, "xla", ())] if args.module else [])
        for fused, kernels, tu in runs:
            ks = SP.KN.KERNELS
            if "," in kernels or kernels in ks:
                kernels, ks = "auto", tuple(kernels.split(","))
            r = time_generate(graphdef, params, cfg, B, args.prompt, args.new, args.reps, fused, kernels, ks, tu,
                              mesh=mesh, rules=rules)
            if tu and r["path"].split("(")[0] in ("pallas", "interpret"):  # (the tuning is the kernels')
                r.update(path=r["path"] + "+" + ",".join(tu), tuning=tu)
            mid = args.prompt + args.new // 2  # mean cache positions read per decode step
            by = step_bytes(cfg, params, B, mid)
            r.update(step_bytes=by["total"], roofline_tokens_per_s=B / (by["total"] / bw),
                     experts_read_per_layer=round(by["experts_read_per_layer"], 1))
            rows.append(emit(what="deepjax_generate", **r))
    hf = {}
    if not args.no_hf:
        here = os.path.dirname(os.path.abspath(__file__))
        del params
        p = subprocess.run([sys.executable, os.path.join(here, "anchors", "hf_generate.py"), *map(str, args.batches)],
                           capture_output=True, text=True, env=dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false"))
        for line in p.stdout.splitlines():
            if line.startswith("{"):
                d = json.loads(line)
                hf[d["batch"]] = d["tokens_per_s"]
                print(line, flush=True)
        if p.returncode:
            print(p.stderr[-3000:], file=sys.stderr)
    print(f"\n{dev.device_kind}, {args.preset} preset bf16, prompt {args.prompt}, {args.new} new tokens, greedy; "
          f"copy bandwidth {bw / 1e12:.2f} TB/s; cache {SP.cache_bytes_per_token(cfg)} bytes/token")
    print(f"{'batch':>5} {'path':>22} {'deepjax tok/s':>14} {'decode tok/s':>13} {'roofline tok/s':>15} {'% roofline':>10} "
          f"{'HF tok/s':>9} {'x HF':>7}")
    for r in rows:
        h = hf.get(r["batch"])
        print(f"{r['batch']:>5} {r['path']:>22} {r['tokens_per_s']:>14,.0f} {r['decode_tokens_per_s']:>13,.0f} "
              f"{r['roofline_tokens_per_s']:>15,.0f} {100 * r['decode_tokens_per_s'] / r['roofline_tokens_per_s']:>9.1f}% "
              f"{h or float('nan'):>9,.1f} {r['tokens_per_s'] / h if h else float('nan'):>7.1f}")


if __name__ == "__main__":
    main()

"""Tuning the GPU kernels (bench preset shapes, bf16): GPU time per call of each Pallas kernel against the XLA code
it replaces, over block-size settings, and an end-to-end A/B of settings.

    PYTHONPATH=. python bench/tune.py kernels [--only experts,route,attention,attn_pre]
    PYTHONPATH=. python bench/tune.py kernels --only attn_pre --attn-batch 512 --cache 576 --stages 1,2,3
    PYTHONPATH=. python bench/tune.py grouped [T ...]          (default: 128 8192)
    PYTHONPATH=. python bench/tune.py layouts
    PYTHONPATH=. python bench/tune.py ab --batch 64 route.logits=1 route.logits=0
    PYTHONPATH=. python bench/tune.py ab --batch 64 --rounds 3 "route.logits=1,route.bd=256" route.logits=0

kernels  the decode kernels (`deepjax.infer.fast.kernels`): each function runs R = 16 times on fresh inputs inside
         one jitted call (the experts on different experts each time, so their weights are not in L2), under the
         profiler; prints GPU us per call (summed over kernels), us per call over the span, and the top kernels.
         experts: the gathered experts at T = 1 (gate/up bi and warps, down rows, warps, split or looped), with
         each setting's max error against XLA; route: T = 1 and 64, from XLA's logits and from the residual
         stream (norm + router logits in the kernel), over warps (and bd); attention: B = 1 and 64 over cache
         rows per step and warps; attn_pre (latent_attention_pre) at B = 64 over the same. --attn-batch, --cache
         and --stages set their batches, cache rows and Triton pipeline stages (GRPO's rollout: 512 rows, ~560).
grouped  the prefill's grouped-matmul experts (`deepjax.infer.fast.grouped`; 64 routed experts, 6 per token, + 2
         shared on every token) against `moe.routed_experts_blocked` (the prefill before them): whole calls for
         both w_down layouts, the two kernels and the dispatch alone, and a sweep of TUNING tiles, each with its
         max difference from the default tiles' output (tests/test_gpu_kernels.py checks the default against
         float32 XLA).
layouts  the batch-64 all-experts matmuls (`fused.experts_all_flat`) in each orientation of the two weights:
         11 layers of distinct weights in one jitted chain (x -> layer -> x, so XLA can neither merge the layers'
         matmuls nor skip one), GPU us per layer and the weights' read bandwidth. gate/up [X*2I, D] ("nt",
         contracted axis last) or [D, X*2I] ("nn"); down [D, X*I] ("nt") or [X*I, D] ("nn").
ab       `generate` end to end (bench/sampling_bench.py's timing) with each variant in turn, for several rounds in
         one process (variants side by side see the same machine state; separate processes differ by ~2%,
         docs/LOG.md). A variant is a comma list of `kernel.key=value` overrides of `kernels.TUNING` (values are
         Python literals); an empty string is the defaults. Prints a JSON line per (round, variant), then the
         median tokens/s over the whole call and decode-only per variant.

`ab` passes each variant as `SamplingConfig.kernel_tuning` (an argument: each variant is its own trace). The
single-kernel sweeps call the kernels without a table, so they read `kernels.TUNING`'s defaults, swapped with
`tuned`: each setting is traced in a fresh function (jax.jit caches traces per function object; a first version
of these sweeps timed the same trace under every setting).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import dataclasses
import functools
import json
import statistics
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from deepjax.infer.fast import fused as DF
from deepjax.infer.fast import grouped as KG
from deepjax.infer.fast import kernels as KN
from deepjax.model import presets
from deepjax.model.layers import rms_norm
from deepjax.model.moe import routed_experts_blocked, router_logits
from profile import gpu_kernels, load_trace  # bench/ is on sys.path when this script runs (bench/profile.py)

R = 16  # calls on fresh inputs per timed jit (kernels)


def bench_cfg():
    return dataclasses.replace(presets.bench(), dtype="bfloat16", param_dtype="bfloat16")


def gpu_time(fn, *args, calls: int = R, reps: int = 1):
    """(GPU us per call summed over kernels, us per call over the span, {kernel: us per call}) of `reps` calls of
    fn(*args) under the profiler (after one untimed call), each doing `calls` calls of the timed function."""
    jax.block_until_ready(fn(*args))
    out = tempfile.mkdtemp()
    with jax.profiler.trace(out, create_perfetto_trace=True):
        for _ in range(reps):
            res = fn(*args)
        jax.block_until_ready(res)
    ev, _, gpu = load_trace(out)
    ks = [e for e in gpu_kernels(ev, gpu) if not e["name"].startswith("Memcpy")]
    n = calls * reps
    by = collections.Counter()
    for e in ks:
        by[e["name"][:40]] += e.get("dur", 0) / n
    span = (max(e["ts"] + e.get("dur", 0) for e in ks) - min(e["ts"] for e in ks)) / n
    return sum(by.values()), span, by


def show(label: str, res, extra: str = ""):
    tot, span, by = res
    top = ", ".join(f"{n} {v:.1f}" for n, v in by.most_common(4))
    print(f"{label:48s} {tot:8.1f} us GPU {span:8.1f} us span {extra}| {top}", flush=True)


@contextlib.contextmanager
def tuned(table: dict, **entries):
    """`table` (a TUNING dict) with `entries` replacing its entries, restored afterwards."""
    saved = copy.deepcopy(table)
    table.update(entries)
    try:
        yield
    finally:
        table.clear()
        table.update(saved)


def max_err(got, ref) -> float:
    return float(jnp.abs(jnp.asarray(got, jnp.float32) - jnp.asarray(ref, jnp.float32)).max())


# --------------------------------------------------------------------------------------------- decode kernels


def tune_experts(cfg, rng):
    bf = jnp.bfloat16
    E, S, K = cfg.n_routed_experts, cfg.n_shared_experts, cfg.num_experts_per_tok
    D, I, X = cfg.hidden_size, cfg.moe_intermediate_size, K + S
    k1, k2 = jax.random.split(jax.random.key(0))
    w_gu = (jax.random.normal(k1, (E + S, 2 * I, D), jnp.float32) * 0.02).astype(bf)
    w_down = (jax.random.normal(k2, (E + S, D, I), jnp.float32) * 0.02).astype(bf)
    xs = jnp.asarray(rng.normal(size=(R, 1, D)), bf)
    idxs = jnp.asarray(np.stack([np.concatenate([rng.choice(E, K, replace=False), np.arange(E, E + S)])
                                 for _ in range(R)])[:, None], jnp.int32)
    ws = jnp.asarray(rng.random((R, 1, X)), jnp.float32)

    def xla(xs, idxs, ws):
        return [xs[r] + DF.experts_gathered(xs[r], ws[r], idxs[r], w_gu, w_down) for r in range(R)]

    ref = jax.jit(xla)(xs, idxs, ws)[0]
    show("experts xla (T=1)", gpu_time(jax.jit(xla), xs, idxs, ws))
    for bi, nw, down in ((16, 4, {"bo": 8, "num_warps": 4, "split": False}),
                         (32, 4, {"bo": 32, "num_warps": 4, "split": True}),
                         (8, 8, {"bo": 16, "num_warps": 8, "split": True}),
                         (16, 8, {"bo": 64, "num_warps": 8, "split": True}),
                         (4, 4, {"bo": 4, "num_warps": 4, "split": False})):
        with tuned(KN.TUNING, gate_up={"bi": bi, "num_warps": nw}, down=down):
            f = jax.jit(lambda xs, idxs, ws: [KN.experts_gathered(xs[r], xs[r], idxs[r], ws[r], w_gu, w_down, "gpu")
                                              for r in range(R)])
            err = max_err(f(xs, idxs, ws)[0], ref)
            show(f"experts gate_up bi={bi} w={nw} down {down['bo']},{down['num_warps']},"
                 f"{'split' if down['split'] else 'loop'}", gpu_time(f, xs, idxs, ws), f"err {err:.0e} ")


def tune_route(cfg, rng):
    E, D = cfg.n_routed_experts, cfg.hidden_size
    bias = jnp.asarray(rng.normal(size=E) * 0.01, jnp.float32)
    norm = jnp.asarray(1 + 0.1 * rng.normal(size=D), jnp.bfloat16)
    router = jnp.asarray(rng.normal(size=(E, D)) * 0.03, jnp.bfloat16)
    for T in (1, 64):
        lg = jnp.asarray(rng.normal(size=(R, T, E)), jnp.float32)
        x = jnp.asarray(rng.normal(size=(R, T, D)), jnp.bfloat16)
        show(f"route xla T={T} (from logits)",
             gpu_time(jax.jit(lambda lg: [DF.route_by_rank(lg[r], bias, cfg) for r in range(R)]), lg))
        for nw in (1, 2, 4, 8):
            with tuned(KN.TUNING, route={**KN.TUNING["route"], "num_warps": nw}):
                show(f"route pallas T={T} (from logits) w={nw}",
                     gpu_time(jax.jit(lambda lg: [KN.route(lg[r], bias, cfg, "gpu") for r in range(R)]), lg))
        show(f"route xla T={T} (norm + logits + routing)", gpu_time(jax.jit(lambda x: [DF.route_by_rank(
            router_logits(rms_norm(x[r], norm, cfg.rms_norm_eps), router.T), bias, cfg) for r in range(R)]), x))
        for nw in (4, 8):
            for bd in (64, 128, 256):
                with tuned(KN.TUNING, route={**KN.TUNING["route"], "num_warps": nw, "bd": bd}):
                    f = jax.jit(lambda x: [KN.route(None, bias, cfg, "gpu", x[r], norm, router) for r in range(R)])
                    show(f"route pallas T={T} (from x) w={nw} bd={bd}", gpu_time(f, x))


def tune_attention(cfg, rng, pre: bool, batches=None, cache: int = 384, stages=(2,)):
    """The attention kernels over cache rows per step (bs), warps and pipeline stages, at each batch in `batches`
    with a cache of `cache` rows (positions about half of it, as a rollout's mean); the GB/s column is the cache
    rows read (positions x (C + R) values) over the GPU time."""
    bf = jnp.bfloat16
    C, Rr, N, D, Q, S = (cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.num_attention_heads, cfg.hidden_size,
                         cfg.q_lora_rank, cache)
    arr = lambda *s, d=bf: jnp.asarray(rng.normal(size=s), jnp.float32).astype(d)  # noqa: E731
    for B in (batches or ((64,) if pre else (1, 64))):
        kvs = [arr(B, S, C + Rr) for _ in range(4)]
        if pre:
            x, zu, qu = arr(R, B, D), arr(R, B, Q + C + 2 * Rr), arr(R, B, N, C + 2 * Rr)
            cs, kvn = arr(B, 2, Rr, d=jnp.float32), arr(C)
            lo = max(1, S // 2 - 50) if batches else max(1, min(200, S - 101))
            pos = jnp.asarray(rng.integers(lo, min(S - 1, lo + 100), B), jnp.int32)
            args = (x, zu, qu, kvs)
        else:
            q, row = arr(R, B, N, C + Rr), arr(R, B, C + Rr)
            pos = jnp.full((B,), min(256, S - 1), jnp.int32)
            w_uv, wo = jnp.zeros((N, 64, C + Rr), bf), jnp.zeros((D, N, 64), bf)
            mask = jnp.arange(S)[None, None] <= pos[:, None, None]
            args = (q, row, kvs)

            def xla(q, row, kvs):
                out = []
                for r in range(R):
                    kv = DF.write_rows(kvs[r % 4], pos[:, None], row[r][:, None])
                    out.append(DF.absorbed_attention(q[r][:, None], kv, mask, w_uv, wo, cfg.softmax_scale))
                return out

            show(f"attention xla B={B} (+w_uv, wo)", gpu_time(jax.jit(xla), *args))
        read = float(jnp.sum(pos)) * (C + Rr) * 2  # bytes of cache rows a call reads
        for bs in (32, 64, 128):
            for nw in ((2, 4, 8) if pre else (4, 8)):
                for ns in stages:
                    with tuned(KN.TUNING, attention={"bs": bs, "num_warps": nw, "num_stages": ns}):
                        if pre:
                            f = jax.jit(lambda x, zu, qu, kvs: [KN.latent_attention_pre(
                                x[r], zu[r], qu[r], cs, kvn, kvs[r % 4], pos, cfg, "gpu")[0] for r in range(R)])
                        else:
                            f = jax.jit(lambda q, row, kvs: [KN.latent_attention(
                                q[r], row[r], kvs[r % 4], pos, cfg, "gpu")[0] for r in range(R)])
                        label = f"{'attn_pre' if pre else 'attention'} pallas B={B} bs={bs} w={nw} st={ns}"
                        try:
                            res = gpu_time(f, *args)
                        except Exception as e:  # e.g. a tile past the shared memory
                            print(f"{label:48s} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
                            continue
                        show(label, res, f"{read / res[0] / 1e3:7.0f} GB/s ")


def kernels(a):
    cfg = bench_cfg()
    rng = np.random.default_rng(0)
    only = set(a.only.split(",")) if a.only else {"experts", "route", "attention", "attn_pre"}
    if "experts" in only:
        tune_experts(cfg, rng)
    if "route" in only:
        tune_route(cfg, rng)
    stages = tuple(int(v) for v in a.stages.split(","))
    if "attention" in only:
        tune_attention(cfg, rng, False, a.attn_batch, a.cache, stages)
    if "attn_pre" in only:
        tune_attention(cfg, rng, True, a.attn_batch, a.cache, stages)


# --------------------------------------------------------------------------------------------- grouped experts


def grouped(a):
    cfg = bench_cfg()
    E, S, K, D, I = (cfg.n_routed_experts, cfg.n_shared_experts, cfg.num_experts_per_tok, cfg.hidden_size,
                     cfg.moe_intermediate_size)
    X, A = E + S, K + S
    bf = jnp.bfloat16
    reps = 10
    t = lambda bn, bk, w, s, rf=False: {"bn": bn, "bk": bk, "num_warps": w, "num_stages": s,  # noqa: E731
                                        "rows_fastest": rf}
    rows = []
    for T in a.tokens:
        rng = np.random.default_rng(T)
        x = jnp.asarray(rng.normal(size=(T, D)), bf)
        routed = rng.random((T, E)).argsort(1)[:, :K]
        idx = jnp.asarray(np.concatenate([routed, np.broadcast_to(np.arange(E, X), (T, S))], 1), jnp.int32)
        w = jnp.asarray(np.concatenate([rng.random((T, K)) * 0.5, np.ones((T, S))], 1), jnp.float32)
        w_gu = jnp.asarray(rng.normal(size=(X, 2 * I, D)) / np.sqrt(D), bf)  # the fused layouts
        w_down = jnp.asarray(rng.normal(size=(X, D, I)) / np.sqrt(I), bf)
        w_down_flat = jnp.swapaxes(w_down, 0, 1).reshape(D, X * I)  # column e*I + i
        native = (jnp.swapaxes(w_gu[:, :I], 1, 2), jnp.swapaxes(w_gu[:, I:], 1, 2), jnp.swapaxes(w_down, 1, 2))
        bm = KG.block_rows(T * A, X)
        useful = T * A * 3 * 2 * D * I  # flops without the padding rows
        print(f"T={T}: bm={bm}, blocks <= {KG.n_blocks_bound(T * A, X, bm)}", flush=True)

        def add(label, fn, *args, whole=True, err=""):
            us = gpu_time(fn, *args, calls=1, reps=reps)[0]
            tf = useful / us / 1e6 if whole else None
            rows.append((T, label, us / 1e3, tf, err))
            print(f"  {label:40s} {us / 1e3:8.3f} ms GPU{f' {tf:7.1f} TFLOP/s' if tf else ''} {err}", flush=True)

        def grouped_fn(flat: bool, bm=None):  # a fresh function: TUNING is read while tracing
            return jax.jit(functools.partial(KG.experts_grouped, mode="gpu", flat=flat, bm=bm))

        ref = grouped_fn(False)(x, w, idx, w_gu, w_down)
        for flat, wd in ((False, w_down), (True, w_down_flat)):
            f = grouped_fn(flat)
            add(f"grouped {'flat' if flat else 'gathered'} (default)", f, x, w, idx, w_gu, wd,
                err=f"diff {max_err(f(x, w, idx, w_gu, wd), ref):.1e}")
        token_R, block_e_N, n_blocks, _ = jax.jit(functools.partial(KG.dispatch, distinct=True, pad_token=0),
                                                  static_argnums=(1, 2))(idx, X, bm)
        xs = jnp.take(x, token_R, axis=0)  # padding rows read token 0, as experts_grouped's
        sw = jax.jit(functools.partial(KG.grouped_swiglu, mode="gpu", bm=bm))
        add("  kernel swiglu", sw, xs, block_e_N, n_blocks, w_gu, whole=False)
        dn = jax.jit(functools.partial(KG.grouped_down, mode="gpu", bm=bm, flat=False))
        add("  kernel down (gathered)", dn, sw(xs, block_e_N, n_blocks, w_gu), block_e_N, n_blocks, w_down,
            whole=False)
        for method in ("count", "sort"):
            disp = jax.jit(lambda idx, x, m=method: jnp.take(
                x, KG.dispatch(idx, X, bm, m, distinct=True, pad_token=0)[0], axis=0))
            add(f"  dispatch ({method}) + row gather", disp, idx, x, whole=False)
        for block in sorted({128, bm}):
            f = jax.jit(functools.partial(routed_experts_blocked, block=block))
            add(f"xla routed_experts_blocked b={block}", f, x, w, idx, *native,
                err=f"diff {max_err(f(x, w, idx, *native), ref):.1e}")
        if 256 < T <= 2048:  # decode steps of many rows (GRPO's 512): larger blocks than block_rows' (bm, tiles)
            sweep = [("bm32", 32, None, None), ("bm128", 128, None, None)]
            sweep += [(f"bm64 sw bn{bn} bk{bk} w{w} s{s}", 64, t(bn, bk, w, s), None)
                      for bn, bk, w, s in ((32, 64, 4, 4), (32, 128, 4, 4), (64, 64, 4, 5), (64, 64, 8, 4),
                                           (64, 128, 4, 3), (64, 128, 4, 4), (64, 128, 8, 4), (64, 256, 4, 3),
                                           (64, 256, 8, 3), (128, 64, 8, 3), (128, 64, 8, 4), (32, 256, 4, 3))]
            sweep += [(f"bm64 dn bn{bn} bk{bk} w{w} s{s}", 64, None, t(bn, bk, w, s))
                      for bn, bk, w, s in ((64, 64, 4, 4), (64, 128, 4, 4), (128, 128, 8, 3), (128, 128, 4, 4),
                                           (64, 256, 4, 3), (256, 64, 8, 3), (32, 128, 4, 4), (128, 64, 8, 5))]
        elif T <= 512:
            sweep = [("sw bn64", None, t(64, 64, 4, 4), None), ("sw bn256 w8", None, t(256, 64, 8, 3), None),
                     ("sw bk128 s3", None, t(128, 128, 4, 3), None), ("sw w8 s5", None, t(128, 64, 8, 5), None),
                     ("dn bn64", None, None, t(64, 64, 4, 4)), ("dn bn256 w8", None, None, t(256, 64, 8, 3)),
                     ("dn bk128", None, None, t(128, 128, 4, 3)), ("bm32", 32, None, None)]
        else:
            sweep = [("sw bn128 w8", None, t(128, 64, 8, 3), None), ("sw bn64 w4 s4", None, t(64, 64, 4, 4), None),
                     ("sw bk32 s4", None, t(64, 32, 8, 4), None), ("sw rows_fastest", None, t(64, 64, 8, 3, True), None),
                     ("dn bn64 w4", None, None, t(64, 64, 4, 3)), ("dn bn256 w8", None, None, t(256, 64, 8, 3)),
                     ("dn s4", None, None, t(128, 64, 8, 4)), ("bm64", 64, None, None)]
        for label, bm_s, sw_t, dn_t in sweep:  # one entry for every bm
            entries = {k: {16: v} for k, v in (("swiglu", sw_t), ("down", dn_t)) if v is not None}
            with tuned(KG.TUNING, **entries):
                try:
                    f = grouped_fn(False, bm_s)
                    add(f"sweep {label}", f, x, w, idx, w_gu, w_down,
                        err=f"diff {max_err(f(x, w, idx, w_gu, w_down), ref):.1e}")
                except Exception as e:  # noqa: BLE001  a setting Triton rejects (e.g. out of shared memory)
                    print(f"  sweep {label}: failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}", flush=True)
    print(f"\n{'T':>5s}  {'what':40s} {'ms GPU':>8s} {'TFLOP/s':>8s}  diff from the default tiles")
    for T, label, ms, tf, err in rows:
        print(f"{T:5d}  {label:40s} {ms:8.3f} {f'{tf:8.1f}' if tf else '':>8s}  {err}")
    print(f"(GPU time per call over {reps} calls, dispatch excluded; TFLOP/s: useful flops, T*{A} assignments x 3 "
          "matmuls, no padding)")


# ------------------------------------------------------------------------------------- all-experts layouts


def layouts(a, T=64, L=11):
    cfg = bench_cfg()
    X, I, D = cfg.n_routed_experts + cfg.n_shared_experts, cfg.moe_intermediate_size, cfg.hidden_size
    dt = jnp.bfloat16
    keys = jax.random.split(jax.random.key(1), 2 * L + 2)
    gu_nt = [jax.random.normal(keys[2 * i], (X * 2 * I, D), dt) * 0.03 for i in range(L)]
    dn_nt = [jax.random.normal(keys[2 * i + 1], (D, X * I), dt) * 0.03 for i in range(L)]
    x = jax.random.normal(keys[-2], (T, D), dt)
    comb = jax.nn.softmax(jax.random.normal(keys[-1], (T, X), jnp.float32), -1)
    wbytes = (X * 2 * I * D + X * I * D) * 2

    def chain(layer):
        def f(x, comb, gus, dns):
            for gu, dn in zip(gus, dns):
                x = (x + layer(x, comb, gu, dn)).astype(dt)
            return x
        return jax.jit(f)

    def gu_part(x, comb, gu, nn):
        g = jnp.einsum("td,dk->tk", x, gu) if nn else jnp.einsum("td,kd->tk", x, gu)
        h = (DF._swiglu(g.reshape(T, X, -1)).astype(jnp.float32) * comb[..., None]).astype(dt)
        return h.reshape(T, -1)

    variants = {
        "gu_nt+down_nt (experts_all_flat)": (DF.experts_all_flat, False, False),
        "gu_nt+down_nn": (lambda x, c, gu, dn: jnp.einsum("tk,kd->td", gu_part(x, c, gu, False), dn), False, True),
        "gu_nn+down_nt": (lambda x, c, gu, dn: jnp.einsum("tk,dk->td", gu_part(x, c, gu, True), dn), True, False),
        "gu_nn+down_nn": (lambda x, c, gu, dn: jnp.einsum("tk,kd->td", gu_part(x, c, gu, True), dn), True, True),
    }
    for name, (layer, gu_t, dn_t) in variants.items():
        gus = [jnp.asarray(w.T) if gu_t else w for w in gu_nt]
        dns = [jnp.asarray(w.T) if dn_t else w for w in dn_nt]
        us, _, _ = gpu_time(chain(layer), x, comb, gus, dns, calls=L, reps=5)
        print(json.dumps({"what": "all-experts matmuls", "variant": name, "tokens": T, "us_per_layer": round(us, 2),
                          "tb_s_weights": round(wbytes / us / 1e6, 3)}), flush=True)
        del gus, dns


# ---------------------------------------------------------------------------------------------------- A / B


def parse_variant(variant: str) -> tuple:
    """The `SamplingConfig.kernel_tuning` of "kernel.key=value,..." (values Python literals), checked by
    `kernels.tuning`."""
    table = tuple(filter(None, variant.split(",")))
    try:
        KN.tuning(table)
    except ValueError as e:
        raise SystemExit(f"tune.py ab: {e}") from None
    return table


def ab(a):
    from deepjax import model as M
    from sampling_bench import time_generate  # bench/ is on sys.path when this script runs

    cfg = bench_cfg()
    graphdef, params = M.init(cfg, jax.random.key(0))
    tables = {v: parse_variant(v) for v in a.variants}  # all checked before the first run
    res = {v: [] for v in a.variants}
    for r in range(a.rounds):
        for v in a.variants:
            t = time_generate(graphdef, params, cfg, a.batch, a.prompt, a.new, a.reps, kernel_tuning=tables[v])
            res[v].append((t["tokens_per_s"], t["decode_tokens_per_s"], t["prefill_s"]))
            print(json.dumps({"round": r, "variant": v, **{k: t[k] for k in ("tokens_per_s", "decode_tokens_per_s",
                                                                            "prefill_s")}}), flush=True)
    print(f"\nbatch {a.batch}, {jax.devices()[0].device_kind}: median over {a.rounds} rounds")
    for v, rs in res.items():
        print(f"{v or '(defaults)':>40}: {statistics.median(x[0] for x in rs):>9,.0f} tok/s, decode "
              f"{statistics.median(x[1] for x in rs):>9,.0f}, prefill call {1e3 * statistics.median(x[2] for x in rs):.1f} ms")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("kernels", help="Pallas decode kernels vs XLA, block-size sweeps")
    p.add_argument("--only", default="", help="comma list of experts, route, attention, attn_pre (default: all)")
    p.add_argument("--attn-batch", type=int, nargs="+", help="attention / attn_pre batches (default: 1 and 64 / 64)")
    p.add_argument("--cache", type=int, default=384, help="attention cache rows (positions about half of them with "
                   "--attn-batch, 200-300 without)")
    p.add_argument("--stages", default="2", help="attention num_stages values, a comma list")
    p = sub.add_parser("grouped", help="grouped prefill experts vs XLA's block-sorted path, tile sweep")
    p.add_argument("tokens", type=int, nargs="*", default=[128, 8192], help="token counts T")
    sub.add_parser("layouts", help="batch-64 all-experts matmuls in each weight orientation")
    p = sub.add_parser("ab", help="end-to-end A/B of kernels.TUNING settings")
    p.add_argument("variants", nargs="+", help='e.g. route.logits=1 "route.num_warps=4,route.bd=256" ""')
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--reps", type=int, default=2)
    a = ap.parse_args(argv)
    print(jax.devices()[0].device_kind, jax.__version__, flush=True)
    {"kernels": kernels, "grouped": grouped, "layouts": layouts, "ab": ab}[a.what](a)


if __name__ == "__main__":
    main()

"""Times the Pallas decode kernels (`deepjax.kernels`) against the XLA code they replace, bench preset shapes, on
the GPU: each function runs R times on fresh inputs inside one jitted call (the experts on different experts each
time, so their weights are not in L2), under the profiler; prints GPU time per call, by kernel.

    PYTHONPATH=. python bench/kernels_tune.py
"""
import collections
import dataclasses
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from deepjax import decode_fused as DF
from deepjax import kernels as KN
from deepjax import presets
from profile_decode import load_trace  # bench/ is on sys.path when this script runs

R = 16


def gpu_time(fn, *args):
    """(GPU us per call summed over kernels, us per call over the span, {kernel: us per call})."""
    jax.block_until_ready(fn(*args))
    out = tempfile.mkdtemp()
    with jax.profiler.trace(out, create_perfetto_trace=True):
        jax.block_until_ready(fn(*args))
    ev, _, pids = load_trace(out)
    k = [e for e in ev if e.get("ph") == "X" and e.get("pid") in pids and not e["name"].startswith("Memcpy")]
    by = collections.Counter()
    for e in k:
        by[e["name"][:40]] += e.get("dur", 0) / R
    span = (max(e["ts"] + e.get("dur", 0) for e in k) - min(e["ts"] for e in k)) / R
    return sum(by.values()), span, by


def show(label, res):
    tot, span, by = res
    top = ", ".join(f"{n} {v:.1f}" for n, v in by.most_common(4))
    print(f"{label:44s} {tot:7.1f} us GPU {span:7.1f} us span | {top}", flush=True)


def main(only=None):
    cfg = dataclasses.replace(presets.bench(), dtype="bfloat16", param_dtype="bfloat16")
    print(jax.devices()[0].device_kind, jax.__version__)
    bf = jnp.bfloat16
    rng = np.random.default_rng(0)
    E, S_, K = cfg.n_routed_experts, cfg.n_shared_experts, cfg.num_experts_per_tok
    D, I = cfg.hidden_size, cfg.moe_intermediate_size
    X = K + S_
    key = jax.random.key(0)
    w_gu = (jax.random.normal(key, (E + S_, 2 * I, D), jnp.float32) * 0.02).astype(bf)
    w_down = (jax.random.normal(key, (E + S_, D, I), jnp.float32) * 0.02).astype(bf)
    xs = jnp.asarray(rng.normal(size=(R, 1, D)), bf)
    idxs = jnp.asarray(np.stack([np.concatenate([rng.choice(E, K, replace=False), [E, E + 1]])
                                 for _ in range(R)])[:, None], jnp.int32)
    ws = jnp.asarray(rng.random((R, 1, X)), jnp.float32)

    def experts_pallas():  # a fresh function per setting: jax.jit caches traces per function
        return lambda xs, idxs, ws: [KN.experts_gathered(xs[r], xs[r], idxs[r], ws[r], w_gu, w_down, "gpu")
                                     for r in range(R)]

    def experts_xla(xs, idxs, ws):
        return [xs[r] + DF.experts_gathered(xs[r], ws[r], idxs[r], w_gu, w_down) for r in range(R)]

    ref = jax.jit(experts_xla)(xs, idxs, ws)[0]
    show("experts xla (T=1)", gpu_time(jax.jit(experts_xla), xs, idxs, ws))
    tuning = {k: dict(v) for k, v in KN.TUNING.items()}
    for bi, nw, down in ((16, 4, {"bo": 8, "num_warps": 4, "split": False}),
                         (32, 4, {"bo": 32, "num_warps": 4, "split": True}),
                         (8, 8, {"bo": 16, "num_warps": 8, "split": True}),
                         (16, 8, {"bo": 64, "num_warps": 8, "split": True}),
                         (4, 4, {"bo": 4, "num_warps": 4, "split": False})):
        KN.TUNING["gate_up"], KN.TUNING["down"] = {"bi": bi, "num_warps": nw}, down
        f = jax.jit(experts_pallas())
        err = float(jnp.abs(f(xs, idxs, ws)[0].astype(jnp.float32) - ref.astype(jnp.float32)).max())
        show(f"experts gate_up bi={bi} w={nw} down {down['bo']},{down['num_warps']},"
             f"{'split' if down['split'] else 'loop'} err {err:.0e}", gpu_time(f, xs, idxs, ws))

    KN.TUNING.update(tuning)
    if only == "experts":
        return
    for T in (1, 64):
        lg = jnp.asarray(rng.normal(size=(R, T, E)), jnp.float32)
        bias = jnp.asarray(rng.normal(size=E) * 0.01, jnp.float32)
        show(f"route xla T={T}", gpu_time(jax.jit(lambda lg: [DF.route_by_rank(lg[r], bias, cfg) for r in range(R)]), lg))
        for nw in (1, 2, 4):
            KN.TUNING["route"] = {"num_warps": nw}
            show(f"route pallas T={T} w={nw}",
                 gpu_time(jax.jit(lambda lg: [KN.route(lg[r], bias, cfg, "gpu") for r in range(R)]), lg))

    C, Rr, N, S = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.num_attention_heads, 384
    for B in (1, 64):
        q = jnp.asarray(rng.normal(size=(R, B, N, C + Rr)), bf)
        row = jnp.asarray(rng.normal(size=(R, B, C + Rr)), bf)
        kvs = [jnp.asarray(rng.normal(size=(B, S, C + Rr)), bf) for _ in range(4)]
        pos = jnp.full((B,), 256, jnp.int32)
        w_uv = jnp.zeros((N, 64, C + Rr), bf)
        wo = jnp.zeros((D, N, 64), bf)
        mask = (jnp.arange(S)[None, None] <= pos[:, None, None])

        def att_xla(q, row, kvs):
            out = []
            for r in range(R):
                kv = DF.write_rows(kvs[r % 4], pos[:, None], row[r][:, None])
                out.append(DF.absorbed_attention(q[r][:, None], kv, mask, w_uv, wo, cfg.softmax_scale))
            return out

        show(f"attention xla B={B} (+w_uv, wo)", gpu_time(jax.jit(att_xla), q, row, kvs))
        for bs in (32, 64, 128):
            for nw in (4, 8):
                KN.TUNING["attention"] = {"bs": bs, "num_warps": nw}
                f = jax.jit(lambda q, row, kvs: [KN.latent_attention(q[r], row[r], kvs[r % 4], pos, cfg, "gpu")[0]
                                                 for r in range(R)])
                show(f"attention pallas B={B} bs={bs} w={nw}", gpu_time(f, q, row, kvs))


if __name__ == "__main__":
    import sys
    main("experts" if "--experts" in sys.argv else None)

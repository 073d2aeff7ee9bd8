"""Sweeps the route and latent_attention_pre kernels' settings at batch 64 (bench preset, bf16) on the GPU:

    PYTHONPATH=. python bench/tune64.py
"""
import dataclasses
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, "bench")
from kernels_tune import R, gpu_time  # noqa: E402
from deepjax import kernels as KN, presets  # noqa: E402

cfg = dataclasses.replace(presets.bench(), dtype="bfloat16", param_dtype="bfloat16")
B, D, N, Q, C, Rr, S, E = 64, 1024, 16, 384, 256, 32, 384, 64
dt = jnp.bfloat16
rng = np.random.default_rng(0)
arr = lambda *s, d=dt: jnp.asarray(rng.normal(size=s), jnp.float32).astype(d)  # noqa: E731
logits = arr(R, B, E, d=jnp.float32)
bias = arr(E, d=jnp.float32) * 0.1
default = dict(KN.TUNING["route"])
for nw in (1, 2, 4, 8):
    KN.TUNING["route"]["num_warps"] = nw
    f = jax.jit(lambda lg: [KN.route(lg[r], bias, cfg, "gpu") for r in range(R)])
    _, _, by = gpu_time(f, logits)
    print(json.dumps({"kernel": "route", "num_warps": nw, "us": {k: round(v, 2) for k, v in by.items()}}), flush=True)
KN.TUNING["route"].update(default)
x, zu, qu = arr(R, B, D), arr(R, B, Q + C + 2 * Rr), arr(R, B, N, C + 2 * Rr)
cs, kvn, kv = arr(B, 2, Rr, d=jnp.float32), arr(C), arr(B, S, C + Rr)
pos = jnp.asarray(rng.integers(200, 300, B), jnp.int32)
for nw in (2, 4, 8):
    for bs in (32, 64, 128):
        KN.TUNING["attention"].update(num_warps=nw, bs=bs)
        f = jax.jit(lambda x, zu, qu, kv: [KN.latent_attention_pre(x[r], zu[r], qu[r], cs, kvn, kv, pos, cfg, "gpu")[0]
                                           for r in range(R)])
        _, _, by = gpu_time(f, x, zu, qu, kv)
        print(json.dumps({"kernel": "latent_attention_pre", "num_warps": nw, "bs": bs,
                          "us": {k: round(v, 2) for k, v in by.items()}}), flush=True)

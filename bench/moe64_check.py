"""Batch-64 decode pieces on the GPU, timed in isolation (bench preset shapes, bf16):

    PYTHONPATH=. python bench/moe64_check.py bandwidth   # copy bandwidth: the sampling_bench way and variants
    PYTHONPATH=. python bench/moe64_check.py experts     # all-experts matmuls in each weight layout

experts: 11 layers' worth of distinct weights in one jitted chain (x -> layer -> x), so XLA can neither merge the
layers' matmuls nor skip one; per layer = call time / 11. Layouts of experts_all_flat's two matmuls:
gate/up [X*2I, D] ("nt", contracted axis last) or [D, X*2I] ("nn"); down [D, X*I] ("nt") or [X*I, D] ("nn").
"""
import json
import sys
import time

import jax
import jax.numpy as jnp

from deepjax import decode_fused as DF
from sampling_bench import copy_bandwidth  # bench/ is on sys.path when this script runs


def timeit(f, *args, reps=20):
    jax.block_until_ready(f(*args))
    jax.block_until_ready(f(*args))
    t = time.perf_counter()
    for _ in range(reps):
        out = f(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / reps


def bandwidth():
    x = jax.random.normal(jax.random.key(0), (1024, 1024, 512), jnp.float32)  # 2 GiB
    nb = x.nbytes
    cp = jax.jit(lambda x: x * 1.0001)
    print(json.dumps({"what": "copy_as_sampling_bench", "tb_s": 2 * nb / timeit(cp, x, reps=10) / 1e12}), flush=True)
    print(json.dumps({"what": "copy_50_reps", "tb_s": 2 * nb / timeit(cp, x, reps=50) / 1e12}), flush=True)
    del x
    print(json.dumps({"what": "copy_donated (sampling_bench now)", "tb_s": copy_bandwidth() / 1e12}), flush=True)
    # a loop inside one call: no per-call dispatch or allocation
    loop = jax.jit(lambda x: jax.lax.fori_loop(0, 20, lambda i, v: v * 1.0001, x), donate_argnums=0)
    y = loop(jax.random.normal(jax.random.key(0), (1024, 1024, 512), jnp.float32))
    jax.block_until_ready(y)
    t = time.perf_counter()
    y = jax.block_until_ready(loop(y))
    print(json.dumps({"what": "copy_in_loop", "tb_s": 2 * nb * 20 / (time.perf_counter() - t) / 1e12}), flush=True)


def experts(T=64, L=11, X=66, I=512, D=1024):
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

    def nt_nt(x, comb, gu, dn):
        return DF.experts_all_flat(x, comb, gu, dn)

    def gu_part(x, comb, gu, nn):
        g = jnp.einsum("td,dk->tk", x, gu) if nn else jnp.einsum("td,kd->tk", x, gu)
        h = (DF._swiglu(g.reshape(T, X, -1)).astype(jnp.float32) * comb[..., None]).astype(dt)
        return h.reshape(T, -1)

    variants = {
        "gu_nt+down_nt (current)": (nt_nt, gu_nt, dn_nt),
        "gu_nt+down_nn": (lambda x, c, gu, dn: jnp.einsum("tk,kd->td", gu_part(x, c, gu, False), dn), gu_nt,
                          [w.T for w in dn_nt]),
        "gu_nn+down_nt": (lambda x, c, gu, dn: jnp.einsum("tk,dk->td", gu_part(x, c, gu, True), dn),
                          [w.T for w in gu_nt], dn_nt),
        "gu_nn+down_nn": (lambda x, c, gu, dn: jnp.einsum("tk,kd->td", gu_part(x, c, gu, True), dn),
                          [w.T for w in gu_nt], [w.T for w in dn_nt]),
        "gu_nt only": (lambda x, c, gu, dn: gu_part(x, c, gu, False)[:, :D], gu_nt, dn_nt),
        "gu_nn only": (lambda x, c, gu, dn: gu_part(x, c, gu, True)[:, :D], [w.T for w in gu_nt], dn_nt),
    }
    for name, (layer, gus, dns) in variants.items():
        gus = [jnp.asarray(w) for w in gus]
        dns = [jnp.asarray(w) for w in dns]
        jax.block_until_ready((gus, dns))
        s = timeit(chain(layer), x, comb, gus, dns)
        print(json.dumps({"what": "experts_all_flat", "variant": name, "us_per_layer": 1e6 * s / L,
                          "tb_s_all_weights": wbytes * L / s / 1e12}), flush=True)
        del gus, dns


if __name__ == "__main__":
    print(json.dumps({"device": jax.devices()[0].device_kind, "jax": jax.__version__}), flush=True)
    for what in sys.argv[1:] or ["bandwidth", "experts"]:
        {"bandwidth": bandwidth, "experts": experts}[what]()

"""Expert parallelism on real GPUs: the ragged_all_to_all dispatch (what GPUs and TPUs run; XLA:CPU lacks
the collective) against the dense reference MoE and against the padded all_to_all, and the whole tiny model
sharded over every GPU against one GPU. Needs >= 2 GPUs.

    PYTHONPATH=. python bench/ep_gpu_check.py          # e.g. on a 2 x H200 host

Prints one JSON line per check; exits non-zero if any check fails.
"""

import json
import sys

import jax
import jax.numpy as jnp

from deepjax import model as M
from deepjax import presets
from deepjax import sharding as S
from deepjax.expert_parallel import ShardedExperts
from deepjax.moe import routed_experts_dense


def rel(a, b):
    return float(jnp.abs(a - b).max() / (jnp.abs(b).max() + 1e-30))


def main():
    n = len(jax.devices())
    print(json.dumps({"jax": jax.__version__, "devices": [str(d) for d in jax.devices()]}), flush=True)
    if n < 2:
        print("needs >= 2 devices", file=sys.stderr)
        return 2
    ok = True
    mcfg = S.MeshConfig(fsdp=1, expert=n)
    mesh, rules = S.make_mesh(mcfg), S.rules_for(mcfg.rules)
    T, D, I, E, K = 256 * n, 64, 32, 8 * n, 4
    ks = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(ks[0], (T, D))
    idx = jax.lax.top_k(jax.random.normal(ks[1], (T, E)), K)[1].astype(jnp.int32)
    idx = jnp.where(jnp.arange(T)[:, None] % 3 != 0, jnp.arange(K)[None], idx).astype(jnp.int32)  # skewed
    w = jax.random.uniform(ks[2], (T, K))
    wg, wu = (jax.random.normal(k, (E, D, I)) * 0.2 for k in ks[3:5])
    wd = jax.random.normal(ks[5], (E, I, D)) * 0.2
    args = (x, w, idx, wg, wu, wd)
    with jax.default_matmul_precision("highest"):
        ref = routed_experts_dense(*args)
        for cf in (None, 1.0):
            out = {}
            for ex in ("ragged", "padded"):
                fn = ShardedExperts(mesh, rules, capacity_factor=cf, exchange=ex)
                y, dropped = jax.jit(fn)(*args)
                g = jax.jit(jax.grad(lambda x, wg: jnp.sum(fn(x, w, idx, wg, wu, wd)[0] ** 2), argnums=(0, 1)))(x, wg)
                out[ex] = (y, int(dropped), g)
            r = {"check": "experts", "capacity_factor": cf, "dropped": out["ragged"][1],
                 "ragged_vs_padded": rel(out["ragged"][0], out["padded"][0]),
                 "grad_ragged_vs_padded": max(rel(a, b) for a, b in zip(out["ragged"][2], out["padded"][2]))}
            if cf is None:
                r["ragged_vs_dense"] = rel(out["ragged"][0], ref)
                good = r["ragged_vs_dense"] < 1e-5 and r["dropped"] == 0
            else:
                good = r["dropped"] == out["padded"][1] and r["dropped"] > 0
            good = good and r["ragged_vs_padded"] < 1e-5 and r["grad_ragged_vs_padded"] < 1e-5
            r["ok"] = good
            ok &= good
            print(json.dumps(r), flush=True)

        cfg = presets.tiny()
        graphdef, params = M.init(cfg, jax.random.key(0))
        tokens = jax.random.randint(jax.random.key(1), (2 * n, 32), 0, cfg.vocab_size)

        def loss(p, g, t, ctx=None):
            out = M.forward(g, p, t)
            return jnp.mean(out.logits ** 2) + out.balance_loss.sum(), out.expert_load

        single = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=(1, 3))
        (l1, load1), g1 = single(params, graphdef, tokens, None)
        sh = S.param_shardings(params, mesh, rules)
        with S.use_mesh(mesh, rules):
            (l2, load2), g2 = single(jax.device_put(params, sh), graphdef,
                                     jax.device_put(tokens, S.batch_spec(mesh, rules)), S.context_key())
        r = {"check": "model", "mesh": dict(mesh.shape), "loss_rel": rel(l2, l1),
             "load_equal": bool(jnp.all(load1 == load2)),
             "grad_rel": max(rel(a, b) for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(g1)))}
        r["ok"] = r["loss_rel"] < 1e-5 and r["load_equal"] and r["grad_rel"] < 1e-4
        ok &= r["ok"]
        print(json.dumps(r), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

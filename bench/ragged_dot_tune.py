"""tokamax's Mosaic GPU ragged dot on the training step's expert shapes: GPU time per call over a small sweep of
kernel configs, against tokamax's heuristic default (the config the step runs with: the shipped autotuning cache
has none of these shapes).

    JAX_PLATFORMS=cuda PYTHONPATH=. python bench/ragged_dot_tune.py                 # bench preset, B 8 x T 2048
    JAX_PLATFORMS=cuda PYTHONPATH=. python bench/ragged_dot_tune.py --rows 98304 --quick
    JAX_PLATFORMS=cuda PYTHONPATH=. python bench/ragged_dot_tune.py --rows-kernels --quick   # tokamax vs Triton

Shapes (M = B T K rows sorted by expert, G experts, bf16): the gate/up product x [M, D] w [G, D, 2I] (its input
gradient has the same shape), the down product h [M, I] w [G, I, D], and its input gradient dy [M, D] w [G, D, I].
Group sizes: a multinomial draw over the experts (balanced on average, as aux-loss-free balancing keeps them).
Each config: compiled, 3 warmup calls, then --reps calls on alternating inputs timed together; one JSON line each
with microseconds per call, TFLOP/s and the largest difference from the default's output. Ends with the fastest
config per shape. tokamax's full autotuner (`train_bench --autotune`) searches ~380 configs per shape; this tries
the axes that matter for large M (block_m, block_k, stages, persistence).

--rows-kernels times the expert products (gate/up w [G, D, 2I], down [G, I, D]; gate and up as a pair of [G, D, I]
weights, which tokamax's path concatenates each step) and their input gradients (dx = dy w[g]^T, w as stored) two
ways: tokamax's kernel with the step's tile (the gradient against the weights
transposed, the transpose included: `ops.GMM_INPUT_GRAD` "tokamax") and gmm_grad's Triton row kernels
(`grouped_matmul`, `grouped_dx`) over a sweep of their tiles (ROW_TILES), each checked against tokamax.
"""
from __future__ import annotations

import argparse
import itertools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np


def _ops():
    from tokamax._src.ops.ragged_dot import pallas_mosaic_gpu as mg, pallas_mosaic_gpu_common as common
    return mg, common


def configs(quick: bool):
    mg, common = _ops()
    ms, ks, stages, persist = ([128, 64], [128, 256], [4, 2], [True, False]) if not quick else (
        [128, 64], [128], [4, 2], [True])
    for bm, bk, st, p in itertools.product(ms, ks, stages, persist):
        yield dict(block_m=bm, block_k=bk, num_stages=st, persistent=p), mg.Config(
            block_m=bm, block_n=64, block_k=bk, num_stages=st, split_k=1, persistent=p,
            grid_minor_dim=common.MatmulDimension.M, grid_tile_width=1)


def timed(f, xs, w, sizes, reps: int) -> float:
    """Seconds per call of f over alternating inputs (so the second operand's rows are not cached)."""
    for i in range(3):
        jax.block_until_ready(f(xs[i % 2], w, sizes))
    t = time.perf_counter()
    for i in range(reps):
        y = f(xs[i % 2], w, sizes)
    jax.block_until_ready(y)
    return (time.perf_counter() - t) / reps


def row_tiles(quick: bool):
    axes = ([64, 128], [64, 128, 256], [32, 64], [4, 8], [3, 4]) if not quick else (
        [64, 128], [128, 256], [64], [8], [3, 4])
    for bm, bo, bc, warps, stages in itertools.product(*axes):
        yield dict(bm=bm, bo=bo, bc=bc, num_warps=warps, num_stages=stages)


def row_kernels(args):
    """The expert products and their input gradients: tokamax (ops' path; the gradient's weight transpose included)
    vs gmm_grad's Triton row kernels over ROW_TILES sweeps."""
    from deepjax.model import gmm_grad, ops
    M, G, D, I = args.rows, args.experts, args.hidden, args.inter
    rng = np.random.default_rng(0)
    sizes = jnp.asarray(rng.multinomial(M, np.full(G, 1.0 / G)), jnp.int32)
    best = {}
    cases = {  # name: (w [G, K, N], the activation's width, tokamax's call, the Triton kernel)
        "gate_up": ((D, 2 * I), D, lambda a, w, s: ops._tokamax_ragged_dot(a, w, s, True), gmm_grad.grouped_matmul),
        "down": ((I, D), I, lambda a, w, s: ops._tokamax_ragged_dot(a, w, s, True), gmm_grad.grouped_matmul),
        "gate_up dx": ((D, 2 * I), 2 * I, lambda a, w, s: ops._tokamax_ragged_dot(a, jnp.swapaxes(w, 1, 2), s, True),
                       gmm_grad.grouped_dx),
        "down dx": ((I, D), D, lambda a, w, s: ops._tokamax_ragged_dot(a, jnp.swapaxes(w, 1, 2), s, True),
                    gmm_grad.grouped_dx),
        # gate and up as a pair of [G, D, I] weights: the step's tokamax path concatenates them first (included)
        "gate_up pair": ((D, I), D, lambda a, w, s: ops._tokamax_ragged_dot(a, jnp.concatenate(w, -1), s, True),
                         lambda a, w, s: gmm_grad.grouped_matmul(a, w[0], s, w2_GKN=w[1])),
        "gate_up pair dx": ((D, I), 2 * I, lambda a, w, s: ops._tokamax_ragged_dot(
            a, jnp.swapaxes(jnp.concatenate(w, -1), 1, 2), s, True),
            lambda a, w, s: gmm_grad.grouped_dx(a, w[0], s, w2_GKN=w[1]))}
    for name, ((K, N), C, tk, triton) in cases.items():
        k1, k2, k3 = jax.random.split(jax.random.key(len(name)), 3)
        acts = [jax.random.normal(k, (M, C), jnp.bfloat16) for k in (k1, k2)]
        w = (jax.random.normal(k3, (G, K, N), jnp.float32) / np.sqrt(C)).astype(jnp.bfloat16)
        if "pair" in name:
            w = (w, w[::-1])
        flops = 2.0 * M * K * N * (2 if "pair" in name else 1)
        # a new function per tile: jit traces each again, under its ROW_TILES
        variants = [("tokamax", tk, None)] + [(json.dumps(t), lambda a, w, s, f=triton: f(a, w, s), t)
                                              for t in row_tiles(args.quick)]
        ref = None
        saved = dict(gmm_grad.ROW_TILES)
        for label, fn, tiles in variants:
            gmm_grad.ROW_TILES.update(tiles or {})
            rec = dict(shape=name, M=M, K=K, N=N, G=G, impl=label)
            try:
                f = jax.jit(fn)
                y = jax.block_until_ready(f(acts[0], w, sizes))
                if tiles is None:  # tokamax: the reference
                    ref = y
                if ref is not None:
                    rec["max_diff_vs_tokamax"] = float(jnp.max(jnp.abs(y.astype(jnp.float32) -
                                                                   ref.astype(jnp.float32))))
                dt = timed(f, acts, w, sizes, args.reps)
                rec.update(us=round(dt * 1e6, 1), tflops=round(flops / dt / 1e12, 1))
                if rec.get("max_diff_vs_tokamax", 1.0) < 0.05 and (name not in best or dt < best[name][1]):
                    best[name] = (label, dt)
            except Exception as e:  # noqa: BLE001
                rec["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            finally:
                gmm_grad.ROW_TILES.clear()
                gmm_grad.ROW_TILES.update(saved)
            print(json.dumps(rec), flush=True)
    for name, (label, dt) in best.items():
        print(f"fastest {name}: {label} {dt * 1e6:.1f} us")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8 * 2048 * 6, help="M: tokens x experts per token")
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=512, help="moe_intermediate_size I")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="4 configs per shape instead of 16")
    ap.add_argument("--rows-kernels", action="store_true", help="tokamax vs gmm_grad's Triton row kernels "
                    "(forward and input gradient)")
    args = ap.parse_args(argv)
    if args.rows_kernels:
        return row_kernels(args)
    import tokamax
    mg, _ = _ops()
    M, G, D, I = args.rows, args.experts, args.hidden, args.inter
    rng = np.random.default_rng(0)
    sizes = jnp.asarray(rng.multinomial(M, np.full(G, 1.0 / G)), jnp.int32)
    shapes = {"gate_up (and its dx)": (D, 2 * I), "down": (I, D), "down dx": (D, I)}
    best = {}
    for name, (K, N) in shapes.items():
        k1, k2, k3 = jax.random.split(jax.random.key(len(name)), 3)
        xs = [jax.random.normal(k, (M, K), jnp.bfloat16) for k in (k1, k2)]
        w = (jax.random.normal(k3, (G, K, N), jnp.float32) / np.sqrt(K)).astype(jnp.bfloat16)
        flops = 2.0 * M * K * N
        variants = [("default", "mosaic_gpu")] + [
            (json.dumps(c), (mg.PallasMosaicGpuRaggedDot(config=cfg),)) for c, cfg in configs(args.quick)]
        ref = None
        for label, impl in variants:
            f = jax.jit(lambda x, w, s, impl=impl: tokamax.ragged_dot(x, w, s, implementation=impl))
            rec = dict(shape=name, M=M, K=K, N=N, G=G, config=label)
            try:
                y = jax.block_until_ready(f(xs[0], w, sizes))
                if ref is None:
                    ref = y
                rec["max_diff_vs_default"] = float(jnp.max(jnp.abs(y.astype(jnp.float32) - ref.astype(jnp.float32))))
                dt = timed(f, xs, w, sizes, args.reps)
                rec.update(us=round(dt * 1e6, 1), tflops=round(flops / dt / 1e12, 1))
                if rec["max_diff_vs_default"] < 0.05 and (name not in best or dt < best[name][1]):
                    best[name] = (label, dt)
            except Exception as e:  # noqa: BLE001
                rec["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            print(json.dumps(rec), flush=True)
    for name, (label, dt) in best.items():
        print(f"fastest {name}: {label} {dt * 1e6:.1f} us")


if __name__ == "__main__":
    main()

"""The grouped-matmul expert kernels (`deepjax.kernels_grouped`, Triton) on the GPU: correctness against float32
XLA and time against the current prefill path (`moe.routed_experts_blocked`), bench preset shapes in bfloat16.

    PYTHONPATH=. python bench/grouped_check.py [T ...]        (default: 128 8192)

D = 1024, I = 512, 64 routed experts (6 per token, random) + 2 shared experts on every token (weight 1), so
X = 66 experts and A = 8 assignments per token. Per T:
  * error of `experts_grouped` (both w_down layouts) against `routed_experts_blocked` run in float32 with full-
    precision matmuls on the same (bf16-rounded) inputs: max |diff| / max |ref| and ||diff|| / ||ref||;
  * GPU time, median over 20 calls after warm-up (each call: jax.block_until_ready; includes ~10-30 us of dispatch):
    experts_grouped, its two kernels alone, and routed_experts_blocked in bf16 on the native layouts ([X, D, I]
    gate / up, [X, I, D] down, the shared experts as two more experts);
  * a sweep of TUNING settings (a fresh jitted function per setting: jax.jit caches traces per function object),
    each with its own error, so a tile-specific bug shows.
Prints a table at the end. About 2-3 minutes on an H100, most of it Triton and XLA compiles.
"""
from __future__ import annotations

import copy
import functools
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from deepjax import kernels_grouped as KG
from deepjax.moe import routed_experts_blocked

E, S, K, D, I = 64, 2, 6, 1024, 512
X, A = E + S, K + S
N_CALLS = 20


def median_ms(fn, *args) -> float:
    jax.block_until_ready(fn(*args))  # compile
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(N_CALLS):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def errors(got, ref) -> tuple[float, float]:
    d = np.asarray(got, np.float64) - ref
    return float(np.abs(d).max() / np.abs(ref).max()), float(np.linalg.norm(d) / np.linalg.norm(ref))


def make_inputs(T: int, seed: int = 0):
    """bf16 x [T, D], routing (idx [T, A], w [T, A]: 6 distinct routed experts then the 2 shared ones), native
    weights (gate, up [X, D, I], down [X, I, D]) and the fused ones (w_gu [X, 2I, D], w_down [X, D, I] and
    [D, X*I]), scaled so activations stay O(1)."""
    rng = np.random.default_rng(seed)
    bf = jnp.bfloat16
    x = jnp.asarray(rng.normal(size=(T, D)), bf)
    routed = rng.random((T, E)).argsort(1)[:, :K]
    idx = jnp.asarray(np.concatenate([routed, np.broadcast_to(np.arange(E, X), (T, S))], 1), jnp.int32)
    w = jnp.asarray(np.concatenate([rng.random((T, K)) * 0.5, np.ones((T, S))], 1), jnp.float32)
    key = jax.random.key(seed)
    k1, k2, k3 = jax.random.split(key, 3)
    gate = (jax.random.normal(k1, (X, D, I)) / np.sqrt(D)).astype(bf)
    up = (jax.random.normal(k2, (X, D, I)) / np.sqrt(D)).astype(bf)
    down = (jax.random.normal(k3, (X, I, D)) / np.sqrt(I)).astype(bf)
    w_gu = jnp.swapaxes(jnp.concatenate([gate, up], -1), 1, 2)  # [X, 2I, D]
    w_down_g = jnp.swapaxes(down, 1, 2)  # [X, D, I]
    w_down_f = jnp.moveaxis(down, 2, 0).reshape(D, X * I)  # [D, X*I]: column e*I + i
    return x, w, idx, (gate, up, down), (w_gu, w_down_g, w_down_f)


def reference(x, w, idx, native) -> np.ndarray:
    """routed_experts_blocked in float32 with full-precision matmuls (XLA:GPU's float32 default is tf32)."""
    f32 = [a.astype(jnp.float32) for a in (x, *native)]
    with jax.default_matmul_precision("highest"):
        out = jax.jit(routed_experts_blocked)(f32[0], w, idx, *f32[1:])
    return np.asarray(out, np.float64)


def grouped_fn(flat: bool, bm: int | None = None):
    return jax.jit(functools.partial(KG.experts_grouped, mode="gpu", flat=flat, bm=bm))


def sweeps(T: int) -> list[tuple[str, int | None, dict | None, dict | None]]:
    """(label, bm, swiglu tiles, down tiles): None keeps TUNING's entry."""
    t = lambda bn, bk, w, s, rf=False: {"bn": bn, "bk": bk, "num_warps": w, "num_stages": s,
                                        "rows_fastest": rf}
    if T <= 512:
        return [("sw bn64", None, t(64, 64, 4, 4), None), ("sw bn256 w8", None, t(256, 64, 8, 3), None),
                ("sw bk128 s3", None, t(128, 128, 4, 3), None), ("sw w8 s5", None, t(128, 64, 8, 5), None),
                ("dn bn64", None, None, t(64, 64, 4, 4)), ("dn bn256 w8", None, None, t(256, 64, 8, 3)),
                ("dn bk128", None, None, t(128, 128, 4, 3)), ("bm32", 32, None, None)]
    return [("sw bn128 w8", None, t(128, 64, 8, 3), None), ("sw bn64 w4 s4", None, t(64, 64, 4, 4), None),
            ("sw bk32 s4", None, t(64, 32, 8, 4), None), ("sw rows_fastest", None, t(64, 64, 8, 3, True), None),
            ("dn bn64 w4", None, None, t(64, 64, 4, 3)), ("dn bn256 w8", None, None, t(256, 64, 8, 3)),
            ("dn s4", None, None, t(128, 64, 8, 4)), ("bm64", 64, None, None)]


def run_T(T: int, rows: list):
    x, w, idx, native, (w_gu, w_down_g, w_down_f) = make_inputs(T)
    bm = KG.block_rows(T * A, X)
    t0 = time.perf_counter()
    ref = reference(x, w, idx, native)
    useful = T * A * 3 * 2 * D * I  # flops without padding rows
    print(f"T={T}: bm={bm}, blocks <= {KG.n_blocks_bound(T * A, X, bm)}, reference in {time.perf_counter() - t0:.1f}s",
          flush=True)

    def add(label, ms, err=None):  # err: (max, rms) for a whole experts call; None for a part of one
        rows.append((T, label, ms, err, useful / ms / 1e9 if err else None))
        e = f"  err max {err[0]:.2e} rms {err[1]:.2e}" if err else ""
        print(f"  {label:34s} {ms:8.3f} ms{e}", flush=True)

    for flat, wd in ((False, w_down_g), (True, w_down_f)):
        f = grouped_fn(flat)
        add(f"grouped {'flat' if flat else 'gathered'} (default)", median_ms(f, x, w, idx, w_gu, wd),
            errors(f(x, w, idx, w_gu, wd), ref))

    # the two kernels alone, default tiles, on the dispatched rows
    token_R, block_e_N, n_blocks, _ = jax.jit(KG.dispatch, static_argnums=(1, 2))(idx, X, bm)
    xs = jnp.take(jnp.concatenate([x, jnp.zeros((1, D), x.dtype)]), token_R, axis=0)
    sw = jax.jit(functools.partial(KG.grouped_swiglu, mode="gpu", bm=bm))
    h = sw(xs, block_e_N, n_blocks, w_gu)
    add("  kernel swiglu", median_ms(sw, xs, block_e_N, n_blocks, w_gu))
    dn = jax.jit(functools.partial(KG.grouped_down, mode="gpu", bm=bm, flat=False))
    add("  kernel down (gathered)", median_ms(dn, h, block_e_N, n_blocks, w_down_g))
    disp = jax.jit(lambda idx, x: jnp.take(jnp.concatenate([x, jnp.zeros((1, D), x.dtype)]),
                                           KG.dispatch(idx, X, bm)[0], axis=0))
    add("  dispatch + row gather", median_ms(disp, idx, x))

    for block in sorted({128, bm}):
        f = jax.jit(functools.partial(routed_experts_blocked, block=block))
        add(f"xla routed_experts_blocked b={block}", median_ms(f, x, w, idx, *native),
            errors(f(x, w, idx, *native), ref))

    saved = copy.deepcopy(KG.TUNING)
    for label, bm_s, sw_t, dn_t in sweeps(T):
        KG.TUNING.update(copy.deepcopy(saved))
        if sw_t is not None:
            KG.TUNING["swiglu"] = {16: sw_t}
        if dn_t is not None:
            KG.TUNING["down"] = {16: dn_t}
        try:
            f = grouped_fn(False, bm_s)
            add(f"sweep {label}", median_ms(f, x, w, idx, w_gu, w_down_g), errors(f(x, w, idx, w_gu, w_down_g), ref))
        except Exception as e:  # noqa: BLE001  a setting Triton rejects (e.g. out of shared memory)
            print(f"  sweep {label}: failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}", flush=True)
    KG.TUNING.clear()
    KG.TUNING.update(saved)


def main():
    print(jax.devices()[0].device_kind, jax.__version__, flush=True)
    Ts = [int(a) for a in sys.argv[1:]] or [128, 8192]
    rows = []
    t0 = time.perf_counter()
    for T in Ts:
        run_T(T, rows)
    print(f"\n{'T':>5s}  {'what':36s} {'ms':>8s} {'TFLOP/s':>8s} {'max err':>9s} {'rms err':>9s}")
    for T, label, ms, err, tf in rows:
        e = f"{err[0]:9.2e} {err[1]:9.2e}" if err else f"{'':9s} {'':9s}"
        print(f"{T:5d}  {label:36s} {ms:8.3f} {f'{tf:8.1f}' if tf else '':>8s} {e}")
    print(f"(TFLOP/s: useful flops, T*8 assignments x 3 matmuls, no padding; total {time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
    main()

"""tokamax's Mosaic GPU flash attention on the training step's shape: GPU time per call of the forward and of the
backward over small sweeps of their kernel configs, against tokamax's heuristic defaults (the configs the step runs
with: the shipped autotuning cache has none of these shapes). The companion of bench/ragged_dot_tune.py.

    JAX_PLATFORMS=cuda PYTHONPATH=. python bench/attention_tune.py               # bench preset, B 8 x T 2048
    JAX_PLATFORMS=cuda PYTHONPATH=. python bench/attention_tune.py --batch 2 --seq 8192
    JAX_PLATFORMS=cuda PYTHONPATH=. python bench/attention_tune.py --impls --docs 1 4   # tokamax vs cuDNN vs XLA

--impls times the implementations of `ops.causal_attention` instead (`model.attention`: tokamax's Mosaic kernel,
cuDNN's packed flash attention, XLA; tokamax_kstart: tokamax with the k_start mask even for one document per row;
tokamax_pad128: tokamax with its own backward head-dim pad, 96 -> 128, where the product pads to 96
(`ops.TOKAMAX_BWD_HEAD_PAD`);
cudnn_plain: cuDNN under its plain CAUSAL mask, no segments: one document per row only),
forward and forward + backward, with --docs documents per row, each checked against the XLA path in float32 on the
same inputs (output and the q / k / v gradients: largest absolute error).

The call is the one `ops.causal_attention` makes with kernels=tokamax on GPU for one document per row: q, k
[B, T, N, 96], v [B, T, N, 64] (MLA's qk_nope + qk_rope and v widths at the bench preset), bf16, the plain causal
mask (--k-start: the packed-documents mask, a k_start per query, as packed rows get). Forward configs (block_q,
block_kv, num_stages, persistent) are timed on the forward alone; backward configs (the dk/dv and the dq kernels'
blocks apart, compute warpgroups) on forward + backward with the default forward (--bwd-head-multiple: under
`backward_head_multiple`). One JSON line each: microseconds per call and the largest difference from the defaults'
output (forward) or gradients (backward); then the fastest of each.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import time

import jax
import jax.numpy as jnp


def _mods():
    from tokamax._src.ops.attention import base, pallas_mosaic_gpu as fa, pallas_mosaic_gpu_kernel_sm90 as sm90
    from tokamax._src.ops.attention import pallas_mosaic_gpu_vjp as vjp, pallas_mosaic_gpu_vjp_common as vjpc
    return base, fa, sm90, vjp, vjpc


@contextlib.contextmanager
def backward_head_multiple(multiple: int | None, widths: tuple[int, ...]):
    """tokamax 0.0.17's sm90 backward pads the head dim to a multiple of 64 where its forward pads to 16: while
    active, traces of the backward pad `widths` (the q / k and v head dims) to a multiple of `multiple` instead
    (None: tokamax's own), through the product's mechanism (`ops.TOKAMAX_BWD_HEAD_PAD`)."""
    if multiple is None:
        yield
        return
    from deepjax.model import ops
    saved = ops.TOKAMAX_BWD_HEAD_PAD
    ops.TOKAMAX_BWD_HEAD_PAD = {w: -(-w // multiple) * multiple for w in widths}
    ops._tokamax_backward_head_pad()
    try:
        yield
    finally:
        ops.TOKAMAX_BWD_HEAD_PAD = saved
        ops._tokamax_backward_head_pad()


def fwd_configs():
    _, _, sm90, _, _ = _mods()
    for bq, bkv, st, p in itertools.product([64, 128], [64, 128, 256], [2, 3, 4], [False, True]):
        yield dict(block_q=bq, block_kv=bkv, num_stages=st, persistent=p), sm90.Config(
            block_q=bq, block_kv=bkv, num_stages=st, persistent=p)


def bwd_configs():
    _, _, _, _, vjpc = _mods()
    blocks = [(64, 64), (64, 128), (128, 64), (128, 128)]
    # the dk/dv kernel's and the dq kernel's blocks chosen apart (tokamax's own autotuning set ties them)
    for (bq, bkv), (bq_dq, bkv_dq), st, wgs in itertools.product(blocks, blocks, [2], [1, 2]):
        yield dict(block_q_dkv=bq, block_kv_dkv=bkv, block_q_dq=bq_dq, block_kv_dq=bkv_dq, num_stages=st,
                   compute_wgs=wgs), vjpc.Config(block_q_dkv=bq, block_kv_dkv=bkv, block_q_dq=bq_dq,
                                                 block_kv_dq=bkv_dq, num_stages=st, compute_wgs=wgs)


def timed(f, args, reps: int) -> float:
    for _ in range(3):
        jax.block_until_ready(f(*args))
    t = time.perf_counter()
    for _ in range(reps):
        y = f(*args)
    jax.block_until_ready(y)
    return (time.perf_counter() - t) / reps


def inputs(args):
    """q, k [B, T, N, dqk], v and the output cotangent [B, T, N, dv], bf16, from fixed keys."""
    B, T, N = args.batch, args.seq, args.heads
    kq, kk, kv, kg = jax.random.split(jax.random.key(0), 4)
    return (jax.random.normal(kq, (B, T, N, args.dqk), jnp.bfloat16),
            jax.random.normal(kk, (B, T, N, args.dqk), jnp.bfloat16),
            jax.random.normal(kv, (B, T, N, args.dv), jnp.bfloat16),
            jax.random.normal(kg, (B, T, N, args.dv), jnp.bfloat16))


def cudnn_plain_causal(q, k, v, start, scale):
    """cuDNN's flash attention under its plain CAUSAL mask (no segments: one document per row only; `start` is
    ignored), v zero-padded to q's head dim as `ops._cudnn_causal` does."""
    from jax._src.cudnn import fused_attention_stablehlo as fa
    K, V = q.shape[-1], v.shape[-1]
    H = max(K, V)
    widen = lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, 0), (0, H - a.shape[-1])))  # noqa: E731
    return fa.dot_product_attention(widen(q), widen(k), widen(v), scale=scale, qkv_layout="BTNH",
                                    mask_type=fa.MaskType.CAUSAL)[..., :V]


def compare_impls(args):
    """`ops.causal_attention` per implementation: microseconds forward and forward + backward, and the largest error
    of the output and gradients against the XLA path in float32."""
    from deepjax.model import ops

    B, T, N = args.batch, args.seq, args.heads
    q, k, v, dout = inputs(args)
    scale = float(args.dqk) ** -0.5
    for docs in args.docs:
        seg = jnp.broadcast_to(jnp.minimum(jnp.arange(T) // (T // docs), docs - 1), (B, T))
        start = ops.doc_starts(seg)

        def fwd_bwd(f):
            def g(q, k, v, dout):
                out, pull = jax.vjp(lambda q, k, v: f(q, k, v, start, scale), q, k, v)
                return (out, *pull(dout))
            return g

        f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
        ref = jax.jit(fwd_bwd(ops._xla_causal))(f32(q), f32(k), f32(v), f32(dout))
        own = ops.TOKAMAX_BWD_HEAD_PAD
        impls = {"tokamax": (ops._tokamax_causal, own), "cudnn": (ops._cudnn_causal, own),
                 "xla": (ops._xla_causal, own),
                 "tokamax_kstart": (functools.partial(ops._tokamax_causal, single_doc_branch=False), own),
                 "tokamax_pad128": (ops._tokamax_causal, {}),  # (implementation, ops.TOKAMAX_BWD_HEAD_PAD)
                 "cudnn_plain": (cudnn_plain_causal, own)}
        for name in args.impl_list:
            rec = dict(kind="impl", impl=name, B=B, T=T, N=N, docs=docs)
            if name == "cudnn_plain" and docs > 1:
                rec["error"] = "one document per row only (its mask ignores the documents)"
                print(json.dumps(rec), flush=True)
                continue
            try:
                f, ops.TOKAMAX_BWD_HEAD_PAD = impls[name]  # read as each jit below traces
                fb = jax.jit(fwd_bwd(f))
                got = jax.block_until_ready(fb(q, k, v, dout))
                for label, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
                    rec[f"err_{label}"] = float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)))
                rec["ref_max_abs_dq"] = float(jnp.max(jnp.abs(ref[1])))
                rec["fwd_us"] = round(timed(jax.jit(lambda q, k, v: f(q, k, v, start, scale)), (q, k, v),
                                            args.reps) * 1e6, 1)
                rec["fwd_bwd_us"] = round(timed(fb, (q, k, v, dout), args.reps) * 1e6, 1)
            except Exception as e:  # noqa: BLE001
                rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            finally:
                ops.TOKAMAX_BWD_HEAD_PAD = own
            print(json.dumps(rec), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dqk", type=int, default=96)
    ap.add_argument("--dv", type=int, default=64)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--only", choices=["fwd", "bwd"], help="one sweep")
    ap.add_argument("--bwd-head-multiple", type=int, metavar="N", help="sweeps: pad the backward's head dim to a "
                    "multiple of N instead of tokamax's 64 (`backward_head_multiple`)")
    ap.add_argument("--k-start", action="store_true", help="sweep under the packed-documents mask (a k_start per "
                    "query, all 0 here) instead of the plain causal one")
    ap.add_argument("--impls", action="store_true", help="compare the implementations of ops.causal_attention")
    ap.add_argument("--impl-list", nargs="+", default=["tokamax", "cudnn", "xla"], help="with --impls: which")
    ap.add_argument("--docs", type=int, nargs="+", default=[1, 4], help="with --impls: documents per row")
    args = ap.parse_args(argv)
    if args.impls:
        if max(args.docs) > args.seq:
            ap.error(f"--docs {max(args.docs)}: at most --seq {args.seq}")
        return compare_impls(args)
    base, fa, _, vjp, _ = _mods()
    B, T, N = args.batch, args.seq, args.heads
    q, k, v, dout = inputs(args)
    # the mask the step's kernel gets: one document per row takes the plain causal kernel (`ops.one_document_per_row`)
    mask = (base.Mask(k_start=jnp.zeros((B, 1, T), jnp.int32), is_causal=True) if args.k_start
            else base.Mask(is_causal=True))
    scale = float(args.dqk) ** -0.5

    def call(op):
        def f(q, k, v):
            with jax.numpy_rank_promotion("allow"):
                return op(q, k, v, mask=mask, logits_scale=scale)
        return f

    def fwd_bwd(op):
        f = call(op)

        def g(q, k, v, dout):
            with backward_head_multiple(args.bwd_head_multiple, (args.dqk, args.dv)):
                out, pull = jax.vjp(f, q, k, v)
                return (out, *pull(dout))
        return g

    best = {}

    def run(kind, label, fn, fargs, ref):
        rec = dict(kind=kind, B=B, T=T, N=N, config=label)
        try:
            out = jax.block_until_ready(jax.jit(fn)(*fargs))
            ref = ref if ref is not None else out
            rec["max_diff_vs_default"] = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                                             for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)))
            dt = timed(jax.jit(fn), fargs, args.reps)
            rec["us"] = round(dt * 1e6, 1)
            if rec["max_diff_vs_default"] < 0.1 and (kind not in best or dt < best[kind][1]):
                best[kind] = (label, dt)
        except Exception as e:  # noqa: BLE001
            rec["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        print(json.dumps(rec), flush=True)
        return ref

    if args.only in (None, "fwd"):
        ref = run("fwd", "default", call(fa.PallasMosaicGpuFlashAttention()), (q, k, v), None)
        for label, cfg in fwd_configs():
            run("fwd", json.dumps(label), call(fa.PallasMosaicGpuFlashAttention(config=cfg)), (q, k, v), ref)
    if args.only in (None, "bwd"):
        ref = run("fwd+bwd", "default", fwd_bwd(fa.PallasMosaicGpuFlashAttention()), (q, k, v, dout), None)
        for label, cfg in bwd_configs():
            op = fa.PallasMosaicGpuFlashAttention(vjp=vjp.PallasMosaicGpuFlashAttentionVjp(config=cfg))
            run("fwd+bwd", json.dumps(label), fwd_bwd(op), (q, k, v, dout), ref)
    for kind, (label, dt) in best.items():
        print(f"fastest {kind}: {label} {dt * 1e6:.1f} us")
        if label != "default":  # the product's setting for it, as a train_bench A/B row
            name = "TOKAMAX_ATTENTION_FWD_CONFIG" if kind == "fwd" else "TOKAMAX_ATTENTION_BWD_CONFIG"
            print(f'  in the step: bench/train_bench.py --ops "{name}={json.loads(label)!r}"')


if __name__ == "__main__":
    main()

"""How fast a stack of per-layer gradients becomes one [L, ...] array on this device: the question behind the
layer loop's `loop_concatenate_fusion` kernels (the H100 profile of the bench preset's step, docs/LOG.md session 18:
three a step, ~2 ms each for 738 MB stacks, about a quarter of the copy bandwidth).

    JAX_PLATFORMS=cuda PYTHONPATH=. python bench/stack_grads.py          # bench preset's expert stacks, bf16
    PYTHONPATH=. python bench/stack_grads.py --shape 4 64 32              # CPU smoke run

`transformer._unrolled` split each stacked parameter with `lax.split`, whose transpose concatenates the layers'
gradients; it now splits with `transformer._split_dus`, whose gradient is the "dus" way below. Timed here on L arrays that arrive as jit inputs (as the gradient kernels' outputs do, which XLA
cannot fuse into the concatenation), each way of building the stack, beside `x + 1` over the whole stack (a read and
a write: the copy roofline):
    split_transpose  jax.vjp of `transformer._split` (what the training step ran before session 19)
    concat / stack   jnp.concatenate / jnp.stack
    dus              a zero-filled buffer, each layer written into its slice (dynamic_update_slice, in place)
"""
import argparse

import jax
import jax.numpy as jnp

from attention_tune import timed  # bench/: seconds per call after 3 warmup calls
from deepjax.model import transformer


def ways(L: int, shape: tuple, dtype):
    def dus(*p):
        buf = jnp.zeros((L, *shape), dtype)
        for i, x in enumerate(p):
            buf = jax.lax.dynamic_update_slice(buf, x[None], (i,) + (0,) * len(shape))
        return buf

    def split_transpose(*p):
        return jax.vjp(transformer._split, jnp.zeros((L, *shape), dtype))[1](list(p))[0]

    return {"split_transpose": split_transpose, "concat": lambda *p: jnp.concatenate([x[None] for x in p]),
            "stack": lambda *p: jnp.stack(p), "dus": dus}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=11, help="L: the bench preset's MoE layers")
    ap.add_argument("--shape", type=int, nargs="+", default=[64, 1024, 512], help="one layer's stacked parameter")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    L, shape, dtype = args.layers, tuple(args.shape), jnp.dtype(args.dtype)
    ps = [jnp.full(shape, i, dtype) for i in range(L)]
    gb = 2 * L * ps[0].size * dtype.itemsize / 1e9  # read the layers, write the stack
    ref = None
    print(f"{jax.devices()[0].device_kind}: {L} x {shape} {dtype.name} ({gb / 2:.2f} GB a stack)")
    for name, f in ways(L, shape, dtype).items():
        f = jax.jit(f)
        out = f(*ps)
        ref = out if ref is None else ref
        ms = timed(f, ps, args.reps) * 1e3
        print(f"{name:16s} {ms:8.3f} ms  {gb / ms:6.2f} TB/s  equal: {bool(jnp.array_equal(out, ref))}", flush=True)
    big = jnp.zeros((L, *shape), dtype)
    ms = timed(jax.jit(lambda x: x + 1), (big,), args.reps) * 1e3
    print(f"{'x + 1 (copy)':16s} {ms:8.3f} ms  {gb / ms:6.2f} TB/s")


if __name__ == "__main__":
    main()

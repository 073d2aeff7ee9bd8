"""Does Pallas (Triton) lower here: a gathered matrix-vector kernel with a dynamic expert index (smoke check)."""
import functools
import sys

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


def kern(idx_ref, x_ref, w_ref, o_ref, *, bn):
    x, j = pl.program_id(0), pl.program_id(1)
    e = idx_ref[x]
    w = w_ref[e, pl.ds(j * bn, bn), :].astype(jnp.float32)
    v = x_ref[x, :].astype(jnp.float32)
    o_ref[x, pl.ds(j * bn, bn)] = jnp.sum(w * v[None, :], axis=1)


def run(interpret):
    E, N, D, X, bn = 8, 256, 512, 4, 32
    w = jax.random.normal(jax.random.key(0), (E, N, D), jnp.bfloat16)
    x = jax.random.normal(jax.random.key(1), (X, D), jnp.bfloat16)
    idx = jnp.array([3, 0, 7, 3], jnp.int32)
    f = pl.pallas_call(functools.partial(kern, bn=bn), out_shape=jax.ShapeDtypeStruct((X, N), jnp.float32),
                       grid=(X, N // bn), interpret=interpret)
    got = jax.jit(f)(idx, x, w)
    want = jnp.einsum("xd,xnd->xn", x.astype(jnp.float32), w[idx].astype(jnp.float32))
    print("interpret" if interpret else jax.default_backend(), "max err", float(jnp.abs(got - want).max()))


if __name__ == "__main__":
    run(interpret="--interpret" in sys.argv)

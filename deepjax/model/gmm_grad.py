"""The weight gradient of a grouped matmul (`lax.ragged_dot`'s dRHS) as a Pallas kernel: Triton on GPU, the Pallas
interpreter elsewhere (tests).

For rows sorted by group (group g owns rows [start_g, end_g)), y = x w[g] row by row, and the weight gradient is

    dw[g] = x[start_g:end_g]^T dy[start_g:end_g]            [G, K, N], accumulated in float32, stored in the
                                                             weights' dtype

tokamax's Mosaic GPU kernel for this ragged-contracting product returns wrong values in bf16 on the H200 (its error
reaches a third of the entries' size in every group: docs/LOG.md), so `ops.grouped_matmul` keeps tokamax's forward
and input gradient and takes the weight gradient from here.

One program per (N tile, K tile, group): it walks its group's rows in blocks of `bm` (a loop whose trip count is the
group's, `fori_loop` with traced bounds, which Pallas lowers to Triton's scf.for), loads x and dy with the rows
outside [start, end) masked to zero, and accumulates x_blk^T dy_blk in float32. An empty group writes zeros. Rows
past the last group's end are never read into a sum. Tiles are powers of two of at least 16 (tl.dot).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

# Tiles: bm rows per step, bk x bn output tile per program. `bench/tune.py`-style sweeps belong on the GPU; these
# are the Triton matmul defaults for a [128, 128] float32 accumulator.
TILES = {"bm": 64, "bk": 128, "bn": 128, "num_warps": 8, "num_stages": 3}


def _tile(n: int, cap: int) -> int:
    """The largest power of two dividing n, at most cap."""
    t = 1
    while t * 2 <= cap and n % (t * 2) == 0:
        t *= 2
    return t


def supported(K: int, N: int) -> bool:
    """Whether Triton can take these widths (tiles of 16+ dividing K and N)."""
    return _tile(K, TILES["bk"]) >= 16 and _tile(N, TILES["bn"]) >= 16


def _kernel(bm: int, bk: int, bn: int):
    def kernel(start_ref, end_ref, x_ref, dy_ref, dw_ref):
        j, i, g = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        start, end = start_ref[g], end_ref[g]
        cols_k, cols_n = pl.ds(i * bk, bk), pl.ds(j * bn, bn)

        def body(b, acc):
            r0 = b * bm
            rows = r0 + jax.lax.broadcasted_iota(jnp.int32, (bm, 1), 0)
            live = (rows >= start) & (rows < end)  # [bm, 1]
            x = pltriton.load(x_ref.at[pl.ds(r0, bm), cols_k], mask=live, other=0)  # [bm, bk]
            dy = pltriton.load(dy_ref.at[pl.ds(r0, bm), cols_n], mask=live, other=0)  # [bm, bn]
            return acc + jax.lax.dot_general(x, dy, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

        acc = jax.lax.fori_loop(start // bm, (end + bm - 1) // bm, body, jnp.zeros((bk, bn), jnp.float32))
        dw_ref[g, cols_k, cols_n] = acc.astype(dw_ref.dtype)

    return kernel


def grouped_dw(x_MK, dy_MN, sizes_G, interpret: bool | None = None, out_dtype=jnp.float32):
    """[G, K, N] out_dtype: dw[g] = x[rows of g]^T dy[rows of g], rows sorted by group (`lax.ragged_dot` order),
    accumulated in float32 and cast as each tile is stored (a bf16 gradient costs no separate cast pass over a
    float32 one). interpret: None runs Triton on GPU and the interpreter elsewhere."""
    M, K = x_MK.shape
    N = dy_MN.shape[1]
    G = sizes_G.shape[0]
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    bm = TILES["bm"]
    bk, bn = _tile(K, TILES["bk"]), _tile(N, TILES["bn"])
    if not interpret and min(bk, bn) < 16:
        raise ValueError(f"grouped_dw: K={K}, N={N}: Triton needs tiles of 16+ dividing both (gmm_grad.supported)")
    if M % bm:  # every block of rows lies inside the arrays (the interpreter clamps a slice that does not)
        pad = bm - M % bm
        x_MK, dy_MN = jnp.pad(x_MK, ((0, pad), (0, 0))), jnp.pad(dy_MN, ((0, pad), (0, 0)))
    sizes_G = sizes_G.astype(jnp.int32)
    end_G = jnp.cumsum(sizes_G)
    start_G = end_G - sizes_G
    params = {} if interpret else {"compiler_params": pltriton.CompilerParams(
        num_warps=TILES["num_warps"], num_stages=TILES["num_stages"])}
    return pl.pallas_call(
        _kernel(bm, bk, bn), out_shape=jax.ShapeDtypeStruct((G, K, N), out_dtype), grid=(N // bn, K // bk, G),
        interpret=interpret, name="grouped_dw", **params)(start_G, end_G, x_MK, dy_MN)

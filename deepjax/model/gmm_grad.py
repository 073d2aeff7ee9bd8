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


# ---- row-grouped products: the input gradient (and the forward) ---------------------------------------------------
#
#     dx[r] = dy[r] w[g(r)]^T      (grouped_dx)                [M, K], w [G, K, N] read as it is stored
#     y[r]  = x[r] w[g(r)]         (grouped_matmul)            [M, N]
#
# tokamax's ragged dot takes w^T for the input gradient: the caller transposes every expert's weights each step (a
# [G, N, K] copy per grouped matmul, 4.4 GB of the bench preset's T 2048 step on the H200: docs/LOG.md session 20).
# Here one program per (work item, output column tile): a work item is one (row block, group) pair whose rows
# intersect, at most M / bm + G of them (a block that straddles groups is one item per group, each storing only its
# group's rows). The program walks the contraction in blocks of `bc`, loads its row block with the other groups'
# rows masked to zero, and accumulates against w[g]'s tile in float32.

ROW_TILES = {"bm": 64, "bo": 128, "bc": 64, "num_warps": 4, "num_stages": 3}  # rows, output columns, contraction


def _row_items(sizes_G, M: int, bm: int):
    """The (row block, group) work items, padded to M / bm + G: each item's first row, its group, and the group's
    row range [start, end) (start = end = 0 for the padding items, which store nothing)."""
    G = sizes_G.shape[0]
    nt = -(-M // bm)
    W = nt + G
    end_G = jnp.cumsum(sizes_G)
    start_G = end_G - sizes_G
    total = end_G[-1]
    lo_t = jnp.arange(nt, dtype=jnp.int32) * bm
    hi_t = jnp.minimum(lo_t + bm, total)  # exclusive
    live_t = lo_t < total
    # the groups holding the block's first and last rows (searchsorted 'right' on the ends skips empty groups)
    g0_t = jnp.searchsorted(end_G, lo_t, side="right").astype(jnp.int32)
    g1_t = jnp.searchsorted(end_G, hi_t - 1, side="right").astype(jnp.int32)
    count_t = jnp.where(live_t, g1_t - g0_t + 1, 0)
    off_t = jnp.cumsum(count_t)  # inclusive
    w_W = jnp.arange(W, dtype=jnp.int32)
    t_W = jnp.minimum(jnp.searchsorted(off_t, w_W, side="right").astype(jnp.int32), nt - 1)
    valid_W = w_W < off_t[-1]
    g_W = jnp.clip(g0_t[t_W] + w_W - (off_t[t_W] - count_t[t_W]), 0, G - 1)
    start_W = jnp.where(valid_W, start_G[g_W], 0)
    end_W = jnp.where(valid_W, end_G[g_W], 0)
    return t_W * bm, g_W, start_W, end_W


def _rows_kernel(bm: int, bo: int, bc: int, nc: int, trans_w: bool):
    """out[rows of g, o tile] = a[rows of g] (w[g]^T if trans_w else w[g]) [:, o tile], over nc contraction blocks."""
    def kernel(r0_ref, g_ref, start_ref, end_ref, a_ref, w_ref, out_ref):
        i, j = pl.program_id(0), pl.program_id(1)
        r0, g, start, end = r0_ref[i], g_ref[i], start_ref[i], end_ref[i]
        cols_o = pl.ds(j * bo, bo)
        rows = r0 + jax.lax.broadcasted_iota(jnp.int32, (bm, 1), 0)
        live = (rows >= start) & (rows < end)  # [bm, 1]

        def body(b, acc):
            cols_c = pl.ds(b * bc, bc)
            a = pltriton.load(a_ref.at[pl.ds(r0, bm), cols_c], mask=live, other=0)  # [bm, bc]
            if trans_w:
                w, dims = w_ref[g, cols_o, cols_c], (((1,), (1,)), ((), ()))  # [bo, bc]
            else:
                w, dims = w_ref[g, cols_c, cols_o], (((1,), (0,)), ((), ()))  # [bc, bo]
            return acc + jax.lax.dot_general(a, w, dims, preferred_element_type=jnp.float32)

        zero = start - start  # Triton's loop wants both bounds of one type: both from the int32 refs
        trip = jnp.where(end > start, zero + nc, zero)
        acc = jax.lax.fori_loop(zero, trip, body, jnp.zeros((bm, bo), jnp.float32))
        pltriton.store(out_ref.at[pl.ds(r0, bm), cols_o], acc.astype(out_ref.dtype), mask=live)
    return kernel


def rows_supported(K: int, N: int) -> bool:
    """Whether the row-grouped kernels' Triton tiles (16+, dividing K and N) fit these widths."""
    return min(_tile(K, ROW_TILES["bo"]), _tile(N, ROW_TILES["bo"]), _tile(K, ROW_TILES["bc"]),
               _tile(N, ROW_TILES["bc"])) >= 16


def _rows_call(a_MC, w_GKN, sizes_G, trans_w: bool, interpret, name: str):
    M, C = a_MC.shape
    O = w_GKN.shape[1] if trans_w else w_GKN.shape[2]
    if M == 0:
        return jnp.zeros((0, O), a_MC.dtype)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    bm = ROW_TILES["bm"]
    bo, bc = _tile(O, ROW_TILES["bo"]), _tile(C, ROW_TILES["bc"])
    if not interpret and min(bo, bc) < 16:
        raise ValueError(f"{name}: widths {C} -> {O}: Triton needs tiles of 16+ dividing both "
                         f"(gmm_grad.rows_supported)")
    Mp = -(-M // bm) * bm
    if Mp != M:  # every block of rows lies inside the arrays
        a_MC = jnp.pad(a_MC, ((0, Mp - M), (0, 0)))
    r0_W, g_W, start_W, end_W = _row_items(sizes_G.astype(jnp.int32), Mp, bm)
    params = {} if interpret else {"compiler_params": pltriton.CompilerParams(
        num_warps=ROW_TILES["num_warps"], num_stages=ROW_TILES["num_stages"])}
    out = pl.pallas_call(
        _rows_kernel(bm, bo, bc, C // bc, trans_w), out_shape=jax.ShapeDtypeStruct((Mp, O), a_MC.dtype),
        grid=(r0_W.shape[0], O // bo), interpret=interpret, name=name, **params)(
            r0_W, g_W, start_W, end_W, a_MC, w_GKN)
    return out[:M] if Mp != M else out


def grouped_dx(dy_MN, w_GKN, sizes_G, interpret: bool | None = None):
    """[M, K] in dy's dtype: dx[r] = dy[r] w[g]^T for the rows r of group g, rows sorted by group (`lax.ragged_dot`'s
    input gradient, w read in its stored layout), accumulated in float32. Rows past sum(sizes) are left undefined
    (the caller zeroes them where it needs to, as for tokamax's kernels). interpret: None runs Triton on GPU and the
    interpreter elsewhere."""
    return _rows_call(dy_MN, w_GKN, sizes_G, True, interpret, "grouped_dx")


def grouped_matmul(x_MK, w_GKN, sizes_G, interpret: bool | None = None):
    """[M, N] in x's dtype: `lax.ragged_dot(x, w, sizes)` by the same kernel as `grouped_dx` (w untransposed); rows
    past sum(sizes) left undefined. Timed against tokamax's forward by `bench/ragged_dot_tune.py --dx`."""
    return _rows_call(x_MK, w_GKN, sizes_G, False, interpret, "grouped_matmul")

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

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

# Tiles: bm rows per step, bk x bn output tile per program. `bench/tune.py`-style sweeps belong on the GPU; these
# are the Triton matmul defaults for a [128, 128] float32 accumulator.
TILES = {"bm": 64, "bk": 128, "bn": 128, "num_warps": 8, "num_stages": 3}


def on_gpu() -> bool:
    """Whether the kernels compile for Triton (else the Pallas interpreter runs them): on a GPU backend. A test that
    lowers the GPU program on a CPU machine replaces it."""
    return jax.default_backend() == "gpu"


def _tile(n: int, cap: int) -> int:
    """The largest power of two dividing n, at most cap."""
    t = 1
    while t * 2 <= cap and n % (t * 2) == 0:
        t *= 2
    return t


def supported(K: int, N: int) -> bool:
    """Whether Triton can take these widths (tiles of 16+ dividing K and N)."""
    return _tile(K, TILES["bk"]) >= 16 and _tile(N, TILES["bn"]) >= 16


def _kernel(bm: int, bk: int, bn: int, c0: int = 0, gather: bool = False, gather_dy: bool = False):
    """gather / gather_dy: x's / dy's rows come by index (int32 [M] operands before x, in that order: row r of the
    product is x[src[r]], dy[src_dy[r]])."""
    def kernel(start_ref, end_ref, *refs):
        refs = list(refs)
        src_ref = refs.pop(0) if gather else None
        dsrc_ref = refs.pop(0) if gather_dy else None
        x_ref, dy_ref, dw_ref = refs
        j, i, g = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        start, end = start_ref[g], end_ref[g]
        cols_k, cols_n, out_n = pl.ds(i * bk, bk), pl.ds(c0 + j * bn, bn), pl.ds(j * bn, bn)

        def body(b, acc):
            r0 = b * bm
            rows = r0 + jax.lax.broadcasted_iota(jnp.int32, (bm, 1), 0)
            live = (rows >= start) & (rows < end)  # [bm, 1]
            if gather:  # (every index a row of x: loaded unmasked, the other groups' rows zeroed after)
                x = jnp.where(live, x_ref[src_ref[pl.ds(r0, bm)], cols_k], 0)  # [bm, bk]
            else:
                x = pltriton.load(x_ref.at[pl.ds(r0, bm), cols_k], mask=live, other=0)  # [bm, bk]
            if gather_dy:
                dy = jnp.where(live, dy_ref[dsrc_ref[pl.ds(r0, bm)], cols_n], 0)  # [bm, bn]
            else:
                dy = pltriton.load(dy_ref.at[pl.ds(r0, bm), cols_n], mask=live, other=0)  # [bm, bn]
            return acc + jax.lax.dot_general(x, dy, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

        acc = jax.lax.fori_loop(start // bm, (end + bm - 1) // bm, body, jnp.zeros((bk, bn), jnp.float32))
        dw_ref[g, cols_k, out_n] = acc.astype(dw_ref.dtype)

    return kernel


def grouped_dw(x_MK, dy_MN, sizes_G, interpret: bool | None = None, out_dtype=jnp.float32,
               cols: tuple[int, int] | None = None, rows_M=None, dy_rows_M=None):
    """[G, K, N] out_dtype: dw[g] = x[rows of g]^T dy[rows of g], rows sorted by group (`lax.ragged_dot` order),
    accumulated in float32 and cast as each tile is stored (a bf16 gradient costs no separate cast pass over a
    float32 one). cols (start, width): dy's columns [start, start + width) only, N = width (the gradient of one
    weight of a pair whose products were joined: no slice of dy or of a joint gradient). interpret: None runs
    Triton on GPU and the interpreter elsewhere. rows_M (int32 [M]): x's rows by index, x [T, K] and row r of the
    product x[rows_M[r]] (the experts' sorted rows read from the tokens: no [M, K] copy); dy_rows_M likewise for
    dy's rows (dy [M', N], row r of the product dy[dy_rows_M[r]]). Every index must be a row of its array, also
    for rows outside the groups: the gathered loads are unmasked (Triton would read out of bounds)."""
    M, K = x_MK.shape if rows_M is None else (rows_M.shape[0], x_MK.shape[1])
    c0, N = cols if cols is not None else (0, dy_MN.shape[1])
    if c0 < 0 or N < 1 or c0 + N > dy_MN.shape[1] or (dy_MN.shape[0] if dy_rows_M is None else dy_rows_M.size) != M:
        raise ValueError(f"grouped_dw: x {x_MK.shape}, dy {dy_MN.shape}, cols {cols}: dy needs x's rows and the "
                         f"columns [start, start + width) inside it")
    G = sizes_G.shape[0]
    if interpret is None:
        interpret = not on_gpu()
    bm = TILES["bm"]
    bk, bn = _tile(K, TILES["bk"]), _tile(N, TILES["bn"])
    if not interpret and min(bk, bn) < 16:
        raise ValueError(f"grouped_dw: K={K}, N={N}: Triton needs tiles of 16+ dividing both (gmm_grad.supported)")
    pad = -M % bm  # every block of rows lies inside the arrays (the interpreter clamps a slice that does not)
    src = tuple(jnp.pad(r.astype(jnp.int32), (0, pad)) for r in (rows_M, dy_rows_M) if r is not None)  # (padding: row
    # 0, never summed)
    if pad and rows_M is None:
        x_MK = jnp.pad(x_MK, ((0, pad), (0, 0)))
    if pad and dy_rows_M is None:
        dy_MN = jnp.pad(dy_MN, ((0, pad), (0, 0)))
    sizes_G = sizes_G.astype(jnp.int32)
    end_G = jnp.cumsum(sizes_G)
    start_G = end_G - sizes_G
    params = {} if interpret else {"compiler_params": pltriton.CompilerParams(
        num_warps=TILES["num_warps"], num_stages=TILES["num_stages"])}
    return pl.pallas_call(
        _kernel(bm, bk, bn, c0, rows_M is not None, dy_rows_M is not None),
        out_shape=jax.ShapeDtypeStruct((G, K, N), out_dtype),
        grid=(N // bn, K // bk, G), interpret=interpret, name="grouped_dw", **params)(start_G, end_G, *src, x_MK, dy_MN)


# ---- row-grouped products: the input gradient (and the forward) ---------------------------------------------------
#
#     dx[r] = dy[r] w[g(r)]^T      (grouped_dx)                [M, K], w [G, K, N] read as it is stored
#     y[r]  = x[r] w[g(r)]         (grouped_matmul)            [M, N]
#
# tokamax's ragged dot takes w^T for the input gradient: the caller transposes every expert's weights each step (a
# [G, N, K] copy per grouped matmul, 4.4 GB of the bench preset's T 2048 step on the H200: docs/LOG.md session 20).
# Here one program per (output column tile, work item): a work item is one (row block, group) pair whose rows
# intersect, at most M / bm + G of them (a block that straddles groups is one item per group, each storing only its
# group's rows). The program walks the contraction in blocks of `bc`, loads its row block with the other groups'
# rows masked to zero, and accumulates against w[g]'s tile in float32.

# rows, output columns, contraction: Triton's usual Hopper matmul tile, unmeasured here (bench/ragged_dot_tune.py
# --rows-kernels sweeps them)
ROW_TILES = {"bm": 128, "bo": 128, "bc": 64, "num_warps": 8, "num_stages": 3}


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


def _rows_kernel(bm: int, bo: int, bc: int, parts: tuple, trans_w: bool, o0: int, gather: bool = False,
                 scatter: int = 0):
    """out[rows of g, o0 + o tile] = sum over parts p of a[rows of g, part p's columns] against w_p[g] (w_p[g]^T if
    trans_w) [:, o tile]; parts: (contraction blocks, a's first column) per weight. An output that arrives as an
    input too (aliased: a later call writing its other columns) sits between the weights and out_ref, unread.
    gather: a's rows come by index (an int32 [M] operand before a: row r is a[src[r]]). scatter = S > 0: row r of
    the product is stored at out row dst[r] (an int32 [M] operand after src), the other groups' rows at the S +
    (r - r0)-th row (S spare rows past the data: unmasked stores, which the interpreter takes)."""
    def kernel(r0_ref, g_ref, start_ref, end_ref, *refs):
        refs = list(refs)
        src_ref = refs.pop(0) if gather else None
        dst_ref = refs.pop(0) if scatter else None
        a_ref = refs.pop(0)
        w_refs, out_ref = refs[:len(parts)], refs[-1]
        # the output tile varies fastest: the programs of one row block run together and share its rows in L2
        # (with the work item fastest, each row block would be read from memory once per output tile)
        j, i = pl.program_id(0), pl.program_id(1)
        r0, g, start, end = r0_ref[i], g_ref[i], start_ref[i], end_ref[i]
        cols_o = pl.ds(j * bo, bo)
        rows = r0 + jax.lax.broadcasted_iota(jnp.int32, (bm, 1), 0)
        live = (rows >= start) & (rows < end)  # [bm, 1]
        src = src_ref[pl.ds(r0, bm)] if gather else None  # a's rows of this block, loaded once
        zero = start - start  # Triton's loop wants both bounds of one type: both from the int32 refs
        acc = jnp.zeros((bm, bo), jnp.float32)
        for w_ref, (nc, a0) in zip(w_refs, parts):
            def body(b, acc, w_ref=w_ref, a0=a0):
                if gather:  # (every index a row of a, loaded unmasked: the masked store drops the other rows)
                    a = a_ref[src, pl.ds(a0 + b * bc, bc)]  # [bm, bc]
                else:
                    a = pltriton.load(a_ref.at[pl.ds(r0, bm), pl.ds(a0 + b * bc, bc)], mask=live, other=0)
                cols_c = pl.ds(b * bc, bc)
                if trans_w:
                    w, dims = w_ref[g, cols_o, cols_c], (((1,), (1,)), ((), ()))  # [bo, bc]
                else:
                    w, dims = w_ref[g, cols_c, cols_o], (((1,), (0,)), ((), ()))  # [bc, bo]
                return acc + jax.lax.dot_general(a, w, dims, preferred_element_type=jnp.float32)

            acc = jax.lax.fori_loop(zero, jnp.where(end > start, zero + nc, zero), body, acc)
        if scatter:
            r = jax.lax.broadcasted_iota(jnp.int32, (bm,), 0)
            dst = jnp.where((r0 + r >= start) & (r0 + r < end), dst_ref[pl.ds(r0, bm)], scatter + r)
            out_ref[dst, pl.ds(o0 + j * bo, bo)] = acc.astype(out_ref.dtype)
        else:
            pltriton.store(out_ref.at[pl.ds(r0, bm), pl.ds(o0 + j * bo, bo)], acc.astype(out_ref.dtype), mask=live)
    return kernel


def rows_supported(K: int, N: int) -> bool:
    """Whether the row-grouped kernels' Triton tiles (16+, dividing K and N) fit these widths."""
    return min(_tile(K, ROW_TILES["bo"]), _tile(N, ROW_TILES["bo"]), _tile(K, ROW_TILES["bc"]),
               _tile(N, ROW_TILES["bc"])) >= 16


def _rows_call(a_MC, ws, sizes_G, trans_w: bool, interpret, name: str, rows_M=None, dst_M=None):
    """The row kernel for the weights `ws`: trans_w (the input gradient), their contractions side by side along a's
    columns, one call; else (the forward) their outputs side by side, one call per weight writing its columns of one
    buffer (each later call takes it as an aliased input). rows_M (int32 [M]): a's rows by index, a [T, C] and
    row r of the product a[rows_M[r]]. dst_M (int32 [M], a permutation): row r of the product stored at row
    dst_M[r] of the output (rows past sum(sizes) then undefined wherever they land)."""
    M, C = a_MC.shape if rows_M is None else (rows_M.shape[0], a_MC.shape[1])
    outs = [w.shape[1] if trans_w else w.shape[2] for w in ws]
    cons = [w.shape[2] if trans_w else w.shape[1] for w in ws]
    O = outs[0] if trans_w else sum(outs)
    K0 = ws[0].shape[1]
    if any(w.shape[0] != ws[0].shape[0] or w.shape[1] != K0 for w in ws) or (
            C != (sum(cons) if trans_w else cons[0])):
        raise ValueError(f"{name}: rows of width {C} against weights {[w.shape for w in ws]}: the weights must "
                         f"share G and K, and the rows' width must be " + ("their N's sum" if trans_w else "K"))
    if M == 0:
        return jnp.zeros((0, O), a_MC.dtype)
    if interpret is None:
        interpret = not on_gpu()
    bm = ROW_TILES["bm"]
    bo = min(_tile(o, ROW_TILES["bo"]) for o in outs)
    bc = min(_tile(c, ROW_TILES["bc"]) for c in cons)
    if not interpret and min(bo, bc) < 16:
        raise ValueError(f"{name}: widths {cons} -> {outs}: Triton needs tiles of 16+ dividing all of them "
                         f"(gmm_grad.rows_supported)")
    Mp = -(-M // bm) * bm
    src = () if rows_M is None else (jnp.pad(rows_M.astype(jnp.int32), (0, Mp - M)),)  # (padding: row 0, masked)
    src += () if dst_M is None else (jnp.pad(dst_M.astype(jnp.int32), (0, Mp - M)),)
    spare = Mp if dst_M is not None else 0  # scatter: the other groups' rows go to bm spare rows past Mp
    if Mp != M and rows_M is None:  # every block of rows lies inside the arrays
        a_MC = jnp.pad(a_MC, ((0, Mp - M), (0, 0)))
    items = _row_items(sizes_G.astype(jnp.int32), Mp, bm)
    params = {} if interpret else {"compiler_params": pltriton.CompilerParams(
        num_warps=ROW_TILES["num_warps"], num_stages=ROW_TILES["num_stages"])}
    call = functools.partial(pl.pallas_call, out_shape=jax.ShapeDtypeStruct((Mp + (bm if spare else 0), O),
                                                                             a_MC.dtype),
                             interpret=interpret, name=name, **params)
    W = items[0].shape[0]
    if trans_w:
        parts = tuple((c // bc, sum(cons[:p])) for p, c in enumerate(cons))
        out = call(_rows_kernel(bm, bo, bc, parts, True, 0, rows_M is not None, spare), grid=(outs[0] // bo, W))(
            *items, *src, a_MC, *ws)
    else:
        out, o0 = None, 0
        for w, o in zip(ws, outs):
            kernel = _rows_kernel(bm, bo, bc, ((C // bc, 0),), False, o0, rows_M is not None, spare)
            if out is None:
                out = call(kernel, grid=(o // bo, W))(*items, *src, a_MC, w)
            else:  # inputs: the 4 item arrays, (the rows,) a, w, then the buffer, aliased to the output
                out = call(kernel, grid=(o // bo, W), input_output_aliases={6 + len(src): 0})(*items, *src, a_MC, w,
                                                                                                out)
            o0 += o
    return out[:M] if out.shape[0] != M else out


def grouped_dx(dy_MN, w_GKN, sizes_G, interpret: bool | None = None, w2_GKN=None, rows_M=None):
    """[M, K] in dy's dtype: dx[r] = dy[r] w[g]^T for the rows r of group g, rows sorted by group (`lax.ragged_dot`'s
    input gradient, w read in its stored layout), accumulated in float32. w2_GKN: a second weight whose products
    were joined to w's (dy [M, N + N2]: dx = dy[:, :N] w[g]^T + dy[:, N:] w2[g]^T). Rows past sum(sizes) are left
    undefined (the caller zeroes them where it needs to, as for tokamax's kernels). interpret: None runs Triton on
    GPU and the interpreter elsewhere. rows_M (int32 [M]): dy's rows by index (row r is dy[rows_M[r]])."""
    ws = (w_GKN,) if w2_GKN is None else (w_GKN, w2_GKN)
    return _rows_call(dy_MN, ws, sizes_G, True, interpret, "grouped_dx", rows_M)


def grouped_matmul(x_MK, w_GKN, sizes_G, interpret: bool | None = None, w2_GKN=None, rows_M=None, dst_M=None):
    """[M, N] in x's dtype: `lax.ragged_dot(x, w, sizes)` by the same kernel as `grouped_dx` (w untransposed); with
    w2_GKN, [M, N + N2]: the products with w and w2 side by side, as against their concatenation, without forming
    it. Rows past sum(sizes) left undefined. Timed against tokamax's forward by `bench/ragged_dot_tune.py
    --rows-kernels`. rows_M (int32 [M]): the rows by index, x [T, K] and row r of the product x[rows_M[r]] (the
    experts' rows read from the tokens in the kernel's loads: no sorted [M, K] copy; every index a row of x, also
    outside the groups: the gathered loads are unmasked). dst_M (int32 [M], a permutation): row r of the product
    stored at output row dst_M[r] (the experts' rows put back in token order by the kernel's stores: no unsort
    gather); rows r past sum(sizes) leave row dst_M[r] undefined."""
    ws = (w_GKN,) if w2_GKN is None else (w_GKN, w2_GKN)
    return _rows_call(x_MK, ws, sizes_G, False, interpret, "grouped_matmul", rows_M, dst_M)


# ---- the experts' rows gathered from the tokens / stored back in token order, with their gradients ------------------
# (`ops.gathers_rows` / `ops.scatters_rows` say when the routed experts take them)

@jax.custom_vjp
def grouped_matmul_rows(x_TK, rows_M, inv_M, wa_GKN, wb_GKN, sizes_G):
    """[M, Na + Nb]: `grouped_matmul(x_TK[rows_M], wa, sizes_G, w2_GKN=wb)` with x's rows gathered in the kernels'
    loads (no sorted [M, K] copy, nor such a residual). rows_M [M] int32: the sorted rows' tokens, each token
    A = M / T times; inv_M: the sorted position of assignment t * A + a (so rows_M[inv_M] = repeat(arange(T), A)).
    Every row must be in a group (the dropless experts' bincount): rows past the groups are left undefined. x's
    gradient: the sorted input gradient put in token order and summed over each token's A rows, as
    `moe.sorted_tokens`' gradient."""
    return _rows_fwd(x_TK, rows_M, inv_M, wa_GKN, wb_GKN, sizes_G)[0]


def _rows_fwd(x_TK, rows_M, inv_M, wa_GKN, wb_GKN, sizes_G):
    y_MN = grouped_matmul(x_TK, wa_GKN, sizes_G, w2_GKN=wb_GKN, rows_M=rows_M)
    return y_MN, (x_TK, rows_M, inv_M, wa_GKN, wb_GKN, sizes_G)


def _rows_bwd(res, dy_MN):
    x_TK, rows_M, inv_M, wa_GKN, wb_GKN, sizes_G = res
    dy_MN = dy_MN.astype(x_TK.dtype)
    (T, K), M, Na = x_TK.shape, rows_M.shape[0], wa_GKN.shape[2]
    dxs_MK = grouped_dx(dy_MN, wa_GKN, sizes_G, w2_GKN=wb_GKN)
    # each token's A rows: gathered into token order, then summed (the transpose of `moe.sorted_tokens`' repeat)
    dx_TK = jax.lax.reduce_sum(dxs_MK.at[inv_M].get(unique_indices=True).reshape(T, M // T, K), (1,))
    dwa = grouped_dw(x_TK, dy_MN, sizes_G, out_dtype=wa_GKN.dtype, cols=(0, Na), rows_M=rows_M)
    dwb = grouped_dw(x_TK, dy_MN, sizes_G, out_dtype=wb_GKN.dtype, cols=(Na, wb_GKN.shape[2]), rows_M=rows_M)
    return dx_TK, None, None, dwa, dwb, None


grouped_matmul_rows.defvjp(_rows_fwd, _rows_bwd)


@jax.custom_vjp
def grouped_matmul_unsorted(h_MI, w_GIN, sizes_G, order_M):
    """[M, N]: `grouped_matmul(h, w, sizes)` (h's rows sorted by group) with row m stored at row order_M[m]: the
    rows in the order before the sort (no unsort gather). Its backward reads the sorted cotangent rows from the
    token-order cotangent in the kernels' loads. Every row must be in a group (sum(sizes) == M, as the dropless
    experts' bincount): rows past the groups are left undefined, in the output and in h's gradient."""
    return _unsorted_fwd(h_MI, w_GIN, sizes_G, order_M)[0]


def _unsorted_fwd(h_MI, w_GIN, sizes_G, order_M):
    return grouped_matmul(h_MI, w_GIN, sizes_G, dst_M=order_M), (h_MI, w_GIN, sizes_G, order_M)


def _unsorted_bwd(res, dy_MN):
    h_MI, w_GIN, sizes_G, order_M = res
    dy_MN = dy_MN.astype(h_MI.dtype)  # (token order; the kernels read row order[m] for sorted row m)
    dh_MI = grouped_dx(dy_MN, w_GIN, sizes_G, rows_M=order_M)
    dw_GIN = grouped_dw(h_MI, dy_MN, sizes_G, out_dtype=w_GIN.dtype, dy_rows_M=order_M)
    return dh_MI, dw_GIN, None, None


grouped_matmul_unsorted.defvjp(_unsorted_fwd, _unsorted_bwd)

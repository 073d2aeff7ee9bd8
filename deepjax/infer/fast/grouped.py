"""Grouped matmuls for the MoE experts over many tokens (prefill), as Pallas kernels: Triton on GPU, the Pallas
interpreter on CPU (tests).

`moe.routed_experts_blocked` sorts the assignments by expert into blocks of rows, then gathers each block's expert
weights (`w_gate_EDI[block_e]`): at batch 64 on the bench preset that copies ~1.3 GB per layer, and with the row
scatter into the blocks and the unsort it is most of the prefill. Here each block's program reads its expert's
weights in place, and the dispatch moves only int32 indices until the row gathers:

    dispatch        the T*A assignments ordered by expert, token order within one (by counting, or a stable sort for
                    many); each expert's rows padded to a multiple of bm;
                    padded row -> source token (padding rows -> token 0: their outputs are never read) by an
                    int32 scatter
    grouped_swiglu  per block of bm rows of expert e = block_e[n]: silu(x W_gate_e^T) * (x W_up_e^T) -> h [R, I];
                    the block's rows of x gathered in the kernel by their source tokens (token_R), or read from rows
                    XLA gathered before (xs [R, D]: at 512 decode rows, bench preset, 17 MB written and read back)
    grouped_down    per block: h W_down_e^T -> y [R, D] in x's dtype (float32 accumulation, rounded at the store,
                    as the training path's ragged_dot) or float32, for either layout of w_down
    combine         each assignment's row of y gathered back, weighted and summed over a token's A experts in
                    float32 (a gather and a reduction: no scatter-add)

Weights are the fused decode layouts (`fused._fuse_ffn`, contracted axis last), X = routed + shared experts
(shared ones appended, weight 1): w_gu [X, 2I, D] (I gate rows, then I up rows); w_down [X, D, I] ("gathered") or
[D, X*I] ("flat": column e*I + i is expert e's hidden unit i).

Programs of blocks past the data (`n_blocks`, traced) skip the contraction and write zeros (a `pl.when` branch:
a loop with a traced trip count failed Triton's verifier on the GPU), so every output row is defined. The grid
puts the output-column tiles of a block next to each other (program axis 0, the fastest in launch order) so a
block's x (or h) tile is read from DRAM once and then from L2, and consecutive blocks of one expert share that
expert's weights in L2 (TUNING "rows_fastest" flips it).

Triton (mode "gpu"): every block shape a power of two and at least 16 (tl.dot), so bm >= 16 and D, I multiples of
16 (`supported`); the contracted axis is a `fori_loop` so Triton can software-pipeline its loads (num_stages). The
in-kernel row gather is an int32 array indexer in the load (`_compute_offsets_from_indices`: a [bm, bk] pointer
tensor, row offsets token * D, each row's bk columns contiguous); the block's bm token ids load once, before the loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from deepjax.infer.fast.common import call, chunk, pow2


# Tiles per kernel, keyed by the block's row count bm: a kernel uses the entry of the largest key not above bm.
# bn: output columns per program (I for swiglu, D for down; swiglu keeps two [bm, bn] float32 accumulators),
# bk: contracted-axis chunk per loop step. bm = 16 is bound by weight bytes (each expert's weights read about once),
# bm = 128 by the tensor cores. `bench/tune.py grouped` sweeps these on the GPU.
TUNING = {
    "bm_max": 128,  # the largest automatic bm (`block_rows`)
    "swiglu": {
        16: {"bn": 128, "bk": 64, "num_warps": 8, "num_stages": 5, "rows_fastest": False},
        64: {"bn": 64, "bk": 64, "num_warps": 4, "num_stages": 3, "rows_fastest": False},
        128: {"bn": 128, "bk": 64, "num_warps": 8, "num_stages": 3, "rows_fastest": False},
    },
    "down": {
        16: {"bn": 128, "bk": 128, "num_warps": 4, "num_stages": 3, "rows_fastest": False},
        64: {"bn": 128, "bk": 64, "num_warps": 4, "num_stages": 3, "rows_fastest": False},
        128: {"bn": 64, "bk": 64, "num_warps": 4, "num_stages": 3, "rows_fastest": False},
    },
}
# (bm 16 and 128 from the tile sweep (`bench/tune.py grouped`) on one H100, 2026-11-23, docs/LOG.md: T = 128 tokens 0.258 ->
# ~0.24 ms, T = 8192 1.03-1.09 -> ~1.0 ms per layer; bm 64 untuned)


SMEM_BYTES = 212 * 1024  # what the pipelined tiles may take of an H100 block's 227 KB of shared memory


def _tiles(kind: str, bm: int, n_cols: int, n_contract: int, itemsize: int = 2) -> dict:
    """TUNING[kind]'s entry for bm with bn, bk cut to powers of two dividing the output / contracted widths, and
    num_stages cut until Triton's (stages - 1) buffered tiles fit SMEM_BYTES (float32 tiles are twice bf16's: the
    bf16-tuned bm = 16 swiglu entry asked for 272 KB in float32 on the H100)."""
    table = TUNING[kind]
    keys = sorted(table)
    t = dict(table[max([k for k in keys if k <= bm] or keys[:1])])
    t["bn"], t["bk"] = chunk(n_cols, t["bn"]), chunk(n_contract, t["bk"])
    per_stage = (bm + (2 if kind == "swiglu" else 1) * t["bn"]) * t["bk"] * itemsize
    while t["num_stages"] > 2 and (t["num_stages"] - 1) * per_stage > SMEM_BYTES:
        t["num_stages"] -= 1
    return t


def block_rows(n_assign: int, n_experts: int) -> int:
    """The automatic rows per block: the largest power of two at most half the mean rows per expert, clamped to
    [16, TUNING["bm_max"]]. Each non-empty expert wastes bm/2 padding rows on average, so this keeps padding near
    a quarter of the rows while taking the largest blocks (fewer weight re-reads, fuller tensor-core tiles) that
    allows: bench preset (X = 66, A = 8), 128 tokens -> 16, 1024 -> 32, 8192 -> 128."""
    half = n_assign / max(n_experts, 1) / 2
    bm = 16
    while bm * 2 <= min(half, TUNING["bm_max"]):
        bm *= 2
    return bm


def decode_block_rows(n_assign: int, n_experts: int) -> int:
    """Rows per block for a decode step's grouped experts: the smallest power of two at least the mean rows per
    expert, clamped to [16, TUNING["bm_max"]], so most experts take one block and their weights are read once. A
    step reads every expert's weights for few rows each; padding rows cost tensor-core time it has to spare.
    Bench preset, 512 rows a step (4,096 assignments over 66 experts): 64, where `block_rows` gives 16; measured
    0.298 against 0.336 ms a layer (bench/tune.py grouped 512, one H100, docs/LOG.md session 24)."""
    mean = n_assign / max(n_experts, 1)
    bm = 16
    while bm < min(mean, TUNING["bm_max"]):
        bm *= 2
    return bm


def fits(n_tokens: int, n_assign: int, n_experts: int, D: int, I: int) -> bool:
    """Whether n_tokens tokens with n_assign experts each stay within the GPU kernels' int32 element offsets: the
    padded rows times max(D, I) under 2^31 (`_check` raises otherwise; prefill_fused falls back before that)."""
    M = n_tokens * n_assign
    bm = block_rows(M, n_experts)
    return n_blocks_bound(M, n_experts, bm) * bm * max(D, I) < 2**31


def supported(D: int, I: int, bm: int = 16, n_experts: int = 0) -> bool:
    """Whether the GPU (Triton) kernels take hidden size D, expert width I and blocks of bm rows: every tile a power
    of two of at least 16 (tl.dot's minimum), so D and I multiples of 16 and bm a power of two >= 16; with
    n_experts, also w_gu under 2^31 elements (Pallas' Triton lowering indexes in int32: a whole DeepSeek-V3 layer's
    257 experts do not fit). The bench preset (D = 1024, I = 512) and tiny (D = 64, I = 32) qualify. The
    interpreter takes any shape."""
    if not (pow2(bm) and bm >= 16) or n_experts * 2 * I * D >= 2**31:
        return False
    s, d = _tiles("swiglu", bm, I, D), _tiles("down", bm, D, I)
    return min(s["bn"], s["bk"], d["bn"], d["bk"]) >= 16


def _call(kernel, mode: str, out_shape, grid, name: str, tiles: dict):
    if mode not in ("gpu", "interpret"):
        raise ValueError(f"grouped: mode must be 'gpu' or 'interpret', not {mode!r}")
    return call(kernel, mode, out_shape, grid, name, tiles["num_warps"], tiles["num_stages"])


def _grid(n_blocks_static: int, n_tiles: int, rows_fastest: bool):
    """(grid, program -> (block n, column tile j)): program axis 0 is the fastest in launch order."""
    if rows_fastest:
        return (n_blocks_static, n_tiles), lambda: (pl.program_id(0), pl.program_id(1))
    return (n_tiles, n_blocks_static), lambda: (pl.program_id(1), pl.program_id(0))


def _dot_fn(a_dtype, b_dtype):
    """Matmul of a [m, k] by b [n, k] (contracted axis last on both) with float32 accumulation; operands of different
    dtypes are promoted in the kernel. float32 operands get full-precision products (Triton's default is tf32)."""
    ct = jnp.promote_types(a_dtype, b_dtype)
    prec = jax.lax.Precision.HIGHEST if ct == jnp.float32 else None

    def dot(a, b):
        return jnp.dot(a.astype(ct), b.astype(ct).T, preferred_element_type=jnp.float32, precision=prec)

    return dot


def _check(mode: str, bm: int, tiles: dict, what: str, *arrays):
    if mode != "gpu":
        return
    if not (pow2(bm) and min(bm, tiles["bn"], tiles["bk"]) >= 16):
        raise ValueError(f"{what}: bm={bm}, tiles {tiles}: Triton needs power-of-two tiles of 16+ "
                         "(grouped.supported says which shapes qualify)")
    if max(a.size for a in arrays) >= 2**31:  # Pallas' Triton lowering computes element offsets in int32
        raise ValueError(f"{what}: an operand of {max(a.size for a in arrays)} elements: offsets overflow int32")


# ------------------------------------------------------------------------------------------------------ kernels


def _make_swiglu_kernel(I: int, D: int, bm: int, tiles: dict, dot, pid, gather: bool):
    """gather: operands (block_e, n_blocks, token_R, x, w_gu), the block's rows of x loaded by an int32 array
    indexer (x[tok, cols]: a gather in Triton's load, one row offset per row); else (block_e, n_blocks, xs, w_gu),
    the block's rows of xs in place."""
    bn, bk = tiles["bn"], tiles["bk"]

    def kernel(block_e_ref, n_blocks_ref, *refs):
        tok_ref, x_ref, w_ref, h_ref = refs if gather else (None, *refs)
        n, j = pid()
        e = block_e_ref[n]
        rows = pl.ds(n * bm, bm)
        live = n < n_blocks_ref[0]  # blocks past the data: no loads, zeros written
        zero = jnp.zeros((bm, bn), jnp.float32)

        @pl.when(live)
        def _():
            src = tok_ref[rows] if gather else rows  # [bm] source rows of x, loaded once for the loop

            def body(k, carry):
                g, u = carry
                cols = pl.ds(k * bk, bk)
                x = x_ref[src, cols]  # [bm, bk]
                g = g + dot(x, w_ref[e, pl.ds(j * bn, bn), cols])  # gate rows j*bn ..
                u = u + dot(x, w_ref[e, pl.ds(I + j * bn, bn), cols])  # the matching up rows
                return g, u

            g, u = jax.lax.fori_loop(0, D // bk, body, (zero, zero))
            h_ref[rows, pl.ds(j * bn, bn)] = (g / (1.0 + jnp.exp(-g)) * u).astype(h_ref.dtype)

        @pl.when(jnp.logical_not(live))
        def _():
            h_ref[rows, pl.ds(j * bn, bn)] = zero.astype(h_ref.dtype)

    return kernel


def _make_down_kernel(I: int, bm: int, tiles: dict, flat: bool, dot, pid):
    bn, bk = tiles["bn"], tiles["bk"]

    def kernel(block_e_ref, n_blocks_ref, h_ref, w_ref, y_ref):
        n, j = pid()
        e = block_e_ref[n]
        rows, out = pl.ds(n * bm, bm), pl.ds(j * bn, bn)
        live = n < n_blocks_ref[0]

        def body(k, acc):
            h = h_ref[rows, pl.ds(k * bk, bk)]  # [bm, bk]
            if flat:  # [D, X*I]: expert e's hidden units are columns e*I ..
                w = w_ref[out, pl.ds(e * I + k * bk, bk)]
            else:  # [X, D, I]
                w = w_ref[e, out, pl.ds(k * bk, bk)]
            return acc + dot(h, w)

        zero = jnp.zeros((bm, bn), jnp.float32)

        @pl.when(live)
        def _():
            y_ref[rows, out] = jax.lax.fori_loop(0, I // bk, body, zero).astype(y_ref.dtype)

        @pl.when(jnp.logical_not(live))
        def _():
            y_ref[rows, out] = zero.astype(y_ref.dtype)

    return kernel


def _scalars(block_e_N, n_blocks):
    return block_e_N.astype(jnp.int32), jnp.reshape(jnp.asarray(n_blocks, jnp.int32), (1,))


def grouped_swiglu(x, block_e_N, n_blocks, w_gu_XJD, mode: str, bm: int, token_R=None):
    """h [R, I] in x's dtype, R = N*bm: for each block n of bm rows (rows n*bm .. (n+1)*bm, all of expert
    e = block_e[n]), silu(x W_gate_e^T) * (x W_up_e^T) with float32 accumulation, W_gate_e = w_gu[e, :I],
    W_up_e = w_gu[e, I:]. x: the blocks' rows themselves, [R, D]; or, with token_R [R] (int32, `dispatch`'s, every
    entry a row of x), the source rows, row r of the block layout gathered in the kernel from x[token_R[r]]: the same
    results without the [R, D] copy. Blocks n >= n_blocks (a traced int32 scalar) are
    skipped and hold zeros."""
    D = x.shape[1]
    I = w_gu_XJD.shape[1] // 2
    N = block_e_N.shape[0]
    R = N * bm
    assert w_gu_XJD.shape[2] == D and (x.shape[0] == R if token_R is None else token_R.shape == (R,)), (
        x.shape, block_e_N.shape, bm, w_gu_XJD.shape, None if token_R is None else token_R.shape)
    tiles = _tiles("swiglu", bm, I, D, max(x.dtype.itemsize, w_gu_XJD.dtype.itemsize))
    out = jax.ShapeDtypeStruct((R, I), x.dtype)
    rows = () if token_R is None else (token_R.astype(jnp.int32),)
    _check(mode, bm, tiles, "grouped_swiglu", x, w_gu_XJD, block_e_N, out, *rows)
    grid, pid = _grid(N, I // tiles["bn"], tiles["rows_fastest"])
    kernel = _make_swiglu_kernel(I, D, bm, tiles, _dot_fn(x.dtype, w_gu_XJD.dtype), pid, bool(rows))
    return _call(kernel, mode, out, grid, "grouped_swiglu", tiles)(*_scalars(block_e_N, n_blocks), *rows, x, w_gu_XJD)


def grouped_down(h_RI, block_e_N, n_blocks, w_down, mode: str, bm: int, flat: bool, out_dtype=jnp.float32):
    """y [R, D] in out_dtype (float32 accumulation, rounded once at the store): each block's rows h W_down_e^T for
    its expert e = block_e[n], w_down [X, D, I] or, flat, [D, X*I]. Blocks n >= n_blocks are skipped and hold
    zeros."""
    R, I = h_RI.shape
    N = block_e_N.shape[0]
    D = w_down.shape[0] if flat else w_down.shape[1]
    assert R == N * bm and (w_down.shape[1] % I == 0 if flat else w_down.shape[2] == I), (h_RI.shape, w_down.shape)
    tiles = _tiles("down", bm, D, I, max(h_RI.dtype.itemsize, w_down.dtype.itemsize))
    out = jax.ShapeDtypeStruct((R, D), out_dtype)
    _check(mode, bm, tiles, "grouped_down", h_RI, w_down, out)
    grid, pid = _grid(N, D // tiles["bn"], tiles["rows_fastest"])
    kernel = _make_down_kernel(I, bm, tiles, flat, _dot_fn(h_RI.dtype, w_down.dtype), pid)
    return _call(kernel, mode, out, grid, "grouped_down", tiles)(
        *_scalars(block_e_N, n_blocks), h_RI, w_down)


# ----------------------------------------------------------------------------------------------------- dispatch


def n_blocks_bound(n_assign: int, n_experts: int, bm: int) -> int:
    """Static block count: an expert with c rows takes ceil(c / bm) blocks, at most (c + bm - 1) / bm, and at most
    min(X, T*A) experts are non-empty."""
    return -(-(n_assign + min(n_experts, n_assign) * (bm - 1)) // bm)


# `dispatch` ranks the assignments within their expert by counting (a cumulative sum over the tokens' expert
# counts) up to this many elements of the one-hot [T*A, X], else by a stable sort. Both give the same layout. At 512
# decode rows on the bench preset (4,096 assignments x 66 experts) XLA:GPU's sort took 31 us of a ~290 us layer, on
# its critical path (bench/profile.py, one H100, docs/LOG.md session 24). The bound keeps prefills of many tokens
# (8,192 x 8 assignments: 4.3M elements), where counting was not timed, on the sort. The running sum was over the
# T*A assignments' one-hot until session 26 (two reduce-window kernels, ~6 us a layer at 512 rows); it is over the
# T tokens' [T, X] counts now (untimed).
COUNT_MAX = 1 << 20


def dispatch(idx_TA, n_experts: int, bm: int, method: str = "auto", distinct: bool = False,
             pad_token: int | None = None):
    """The block layout of the T*A assignments (token t to expert idx[t, a], every id in [0, X)), all int32:
    (token_R: source token of each padded row, pad_token for padding rows (default T: a zero row appended to x);
    block_e_N: expert of each block, X - 1 for the blocks past the data; n_blocks: blocks holding data, a scalar;
    row_TA: each assignment's padded row). Within an expert the rows keep token order (a stable sort's order).
    method: "count" (each assignment's rank in its expert from a cumulative sum over the tokens' expert counts
    [T, X]), "sort" (a stable argsort by expert), "auto" (count up to COUNT_MAX elements of the one-hot [T*A, X]).
    distinct: each token's A experts are distinct (top-k routing, plus shared experts): counting then skips the
    ranks among a token's own assignments (always zero then; one reduction less)."""
    T, A = idx_TA.shape
    M = T * A
    X = n_experts
    N = n_blocks_bound(M, X, bm)
    pad = T if pad_token is None else pad_token
    if method == "auto":
        method = "count" if M * X <= COUNT_MAX else "sort"
    if method not in ("count", "sort"):
        raise ValueError(f"grouped.dispatch: method must be 'auto', 'count' or 'sort', not {method!r}")
    flat_M = idx_TA.reshape(-1).astype(jnp.int32)
    arange_M = jnp.arange(M, dtype=jnp.int32)
    counting = method == "count" and T > 0
    if counting:
        # an assignment's rank in its expert: its expert's assignments in earlier tokens (a running sum over the T
        # tokens of [T, X] counts, A times shorter than one over the T*A assignments) plus the token's own earlier
        # assignments to it (none under top-k routing: `distinct`; else [T, A, A] comparisons). The running sum's
        # last row is the experts' counts (no bincount scatter).
        idx_TA = idx_TA.astype(jnp.int32)
        hot_TX = (idx_TA[:, :, None] == jnp.arange(X, dtype=jnp.int32)[None, None, :]).sum(1, dtype=jnp.int32)
        through_TX = jnp.cumsum(hot_TX, 0)
        before_TX = through_TX - hot_TX
        counts_X = through_TX[-1]
        rank_TA = jnp.take_along_axis(before_TX, idx_TA, 1)
        if not distinct:
            a_A = jnp.arange(A)
            earlier_AA = (a_A[None, :] < a_A[:, None])[None]  # [1, A, A]: a' before a
            rank_TA = rank_TA + ((idx_TA[:, :, None] == idx_TA[:, None, :]) & earlier_AA).sum(-1, dtype=jnp.int32)
    else:
        counts_X = jnp.bincount(flat_M, length=X).astype(jnp.int32)
    padded_X = (counts_X + bm - 1) // bm * bm
    end_X = jnp.cumsum(padded_X)
    start_X = end_X - padded_X  # first padded row of each expert
    if counting:
        row_M = start_X[flat_M] + rank_TA.reshape(-1)  # padded row of each assignment
        token_R = jnp.full((N * bm,), pad, jnp.int32).at[row_M].set(arange_M // A, unique_indices=True)
    else:
        order_M = jnp.argsort(flat_M, stable=True).astype(jnp.int32)
        e_M = flat_M[order_M]  # sorted
        first_X = jnp.cumsum(counts_X) - counts_X  # first sorted assignment of each expert
        dest_M = start_X[e_M] + arange_M - first_X[e_M]  # padded row of each sorted assignment
        token_R = jnp.full((N * bm,), pad, jnp.int32).at[dest_M].set(order_M // A, unique_indices=True)
        row_M = jnp.zeros((M,), jnp.int32).at[order_M].set(dest_M, unique_indices=True)
    # expert of block n: the number of experts whose padded rows end at or before the block's first row
    block_e_N = (end_X[None, :] <= (jnp.arange(N, dtype=jnp.int32) * bm)[:, None]).sum(1, dtype=jnp.int32)
    return token_R, jnp.minimum(block_e_N, X - 1), end_X[-1] // bm, row_M.reshape(T, A)


DISPATCH_KERNEL_MAX_TOKENS = 2048  # `dispatch_kernel` unrolls its token chunks: a decode step's tokens, not a prefill's
DISPATCH_KERNEL_MAX_EXPERTS = 128  # its [X, X] and [tokens, X] tiles in registers (bench preset: 64 or 66)


def dispatch_kernel_takes(n_tokens: int, n_experts: int) -> bool:
    """Whether `dispatch_kernel` takes this step: a positive multiple of 16 tokens up to DISPATCH_KERNEL_MAX_TOKENS
    (token chunks of 16+ rows: tl.dot), at most DISPATCH_KERNEL_MAX_EXPERTS experts."""
    return (0 < n_tokens <= DISPATCH_KERNEL_MAX_TOKENS and n_tokens % 16 == 0
            and n_experts <= DISPATCH_KERNEL_MAX_EXPERTS)


def _make_dispatch_kernel(T: int, A: int, X: int, bm: int, N: int, pad: int, tc: int, nb: int, barrier: bool):
    """One program: `dispatch`'s counting layout for distinct experts per token. Lanes: Xp = X padded to a power
    of two (Triton's block shapes); tokens in chunks of tc, blocks in chunks of nb, both unrolled, the expert ids
    loaded once up front (independent loads, one latency)."""
    Xp = max(16, 1 << (X - 1).bit_length())
    i32 = jnp.int32

    def kernel(idx_ref, token_ref, block_e_ref, n_blocks_ref, row_ref):
        e = jnp.arange(Xp, dtype=i32)
        t = jnp.arange(tc, dtype=i32)
        ids = [[idx_ref[pl.ds(c * tc, tc), a] for a in range(A)] for c in range(T // tc)]  # [tc] each

        def hot(c):  # [tc, Xp]: token c*tc + i assigned to expert e (0 / 1; distinct: at most once)
            return sum((ids[c][a][:, None] == e[None, :]).astype(i32) for a in range(A))

        counts = sum(jnp.sum(hot(c), axis=0) for c in range(T // tc))
        padded = (counts + bm - 1) // bm * bm
        start = jnp.sum(jnp.where(e[None, :] < e[:, None], padded[None, :], 0), axis=1)  # [Xp] first padded row
        end = start + padded
        n_blocks_ref[0] = jnp.sum(padded) // bm
        for k in range(-(-N // nb)):  # block n's expert: the experts whose rows end at or before its first row
            s0 = min(k * nb, N - nb)  # (the last chunk overlaps the one before: the same values again)
            n = s0 + jnp.arange(nb, dtype=i32)
            be = jnp.sum(((end[None, :] <= n[:, None] * bm) & (e[None, :] < X)).astype(i32), axis=1)
            block_e_ref[pl.ds(s0, nb)] = jnp.minimum(be, X - 1)
            token_ref[pl.ds(s0 * bm, nb * bm)] = jnp.full((nb * bm,), pad, i32)  # overwritten below where assigned
        if barrier:  # (Triton) the padding writes above land before the assignments' rows overwrite theirs
            pltriton.debug_barrier()
        earlier = (t[None, :] < t[:, None]).astype(jnp.bfloat16)  # [tc, tc]: token j before token i
        carry = jnp.zeros((Xp,), i32)  # each expert's assignments in the chunks before c
        for c in range(T // tc):
            h = hot(c)
            before = jnp.dot(earlier, h.astype(jnp.bfloat16), preferred_element_type=jnp.float32).astype(i32)
            first = start[None, :] + carry[None, :] + before  # [tc, Xp]: token i's row for expert e, if assigned
            for a in range(A):
                row = jnp.sum(jnp.where(ids[c][a][:, None] == e[None, :], first, 0), axis=1)  # [tc]
                row_ref[pl.ds(c * tc, tc), a] = row
                token_ref[row] = c * tc + t
            carry = carry + jnp.sum(h, axis=0)

    return kernel


def dispatch_kernel(idx_TA, n_experts: int, bm: int, mode: str, pad_token: int = 0, num_warps: int = 8):
    """`dispatch(idx_TA, n_experts, bm, "count", distinct=True, pad_token=pad_token)` as one Pallas program
    (Triton on GPU) instead of XLA's one-hot, running sum, scatter and block reductions: the same four arrays.
    idx_TA's experts must be distinct within each token (top-k routing, plus shared experts). T must be a
    multiple of 16 up to DISPATCH_KERNEL_MAX_TOKENS, and at most DISPATCH_KERNEL_MAX_EXPERTS experts (the rest are
    `dispatch`'s)."""
    T, A = idx_TA.shape
    X = n_experts
    if not dispatch_kernel_takes(T, X):
        raise ValueError(f"grouped.dispatch_kernel: {T} tokens, {X} experts; it takes a positive multiple of 16 "
                         f"tokens up to {DISPATCH_KERNEL_MAX_TOKENS} and up to {DISPATCH_KERNEL_MAX_EXPERTS} experts "
                         "(`dispatch` takes any)")
    N = n_blocks_bound(T * A, X, bm)
    tc = chunk(T, 128)
    nb = 1 << (min(N, max(1, 4096 // bm)).bit_length() - 1)  # blocks a step: a power of two, <= N, <= 4096 rows
    out_shape = (jax.ShapeDtypeStruct((N * bm,), jnp.int32), jax.ShapeDtypeStruct((N,), jnp.int32),
                 jax.ShapeDtypeStruct((1,), jnp.int32), jax.ShapeDtypeStruct((T, A), jnp.int32))
    kernel = _make_dispatch_kernel(T, A, X, bm, N, pad_token, tc, nb, mode == "gpu")
    token_R, block_e_N, n_blocks, row_TA = call(kernel, mode, out_shape, (1,), "dispatch", num_warps, 1)(
        idx_TA.astype(jnp.int32))
    return token_R, block_e_N, n_blocks[0], row_TA


def experts_grouped(x_TD, w_TA, idx_TA, w_gu, w_down, mode: str, flat: bool, bm: int | None = None,
                    gather_rows: bool = True, y_dtype=None, distinct: bool = False, dispatch_in_kernel: bool = False):
    """[T, D] in x's dtype: sum_a w[t, a] * expert_{idx[t, a]}(x[t]), expert e(x) = W_down_e (silu(W_gate_e x) *
    W_up_e x), every assignment computed (dropless). w_gu [X, 2I, D]; w_down [X, D, I], or [D, X*I] when flat.
    bm: rows per block (`block_rows` when None). gather_rows: the gate/up kernel gathers its rows of x itself
    (`grouped_swiglu` with token_R); False: XLA gathers them into a padded [R, D] copy first (same results).
    The hidden activations are rounded to x's dtype between the kernels; the down outputs to y_dtype (None: x's
    dtype, as the training path's ragged_dot rows; jnp.float32: unrounded); the weighted sum is float32 either
    way. `options` reads gather_rows and y_dtype from a tuning table. distinct: each token's experts in idx_TA are
    distinct (routing's top-k plus the shared experts; `dispatch`), which the callers in `fused` guarantee.
    dispatch_in_kernel (with distinct, where `dispatch_kernel_takes` the step: a decode step, or a prefill that
    short): the layout from `dispatch_kernel`, one Pallas program, instead of XLA's kernels (the same layout)."""
    T, D = x_TD.shape
    A = idx_TA.shape[1]
    X = w_gu.shape[0]
    bm = block_rows(T * A, X) if bm is None else bm
    # The layout and the weights pass a barrier: materialized once, never recomputed inside the gathers that read
    # them (XLA:GPU may fuse index arithmetic into its consumers; a decode profile at 512 rows showed the combine
    # growing from 6 to 81 us a layer once the layout came from counting instead of a scatter)
    # Padding rows read token 0's row (with no tokens, a zero row): their outputs are never gathered by the
    # combine, and x needs no padded copy (a kernel a layer at every decode step)
    if dispatch_in_kernel and distinct and dispatch_kernel_takes(T, X):
        layout = dispatch_kernel(idx_TA, X, bm, mode, pad_token=0)
    else:
        layout = dispatch(idx_TA, X, bm, distinct=distinct, pad_token=0)
    (token_R, block_e_N, n_blocks, row_TA), w_TA = jax.lax.optimization_barrier((layout, w_TA))
    x_src = x_TD if T else jnp.zeros((1, D), x_TD.dtype)
    if gather_rows:
        h_RI = grouped_swiglu(x_src, block_e_N, n_blocks, w_gu, mode, bm, token_R)
    else:
        xs_RD = jnp.take(x_src, token_R, axis=0, mode="clip")
        h_RI = grouped_swiglu(xs_RD, block_e_N, n_blocks, w_gu, mode, bm)
    y_RD = grouped_down(h_RI, block_e_N, n_blocks, w_down, mode, bm, flat,
                        x_TD.dtype if y_dtype is None else y_dtype)
    y_TAD = jnp.take(y_RD, row_TA.reshape(-1), axis=0, mode="clip").reshape(T, A, D).astype(jnp.float32)
    # a multiply and a reduction, not an einsum: XLA:GPU would make that a float32 dot at its default (tf32)
    # precision, and it fuses the gather into the reduction
    return (y_TAD * w_TA.astype(jnp.float32)[..., None]).sum(1).astype(x_TD.dtype)


DOWN_OUT = {"x": None, "float32": jnp.float32}  # a tuning table's grouped.down_out -> experts_grouped's y_dtype


def options(table: dict) -> dict:
    """experts_grouped's gather_rows and y_dtype from a tuning table's "grouped" entry (`kernels.TUNING["grouped"]`,
    passed as an argument: `fused` passes the block's w["tuning"]["grouped"]): gather_in_kernel -> gather_rows,
    down_out ("x": x's dtype, "float32") -> y_dtype. ValueError for another down_out."""
    if table["down_out"] not in DOWN_OUT:
        raise ValueError(f"kernel tuning grouped.down_out={table['down_out']!r}: one of {sorted(DOWN_OUT)}")
    return {"gather_rows": bool(table["gather_in_kernel"]), "y_dtype": DOWN_OUT[table["down_out"]],
            "dispatch_in_kernel": bool(table["dispatch_kernel"])}


__all__ = ["TUNING", "DOWN_OUT", "block_rows", "decode_block_rows", "dispatch", "dispatch_kernel",
           "dispatch_kernel_takes", "experts_grouped", "grouped_down", "grouped_swiglu", "n_blocks_bound", "options",
           "supported"]

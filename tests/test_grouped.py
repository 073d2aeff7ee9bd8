"""The grouped-matmul expert kernels (`deepjax.infer.fast.grouped`) in Pallas' interpreter against a dense float32
reference (every expert on every token, combined with the routing weights): the same kernel bodies compile through
Triton on GPU (tests/test_gpu_kernels.py compares them there; `test_lowers_for_gpu` lowers them here)."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepjax.infer.fast import grouped as KG
from deepjax.infer.fast import kernels as KN

T, A, X, D, I = 37, 3, 6, 64, 32  # T*A = 111 assignments: not a multiple of any block size
SMALL_TILES = {"bn": 16, "bk": 16, "num_warps": 4, "num_stages": 2, "rows_fastest": False}  # loops of 2-4 steps


def _routing(rng):
    """Expert 0 on every token (37 rows: 3 blocks of 16), then one of {0, 1, 2} (a token may pick expert 0 twice),
    then the "shared" expert 5 (weight 1); experts 3 and 4 get nothing."""
    idx = np.stack([np.zeros(T), rng.choice(3, T), np.full(T, X - 1)], 1).astype(np.int32)
    w = np.concatenate([rng.random((T, A - 1)) + 0.5, np.ones((T, 1))], 1).astype(np.float32)
    return jnp.asarray(idx), jnp.asarray(w)


def _weights(rng, dtype):
    w_gu = jnp.asarray(rng.normal(size=(X, 2 * I, D)) * 0.2, jnp.float32).astype(dtype)  # [X, 2I, D]
    w_down = jnp.asarray(rng.normal(size=(X, D, I)) * 0.2, jnp.float32).astype(dtype)  # [X, D, I]
    return w_gu, w_down


def _flat(w_down_XDI):
    """[X, D, I] -> [D, X*I], column e*I + i = expert e's unit i (`fused`'s flat layout)."""
    return jnp.moveaxis(w_down_XDI, 0, 1).reshape(D, -1)


def dense_reference(x_TD, w_TA, idx_TA, w_gu_XJD, w_down_XDI):
    """Every expert on every token in float64 (numpy), combined with the routing weights."""
    x, w_gu, w_down = (np.asarray(a, np.float64) for a in (x_TD, w_gu_XJD, w_down_XDI))
    g = np.einsum("td,xid->txi", x, w_gu[:, :I])
    u = np.einsum("td,xid->txi", x, w_gu[:, I:])
    y = np.einsum("txi,xdi->txd", g / (1 + np.exp(-g)) * u, w_down)
    comb = np.zeros((x.shape[0], w_gu.shape[0]))
    np.add.at(comb, (np.arange(x.shape[0])[:, None], np.asarray(idx_TA)), np.asarray(w_TA, np.float64))
    return np.einsum("txd,tx->td", y, comb)


def _close(got, want, tol):
    """Max abs error relative to the largest output."""
    return np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max() <= tol


OLD = {"gather_rows": False, "y_dtype": jnp.float32}  # XLA's row gather before the kernels, float32 down rows
# ("new": experts_grouped's defaults, rows gathered in the kernel, down rows in x's dtype)


@pytest.mark.parametrize("dtype,flat,tiles,path", [
    ("float32", False, "small", "new"), ("float32", True, "small", "new"), ("float32", False, "default", "new"),
    ("bfloat16", False, "default", "new"), ("bfloat16", True, "small", "new"),
    ("float32", True, "small", "old"), ("bfloat16", False, "default", "old"),
])
def test_experts_grouped_equals_dense(dtype, flat, tiles, path, monkeypatch):
    """Both w_down layouts, float32 (1e-5) and bfloat16 (h and, by default, the down rows rounded to bf16: 2e-2),
    several blocks for one expert, empty experts, a token on one expert twice; small tiles run several column
    programs and contraction steps per block; the defaults ("new") and the earlier path ("old"). Also checks that the
    tolerance would catch swapped gate/up halves or a block reading the wrong expert's weights."""
    if tiles == "small":
        for kind in ("swiglu", "down"):
            monkeypatch.setitem(KG.TUNING, kind, {16: SMALL_TILES})
    rng = np.random.default_rng(0)
    dt = jnp.dtype(dtype)
    idx, w = _routing(rng)
    x = jnp.asarray(rng.normal(size=(T, D)), jnp.float32).astype(dt)
    w_gu, w_down = _weights(rng, dt)
    got = KG.experts_grouped(x, w, idx, w_gu, _flat(w_down) if flat else w_down, "interpret", flat, bm=16,
                             **(OLD if path == "old" else {}))
    assert got.dtype == dt and got.shape == (T, D)
    want = dense_reference(x, w, idx, w_gu, w_down)
    tol = 1e-5 if dtype == "float32" else 2e-2
    assert _close(got, want, tol), np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max()
    # the check discriminates: gate and up swapped, or expert e's weights read for expert e + 1
    swapped = jnp.concatenate([w_gu[:, I:], w_gu[:, :I]], 1)
    assert not _close(dense_reference(x, w, idx, swapped, w_down), want, 20 * tol)
    rolled = dense_reference(x, w, idx, jnp.roll(w_gu, 1, 0), jnp.roll(w_down, 1, 0))
    assert not _close(rolled, want, 20 * tol)


def test_automatic_block_size():
    """bm = None picks `block_rows`; 32 rows per block here (T*A = 444 over 6 experts), against the reference."""
    rng = np.random.default_rng(1)
    T4 = 4 * T
    idx = jnp.asarray(np.stack([rng.choice(3, T4), rng.choice(X, T4), np.full(T4, X - 1)], 1), jnp.int32)
    w = jnp.asarray(rng.random((T4, A)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(T4, D)), jnp.float32)
    w_gu, w_down = _weights(rng, jnp.float32)
    assert KG.block_rows(T4 * A, X) == 32
    got = KG.experts_grouped(x, w, idx, w_gu, w_down, "interpret", False)
    assert _close(got, dense_reference(x, w, idx, w_gu, w_down), 1e-5)


def test_block_rows_rule():
    assert KG.block_rows(128 * 8, 66) == 16 and KG.block_rows(1024 * 8, 66) == 32
    assert KG.block_rows(8192 * 8, 66) == 128 and KG.block_rows(1, 66) == 16


@pytest.mark.parametrize("method", ["count", "sort"])
@pytest.mark.parametrize("bm", [4, 16])
def test_dispatch_bookkeeping(bm, method):
    """Every assignment gets its own padded row, inside a block of its expert, whose source token is the
    assignment's token; padding rows point at token T; blocks in expert order; n_blocks = sum ceil(count / bm);
    blocks past the data (the static bound has slack) hold expert X - 1."""
    rng = np.random.default_rng(2)
    idx, _ = _routing(rng)
    token_R, block_e_N, n_blocks, row_TA = (np.asarray(a) for a in KG.dispatch(idx, X, bm, method))
    idx = np.asarray(idx)
    N = KG.n_blocks_bound(T * A, X, bm)
    assert token_R.shape == (N * bm,) and block_e_N.shape == (N,)
    counts = np.bincount(idx.ravel(), minlength=X)
    assert n_blocks == sum(-(-c // bm) for c in counts) <= N
    rows = row_TA.ravel()
    assert len(np.unique(rows)) == rows.size and rows.max() < n_blocks * bm
    assert (block_e_N[rows // bm] == idx.ravel()).all()  # each assignment in a block of its expert
    assert (token_R[row_TA] == np.arange(T)[:, None]).all()
    pad = np.setdiff1d(np.arange(N * bm), rows)
    assert (token_R[pad] == T).all()
    assert (np.diff(block_e_N[:n_blocks]) >= 0).all() and (block_e_N[n_blocks:] == X - 1).all()
    assert np.array_equal(np.bincount(block_e_N[:n_blocks], minlength=X), -(-counts // bm))
    # within an expert, tokens keep their order (stable sort)
    for e in range(X):
        r = np.sort(rows[idx.ravel() == e])
        assert (np.diff(token_R[r]) >= 0).all()


def test_dispatch_methods_agree(monkeypatch):
    """Counting and sorting give the same layout, skewed routing (empty experts) included; "auto" switches at
    COUNT_MAX one-hot elements; an unknown method is an error."""
    rng = np.random.default_rng(5)
    for idx in (_routing(rng)[0], jnp.asarray(rng.integers(0, 3, (T, A)), jnp.int32)):
        for bm in (4, 16):
            count, sort = KG.dispatch(idx, X, bm, "count"), KG.dispatch(idx, X, bm, "sort")
            for a, b in zip(count, sort):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    def sorts():  # a sort primitive anywhere in the traced program (nested jaxprs included)
        return re.search(r"\bsort\[", str(jax.make_jaxpr(lambda i: KG.dispatch(i, X, 16))(idx))) is not None
    assert not sorts()
    monkeypatch.setattr(KG, "COUNT_MAX", T * A * X - 1)
    assert sorts()
    with pytest.raises(ValueError, match="method"):
        KG.dispatch(idx, X, 16, "radix")


def _distinct_routing(rng, T_=T):
    """Each token's A experts distinct (top-k routing: two of experts 0-2, skewed toward 0, then the "shared" 5)."""
    top = np.stack([rng.permutation(3)[:2] for _ in range(T_)])
    top[rng.random(T_) < 0.5, 0] = 0  # expert 0 on most tokens, first or second
    top[:, 1] = np.where(top[:, 0] == top[:, 1], (top[:, 1] + 1) % 3, top[:, 1])
    idx = np.concatenate([top, np.full((T_, 1), X - 1)], 1).astype(np.int32)
    assert all(len(set(r)) == A for r in idx.tolist())
    return jnp.asarray(idx)


@pytest.mark.parametrize("bm", [4, 16])
def test_dispatch_distinct_and_pad_token(bm):
    """With distinct experts per token, `distinct=True` (no ranks among a token's own assignments) gives the counting
    and the sorting layouts; pad_token moves only the padding rows; counting has no bincount scatter-add, and
    distinct counting one reduction over [T, A, A] less."""
    rng = np.random.default_rng(7)
    idx = _distinct_routing(rng)
    ref = KG.dispatch(idx, X, bm, "sort")
    for method, distinct in (("count", True), ("count", False), ("sort", True)):
        got = KG.dispatch(idx, X, bm, method, distinct=distinct)
        for a, b in zip(got, ref):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    token_R, _, n_blocks, row_TA = (np.asarray(a) for a in KG.dispatch(idx, X, bm, "count", True, pad_token=0))
    pad = np.setdiff1d(np.arange(token_R.size), np.asarray(row_TA).ravel())
    assert pad.size and (token_R[pad] == 0).all() and (np.asarray(ref[0])[pad] == T).all()
    np.testing.assert_array_equal(np.delete(token_R, pad), np.delete(np.asarray(ref[0]), pad))
    jaxpr = lambda d: str(jax.make_jaxpr(lambda i: KG.dispatch(i, X, bm, "count", distinct=d))(idx))  # noqa: E731
    assert "scatter-add" not in jaxpr(False) and "scatter-add" in str(
        jax.make_jaxpr(lambda i: KG.dispatch(i, X, bm, "sort"))(idx))
    assert jaxpr(True).count("reduce_sum") < jaxpr(False).count("reduce_sum")


@pytest.mark.parametrize("T_,A_,X_,bm", [(16, 3, 10, 16), (64, 6, 64, 16), (128, 8, 66, 64), (48, 2, 5, 32)])
def test_dispatch_kernel_equals_counting(T_, A_, X_, bm):
    """`dispatch_kernel` (one Pallas program, interpreted) gives `dispatch`'s counting layout for distinct experts a
    token, padding rows at token 0, bit for bit: uniform routing (the decode's), skewed routing with empty experts
    and an expert on every token (the appended shared experts); a token count it does not take is refused."""
    rng = np.random.default_rng(T_ + X_)
    uniform = np.stack([rng.permutation(X_)[:A_] for _ in range(T_)])
    skewed = np.stack([np.concatenate([rng.permutation(A_)[:A_ - 1], [X_ - 1]]) for _ in range(T_)])
    for idx in (uniform, skewed):
        idx = jnp.asarray(idx, jnp.int32)
        want = KG.dispatch(idx, X_, bm, "count", distinct=True, pad_token=0)
        got = KG.dispatch_kernel(idx, X_, bm, "interpret")
        for a, b in zip(got, want):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="multiple of 16"):
        KG.dispatch_kernel(jnp.zeros((24, 2), jnp.int32), X_, bm, "interpret")
    with pytest.raises(ValueError, match="multiple of 16"):
        KG.dispatch_kernel(jnp.zeros((KG.DISPATCH_KERNEL_MAX_TOKENS + 16, 2), jnp.int32), X_, bm, "interpret")
    with pytest.raises(ValueError, match="experts"):
        KG.dispatch_kernel(jnp.zeros((16, 2), jnp.int32), KG.DISPATCH_KERNEL_MAX_EXPERTS + 1, bm, "interpret")


def test_dispatch_kernel_lowers_for_gpu():
    """Mode "gpu" lowers through Pallas' Triton backend without a GPU at the decode's shape (512 rows, bench preset:
    6 routed experts of 64, 64-row blocks; and with the 2 shared experts appended)."""
    for A_, X_ in ((6, 64), (8, 66)):
        fn = jax.jit(lambda i: KG.dispatch_kernel(i, X_, 64, "gpu"))  # noqa: B023
        text = fn.trace(jax.ShapeDtypeStruct((512, A_), jnp.int32)).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("__gpu$xla.gpu.triton") == 1


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_experts_grouped_distinct_equals_dense(dtype):
    """`distinct=True` (the fused decoder's routing) on distinct routing: the dense reference, and the
    general path's output bit for bit; the padding rows read token 0 (no padded copy of x)."""
    rng = np.random.default_rng(8)
    dt = jnp.dtype(dtype)
    idx = _distinct_routing(rng)
    w = jnp.asarray(rng.random((T, A)) + 0.5, jnp.float32)
    x = jnp.asarray(rng.normal(size=(T, D)), jnp.float32).astype(dt)
    w_gu, w_down = _weights(rng, dt)
    for gather_rows in (True, False):
        run = functools.partial(KG.experts_grouped, x, w, idx, w_gu, w_down, "interpret", False, 16,
                                gather_rows=gather_rows)
        got = run(distinct=True)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(run()))
        sub = functools.partial(KG.experts_grouped, x[:32], w[:32], idx[:32], w_gu, w_down, "interpret", False, 16,
                                gather_rows=gather_rows, distinct=True)  # (dispatch_kernel: 16s of tokens)
        np.testing.assert_array_equal(np.asarray(sub(dispatch_in_kernel=True)), np.asarray(sub()))
        named = lambda **k: re.search(r"\bname=dispatch\b", str(jax.make_jaxpr(lambda x: sub(**k))(x)))  # noqa: E731
        assert named(dispatch_in_kernel=True) and not named()
        assert _close(got, dense_reference(x, w, idx, w_gu, w_down), 1e-5 if dtype == "float32" else 2e-2)
    text = str(jax.make_jaxpr(lambda x: KG.experts_grouped(x, w, idx, w_gu, w_down, "interpret", False, 16))(x))
    assert "concatenate" not in text


@pytest.mark.parametrize("flat", [False, True])
def test_kernels_skip_blocks_past_the_data(flat, monkeypatch):
    """The two kernels on a hand-made layout: blocks of experts 2, 0, 0, 1, then two blocks past n_blocks = 4 with
    nonzero rows, which must come out zero; each data block equals its expert's SwiGLU / down projection."""
    for kind in ("swiglu", "down"):
        monkeypatch.setitem(KG.TUNING, kind, {16: SMALL_TILES})
    rng = np.random.default_rng(3)
    bm, N = 16, 6
    block_e = jnp.asarray([2, 0, 0, 1, 3, 5], jnp.int32)
    x = jnp.asarray(rng.normal(size=(N * bm, D)), jnp.float32)
    w_gu, w_down = _weights(rng, jnp.float32)
    h = KG.grouped_swiglu(x, block_e, jnp.int32(4), w_gu, "interpret", bm)
    y = KG.grouped_down(h, block_e, jnp.int32(4), _flat(w_down) if flat else w_down, "interpret", bm, flat)
    h, y = np.asarray(h, np.float64), np.asarray(y, np.float64)
    assert h.shape == (N * bm, I) and y.shape == (N * bm, D) and y.dtype == np.float64
    assert (h[4 * bm:] == 0).all() and (y[4 * bm:] == 0).all()
    xn, gu, wd = (np.asarray(a, np.float64) for a in (x, w_gu, w_down))
    for n, e in enumerate([2, 0, 0, 1]):
        blk = slice(n * bm, (n + 1) * bm)
        g, u = xn[blk] @ gu[e, :I].T, xn[blk] @ gu[e, I:].T
        np.testing.assert_allclose(h[blk], g / (1 + np.exp(-g)) * u, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(y[blk], h[blk] @ wd[e].T, rtol=1e-5, atol=1e-5)


def _layout(rng, bm, N, n_live, T_):
    """A hand-made block layout: token_R a shuffle of the T_ tokens with padding rows (token T_, the zero row) spread
    through the live blocks, blocks n_live .. N - 1 pointing at real tokens (their rows must still come out zero);
    block_e with repeats and an expert past the data."""
    token = rng.permutation(np.resize(np.arange(T_), N * bm)).astype(np.int32)
    token[rng.choice(n_live * bm, n_live * bm // 4, replace=False)] = T_  # padding rows
    return jnp.asarray(token), jnp.asarray([2, 0, 0, 1, 3, 5][:N], jnp.int32)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_swiglu_gathers_rows_in_kernel(dtype, monkeypatch):
    """grouped_swiglu with token_R (rows gathered from x_pad in the kernel) equals it on rows XLA gathered before,
    exactly (the interpreter runs the same dots on the same values); blocks past n_blocks hold zeros although their
    token_R rows are real tokens, padding rows (the zero row) give zero h."""
    for kind in ("swiglu", "down"):
        monkeypatch.setitem(KG.TUNING, kind, {16: SMALL_TILES})
    rng = np.random.default_rng(6)
    dt = jnp.dtype(dtype)
    bm, N, n_live, T_ = 16, 6, 4, 29
    token_R, block_e = _layout(rng, bm, N, n_live, T_)
    x = jnp.asarray(rng.normal(size=(T_, D)), jnp.float32).astype(dt)
    x_pad = jnp.concatenate([x, jnp.zeros((1, D), dt)])
    w_gu, _ = _weights(rng, dt)
    got = KG.grouped_swiglu(x_pad, block_e, jnp.int32(n_live), w_gu, "interpret", bm, token_R)
    want = KG.grouped_swiglu(jnp.take(x_pad, token_R, axis=0), block_e, jnp.int32(n_live), w_gu, "interpret", bm)
    assert got.dtype == dt and got.shape == (N * bm, I)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    got = np.asarray(got, np.float32)
    assert (got[n_live * bm:] == 0).all() and (got[np.asarray(token_R) == T_] == 0).all()
    assert (np.abs(got[:n_live * bm][np.asarray(token_R)[:n_live * bm] < T_]).max(1) > 0).all()


@pytest.mark.parametrize("flat", [False, True])
def test_down_output_in_x_dtype(flat, monkeypatch):
    """grouped_down with out_dtype bf16 (float32 accumulation, rounded at the store) equals its float32 output
    rounded to bf16, exactly; blocks past n_blocks hold zeros."""
    for kind in ("swiglu", "down"):
        monkeypatch.setitem(KG.TUNING, kind, {16: SMALL_TILES})
    rng = np.random.default_rng(7)
    bf = jnp.bfloat16
    bm, N, n_live = 16, 6, 4
    block_e = jnp.asarray([2, 0, 0, 1, 3, 5], jnp.int32)
    h = jnp.asarray(rng.normal(size=(N * bm, I)), jnp.float32).astype(bf)
    _, w_down = _weights(rng, bf)
    wd = _flat(w_down) if flat else w_down
    y32 = KG.grouped_down(h, block_e, jnp.int32(n_live), wd, "interpret", bm, flat)
    y16 = KG.grouped_down(h, block_e, jnp.int32(n_live), wd, "interpret", bm, flat, bf)
    assert y32.dtype == jnp.float32 and y16.dtype == bf and y16.shape == (N * bm, D)
    np.testing.assert_array_equal(np.asarray(y16, np.float32), np.asarray(y32.astype(bf), np.float32))
    assert not np.array_equal(np.asarray(y16, np.float32), np.asarray(y32))  # the rounding happened
    assert (np.asarray(y16, np.float32)[n_live * bm:] == 0).all()


def test_new_options_match_old_path():
    """experts_grouped's defaults against the earlier path (XLA's row gather, float32 down rows) on bf16: the
    in-kernel gather alone changes nothing (exact); bf16 down rows change the result by at most their rounding."""
    rng = np.random.default_rng(8)
    bf = jnp.bfloat16
    idx, w = _routing(rng)
    x = jnp.asarray(rng.normal(size=(T, D)), jnp.float32).astype(bf)
    w_gu, w_down = _weights(rng, bf)
    run = functools.partial(KG.experts_grouped, x, w, idx, w_gu, w_down, "interpret", False, 16)
    old = np.asarray(run(**OLD), np.float64)
    gathered = np.asarray(run(gather_rows=True, y_dtype=jnp.float32), np.float64)
    np.testing.assert_array_equal(gathered, old)
    new = np.asarray(run(), np.float64)
    assert 0 < np.abs(new - old).max() <= 2.0 ** -6 * np.abs(old).max()  # an ulp of the output (2^-7) and a bit


def test_options_from_tuning():
    """`grouped.options` reads a tuning table's grouped.gather_in_kernel / down_out (defaults: both new options on);
    an unknown down_out is an error."""
    assert KG.options(KN.tuning()["grouped"]) == {"gather_rows": True, "y_dtype": None, "dispatch_in_kernel": False}
    old = KN.tuning(("grouped.gather_in_kernel=False", "grouped.down_out='float32'"))["grouped"]
    assert KG.options(old) == {**OLD, "dispatch_in_kernel": False}
    assert KG.options(KN.tuning(("grouped.dispatch_kernel=True",))["grouped"])["dispatch_in_kernel"]
    assert KG.options(KN.tuning(("grouped.down_out=float32",))["grouped"])["y_dtype"] == jnp.float32  # unquoted
    with pytest.raises(ValueError, match="down_out"):  # at validation, not first at tracing
        KN.tuning(("grouped.down_out='bf16'",))
    with pytest.raises(ValueError, match="down_out"):
        KG.options({"gather_in_kernel": True, "down_out": "bf16"})


def test_supported_shapes():
    assert KG.supported(1024, 512, 16) and KG.supported(1024, 512, 128)  # bench preset
    assert KG.supported(64, 32, 16)  # tiny preset
    assert KG.supported(7168, 2048, 64) and not KG.supported(7168, 2048, 64, n_experts=257)  # DeepSeek-V3: int32
    assert KG.supported(1024, 512, 16, n_experts=66)
    assert not KG.supported(1024, 512, 8) and not KG.supported(1024, 520, 16) and not KG.supported(1024, 512, 48)


@pytest.mark.parametrize("dtype,T_,flat,path", [("bfloat16", 128, False, "new"), ("bfloat16", 8192, True, "new"),
                                                ("bfloat16", 8192, False, "old"), ("float32", 128, True, "new")])
def test_lowers_for_gpu(dtype, T_, flat, path):
    """Mode "gpu" lowers through Pallas' Triton backend for CUDA without a GPU (bench preset: D = 1024, I = 512,
    66 experts, 8 per token; automatic bm: 16 at 128 tokens, 128 at 8192), rows gathered in the kernel (an int32
    array indexer in the load) or before it. Catches most Triton-only errors (block shapes, dot operands, loop and
    indexing lowering); Triton's own compile runs only on the GPU."""
    dt = jnp.dtype(dtype)
    Xb, Ab, Db, Ib = 66, 8, 1024, 512
    S = jax.ShapeDtypeStruct
    args = (S((T_, Db), dt), S((T_, Ab), jnp.float32), S((T_, Ab), jnp.int32), S((Xb, 2 * Ib, Db), dt),
            S((Db, Xb * Ib), dt) if flat else S((Xb, Db, Ib), dt))
    fn = functools.partial(KG.experts_grouped, mode="gpu", flat=flat, **(OLD if path == "old" else {}))
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 2


def test_prefill_fused_equals_prefill():
    """`sampling.prefill_fused` (fused weights, absorbed attention over the prompt, the grouped kernels interpreted)
    gives `prefill`'s logits, cache rows and hidden states, rows of different lengths (padding included)."""
    import dataclasses

    from flax import nnx

    from deepjax import model as M
    from deepjax.infer import sampling as SP
    from deepjax.config import load_config

    cfg = dataclasses.replace(load_config("tiny").model, initializer_range=0.2)
    model = nnx.merge(*M.init(cfg, jax.random.key(0)))
    prompts, lengths = SP.pad_prompts([[5, 17, 300], [9, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11], [7] * 16])
    prompts, lengths = jnp.asarray(prompts), jnp.asarray(lengths)
    cache = SP.init_cache(cfg, 3, 32)
    layers = SP.fuse_layers(model, 3, "interpret", 32)
    assert SP.fused_prefill_ok(layers, 48) and not SP.fused_prefill_ok(SP.fuse_layers(model, 3, None, 32), 48)
    # the fused prefill's [B, N, P, P] float32 scores past FUSED_PREFILL_MAX_SCORE_BYTES: the modules prefill
    N = model.cfg.num_attention_heads
    big = int((SP.FUSED_PREFILL_MAX_SCORE_BYTES / (4 * N)) ** 0.5) + 1  # B = 1, P = big
    assert SP.fused_prefill_ok(layers, big - 1, big - 1) and not SP.fused_prefill_ok(layers, big, big)
    assert not SP.fused_prefill_ok(SP.fuse_layers(model, 3, "interpret", 32, ("attention", "experts")), 48)
    assert KG.fits(8192, 8, 66, 1024, 512) and not KG.fits(262144, 8, 66, 1024, 512)  # int32 offsets on GPU
    want = SP.prefill(model, prompts, lengths, cache, SP.prefill_experts_fn(cfg), return_hidden=True)
    got = jax.jit(lambda p, n: SP.prefill_fused(model, layers, p, n, cache, return_hidden=True))(prompts, lengths)
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=1e-4, atol=1e-5)
    valid = np.arange(prompts.shape[1])[None] < np.asarray(lengths)[:, None]  # padding rows: overwritten later
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
        np.testing.assert_allclose(np.asarray(a)[:, :16][valid], np.asarray(b)[:, :16][valid], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got[2])[valid], np.asarray(want[2])[valid], rtol=1e-4, atol=1e-4)


def test_decode_block_rows_rule():
    """A decode step's blocks hold about one expert's rows: the smallest power of two at least the mean, in
    [16, bm_max]. Bench preset (66 experts, 8 a token): 512 rows a step -> 64, 1024 -> 128, 64 -> 16."""
    assert KG.decode_block_rows(512 * 8, 66) == 64 and KG.decode_block_rows(1024 * 8, 66) == 128
    assert KG.decode_block_rows(64 * 8, 66) == 16 and KG.decode_block_rows(8192 * 8, 66) == KG.TUNING["bm_max"]

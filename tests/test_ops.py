"""The kernel seam (deepjax/model/ops.py) and the grouped-matmul weight-gradient kernel (deepjax/model/gmm_grad.py)
against plain references: packed-document causal attention vs an explicit mask, grouped matmuls vs per-group float64
products, the chunked LM-head cross-entropy vs optax on full logits. Where tokamax is installed (Python >= 3.12),
its path (its XLA implementations on CPU, with this project's custom VJP) is compared with the XLA path too; the
GPU kernels are compared in tests/test_gpu_ops.py."""

import collections
import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from deepjax import model as M
from deepjax.model import gmm_grad, ops, presets

ops_rows, ops_unsorted = gmm_grad.grouped_matmul_rows, gmm_grad.grouped_matmul_unsorted  # (unpatched: a test counts
# calls)

has_tokamax = ops._tokamax() is not None
needs_tokamax = pytest.mark.skipif(not has_tokamax, reason="tokamax needs Python >= 3.12 and jax >= 0.11.1")
KERNELS = ["xla"] + (["tokamax"] if has_tokamax else [])


# ---- attention -----------------------------------------------------------------------------------------------

def _segments(B, T, seed):
    """Segment ids with several documents per row at odd lengths, and trailing padding (segment 0) on row 1."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((B, T), np.int32)
    for b in range(B):
        cuts = np.sort(rng.choice(np.arange(1, T), size=3, replace=False))
        seg[b] = np.searchsorted(cuts, np.arange(T), side="right") + 1
    seg[1, -5:] = 0
    return jnp.asarray(seg)


def _qkv(B, T, N=3, K=24, V=16, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(0), 3)
    return tuple(jax.random.normal(k, (B, T, N, d), dtype) for k, d in zip(ks, (K, K, V)))


def test_doc_starts():
    seg = jnp.array([[1, 1, 2, 2, 2, 3], [1, 2, 2, 0, 0, 0]])
    np.testing.assert_array_equal(ops.doc_starts(seg), [[0, 0, 2, 2, 2, 5], [0, 1, 1, 3, 3, 3]])


@pytest.mark.parametrize("kernels", KERNELS)
def test_causal_attention_within_documents_equals_the_explicit_mask(kernels):
    B, T = 2, 37
    q, k, v = _qkv(B, T)
    seg = _segments(B, T, 0)
    mask = jnp.tril(jnp.ones((T, T), bool))[None] & (seg[:, :, None] == seg[:, None, :])

    def ref(q, k, v):
        return ops.masked_attention(q, k, v, mask, 0.3)

    def got(q, k, v):
        return ops.causal_attention(q, k, v, ops.doc_starts(seg), 0.3, kernels)

    np.testing.assert_allclose(got(q, k, v), ref(q, k, v), rtol=1e-5, atol=1e-5)
    loss = lambda f: lambda *a: (f(*a) * jnp.cos(jnp.arange(16.0))[None, None, None]).sum()  # noqa: E731
    for a, b in zip(jax.grad(loss(got), argnums=(0, 1, 2))(q, k, v), jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_backward_head_pad_shim():
    """`ops._pad_head_to` changes only a head-dim pad to a multiple of 64 of a listed width; other pads (sequence,
    other widths, pad values) are tokamax's."""
    import types
    calls = []
    lib = types.SimpleNamespace(pad_to_next_multiple_of=lambda x, m, axis=0, pad_value=0: calls.append(
        (x.shape, m, axis, pad_value)) or x)
    pad = ops._pad_head_to(lib, {96: 96, 80: 96})
    assert pad(jnp.ones((2, 3, 96)), 64, -1).shape == (2, 3, 96)
    out = pad(jnp.ones((2, 3, 80)), 64, -1, pad_value=0)
    assert out.shape == (2, 3, 96) and not np.asarray(out[..., 80:]).any() and calls == []
    pad(jnp.ones((2, 3, 128)), 64, -1)
    pad(jnp.ones((5, 3, 96)), 8, -3)
    pad(jnp.ones((7,)), 8, -1, pad_value=jnp.inf)
    assert calls == [((2, 3, 128), 64, -1, 0), ((5, 3, 96), 8, -3, 0), ((7,), 8, -1, jnp.inf)]


@needs_tokamax
def test_backward_head_pad_is_installed_and_removed(monkeypatch):
    """TOKAMAX_BWD_HEAD_PAD goes into tokamax's sm90 attention backward as `_tokamax_causal` is traced, and empty
    puts tokamax's own shape module back."""
    from tokamax._src import shape as shape_lib
    from tokamax._src.ops.attention import pallas_mosaic_gpu_vjp_kernel_sm90 as vk
    monkeypatch.setattr(vk, "shape_lib", shape_lib)
    q = jnp.ones((1, 8, 2, 96), jnp.float32)
    v = jnp.ones((1, 8, 2, 64), jnp.float32)
    start = jnp.zeros((1, 8), jnp.int32)
    monkeypatch.setattr(ops, "TOKAMAX_BWD_HEAD_PAD", {96: 96})
    jax.make_jaxpr(lambda q: ops._tokamax_causal(q, q, v, start, 0.1))(q)
    assert vk.shape_lib is not shape_lib and vk.shape_lib.deepjax_head_pad == {96: 96}
    assert vk.shape_lib.pad_to_next_multiple_of(q, 64, -1).shape == q.shape
    assert vk.shape_lib.pad_to_next_multiple_of(v, 64, -1).shape == v.shape
    assert vk.shape_lib.pad_to_next_multiple_of(jnp.ones((2, 112)), 64, -1).shape == (2, 128)
    monkeypatch.setattr(ops, "TOKAMAX_BWD_HEAD_PAD", {})
    jax.make_jaxpr(lambda q: ops._tokamax_causal(q, q, v, start, 0.1))(q)
    assert vk.shape_lib is shape_lib


@needs_tokamax
def test_attention_kernel_configs_reach_tokamax(monkeypatch):
    """TOKAMAX_ATTENTION_FWD_CONFIG / _BWD_CONFIG become the Mosaic GPU op's configs (None: tokamax's shared op and
    its heuristics), `_tokamax_causal` calls the op they build, and a wrong field is one error naming the setting."""
    from tokamax._src.ops.attention import api, pallas_mosaic_gpu_kernel_sm90 as sm90
    from tokamax._src.ops.attention import pallas_mosaic_gpu_vjp_common as vjpc
    assert ops._tokamax_attention_op("mosaic_gpu") is api.IMPLEMENTATIONS["mosaic_gpu"]
    bwd = dict(block_q_dkv=128, block_kv_dkv=64, block_q_dq=64, block_kv_dq=128, num_stages=2, compute_wgs=1)
    monkeypatch.setattr(ops, "TOKAMAX_ATTENTION_BWD_CONFIG", bwd)
    op = ops._tokamax_attention_op("mosaic_gpu")
    assert op.config is None and op.vjp.config == vjpc.Config(**bwd)
    fwd = dict(block_q=64, block_kv=64, num_stages=3, persistent=False)
    monkeypatch.setattr(ops, "TOKAMAX_ATTENTION_FWD_CONFIG", fwd)
    op = ops._tokamax_attention_op("mosaic_gpu")
    assert op.config == sm90.Config(**fwd) and op.vjp.config == vjpc.Config(**bwd)
    assert ops._tokamax_attention_op("xla") is api.IMPLEMENTATIONS["xla"]  # configs are Mosaic GPU's only
    monkeypatch.setattr(ops, "TOKAMAX_ATTENTION_BWD_CONFIG", dict(block_q=64))
    with pytest.raises(ValueError, match="TOKAMAX_ATTENTION_BWD_CONFIG"):
        ops._tokamax_attention_op("mosaic_gpu")

    made = []
    real = ops._tokamax_attention_op
    monkeypatch.setattr(ops, "_tokamax_attention_op", lambda impl: made.append(impl) or real(impl))
    monkeypatch.setattr(ops, "TOKAMAX_ATTENTION_BWD_CONFIG", None)
    q = jnp.ones((1, 8, 2, 96), jnp.float32)
    jax.make_jaxpr(lambda q: ops._tokamax_causal(q, q, q[..., :64], jnp.zeros((1, 8), jnp.int32), 0.1))(q)
    assert made == [ops._impl("attention")]


def test_one_document_per_row():
    """The predicate that sends a batch to tokamax's plain causal kernel: one document in every row only (a row
    with packed documents, or ending in padding, keeps the batch on the document mask)."""
    ones = jnp.ones((2, 9), jnp.int32)
    assert bool(ops.one_document_per_row(ops.doc_starts(ones)))
    assert bool(jax.jit(ops.one_document_per_row)(ops.doc_starts(ones * 7)))
    assert not bool(ops.one_document_per_row(ops.doc_starts(ones.at[1, 5:].set(2))))
    assert not bool(ops.one_document_per_row(ops.doc_starts(ones.at[0, -2:].set(0))))


@needs_tokamax
@pytest.mark.parametrize("packed", [True, False])
def test_tokamax_single_document_branch_equals_the_document_mask(packed):
    """`_tokamax_causal` takes the plain causal kernel at run time when every row is one document: it equals the
    k_start path (and the XLA reference), output and gradients, on packed rows and on one-document rows."""
    B, T = 2, 37
    q, k, v = _qkv(B, T)
    start = ops.doc_starts(_segments(B, T, 2) if packed else jnp.ones((B, T), jnp.int32))
    w = jnp.cos(jnp.arange(B * T * 3 * 16.0)).reshape(B, T, 3, 16)

    def run(f):
        loss = lambda q, k, v: (f(q, k, v) * w).sum()  # noqa: E731
        with jax.numpy_rank_promotion("allow"):
            return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)

    xla = run(lambda q, k, v: ops._xla_causal(q, k, v, start, 0.3))
    branch = run(lambda q, k, v: ops._tokamax_causal(q, k, v, start, 0.3))
    docs = run(lambda q, k, v: ops._tokamax_causal(q, k, v, start, 0.3, single_doc_branch=False))
    for a, b, c in zip(jax.tree.leaves(branch), jax.tree.leaves(docs), jax.tree.leaves(xla)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5)


def test_splash_attention_equals_xla_with_documents():
    """The TPU path (jax's splash kernel, Pallas interpreter here): documents as segment ids (their start
    positions) give the same output and gradients as the XLA reference."""
    B, T, N, K, V = 2, 256, 1, 192, 128
    ks = jax.random.split(jax.random.key(0), 4)
    q, k = jax.random.normal(ks[0], (B, T, N, K)), jax.random.normal(ks[1], (B, T, N, K))
    v, w = jax.random.normal(ks[2], (B, T, N, V)), jax.random.normal(ks[3], (B, T, N, V))
    seg = jnp.concatenate([jnp.ones((B, 100), jnp.int32), jnp.full((B, 120), 2, jnp.int32),
                           jnp.zeros((B, 36), jnp.int32)], 1)
    start = ops.doc_starts(seg)

    def loss(f):
        return lambda q, k, v: (f(q, k, v) * w).sum()

    xla = lambda q, k, v: ops._xla_causal(q, k, v, start, 0.1)  # noqa: E731
    splash = lambda q, k, v: ops.splash_causal(q, k, v, start, 0.1, block=128, interpret=True)  # noqa: E731
    np.testing.assert_allclose(splash(q, k, v), xla(q, k, v), atol=2e-5)
    grads = [jax.grad(loss(f), argnums=(0, 1, 2))(q, k, v) for f in (xla, splash)]
    for a, b in zip(*grads):
        np.testing.assert_allclose(b, a, atol=2e-5 * float(jnp.abs(a).max()))


def test_query_blocks_equal_one_block(monkeypatch):
    B, T = 2, 32
    q, k, v = _qkv(B, T)
    start = ops.doc_starts(_segments(B, T, 1))
    f = jax.jit(lambda q: ops.causal_attention(q, k, v, start, 0.3, "xla"))
    one = f(q)
    monkeypatch.setattr(ops, "Q_BLOCK", 8)
    np.testing.assert_allclose(jax.jit(lambda q: ops.causal_attention(q, k, v, start, 0.3, "xla"))(q), one,
                               rtol=1e-6, atol=1e-6)


def _doc_segments_by_loop(start, M):
    """doc_segments' format by a plain loop over each row's document starts."""
    start = np.asarray(start)
    B, T = start.shape
    seqlen, offsets, n = np.full((B, M), -1), np.full((B, M + 1), -1), np.zeros(B, int)
    for b in range(B):
        starts = [t for t in range(T) if start[b, t] == t]
        ends = starts[1:] + [T]
        n[b] = len(starts)
        for m, (s0, s1) in enumerate(zip(starts[:M], ends[:M])):
            seqlen[b, m], offsets[b, m] = s1 - s0, s0
    return seqlen, offsets, n


@pytest.mark.parametrize("M", [1, 4, 6])
def test_doc_segments_equals_a_loop(M):
    """Rows of 1..M documents at random lengths, one with exactly M, one with more than M (n_docs reports it),
    trailing padding (segment 0, its own document) on one; under jit."""
    rng = np.random.default_rng(M)
    B, T = 7, 40
    n_docs = [1, M, M + 3, 2, 1, M, max(1, M - 1)]
    seg = np.zeros((B, T), np.int32)
    for b, n in enumerate(n_docs):
        cuts = np.sort(rng.choice(np.arange(1, T), size=n - 1, replace=False))
        seg[b] = np.searchsorted(cuts, np.arange(T), side="right") + 1
    seg[4, -6:] = 0  # one document + padding: 2 documents
    start = ops.doc_starts(jnp.asarray(seg))
    got = jax.jit(ops.doc_segments, static_argnums=1)(start, M)
    want = _doc_segments_by_loop(start, M)
    for g, w in zip(got, want):
        assert g.dtype == jnp.int32
        np.testing.assert_array_equal(g, w)
    np.testing.assert_array_equal(got[2], [n + (b == 4) for b, n in enumerate(n_docs)])
    assert int(got[2][2]) > M


def test_doc_segments_format():
    """The layout jax's cuDNN attention takes: 3 documents at 0, 170, 340 with M = 3 -> offsets [0, 170, 340, -1]."""
    seg = jnp.asarray([[1] * 170 + [2] * 170 + [3] * 172, [1] * 190 + [2] * 322])
    seqlen, offsets, n = ops.doc_segments(ops.doc_starts(seg), 3)
    np.testing.assert_array_equal(seqlen, [[170, 170, 172], [190, 322, -1]])
    np.testing.assert_array_equal(offsets, [[0, 170, 340, -1], [0, 190, -1, -1]])
    np.testing.assert_array_equal(n, [3, 2])


def _fake_cudnn(seen):
    """jax's cuDNN `dot_product_attention` (BTNH, PADDING_CAUSAL over packed segments) in XLA, from its seqlen /
    offsets arguments alone: a query attends to the keys at or before it in its own segment."""
    from jax._src.cudnn import fused_attention_stablehlo as fa

    def fake(q, k, v, bias=None, mask=None, q_seqlen=None, kv_seqlen=None, q_offsets=None, kv_offsets=None, *,
             scale=1.0, mask_type=fa.MaskType.NO_MASK, qkv_layout="BTNH", **_):
        assert qkv_layout == "BTNH" and mask_type == fa.MaskType.PADDING_CAUSAL and q.dtype == v.dtype
        seen.append((q.shape[-1], k.shape[-1], v.shape[-1]))
        T = q.shape[1]
        t_T = jnp.arange(T)
        lo_BM, hi_BM = q_offsets[:, :-1], q_offsets[:, :-1] + q_seqlen
        in_BMT = ((t_T[None, None] >= lo_BM[..., None]) & (t_T[None, None] < hi_BM[..., None])
                  & (q_seqlen >= 0)[..., None])
        seg_BT = jnp.where(in_BMT.any(1), jnp.argmax(in_BMT, axis=1), -1 - t_T[None])  # outside all: alone
        mask_BTS = (seg_BT[:, :, None] == seg_BT[:, None, :]) & (t_T[None, None, :] <= t_T[None, :, None])
        return ops._attend(q, k, v, mask_BTS, scale)

    return fake


def test_cudnn_path_plumbing_with_a_fake_kernel(monkeypatch):
    """`_cudnn_causal` on CPU with jax's cuDNN call replaced by an XLA stand-in that reads only the segments: equals
    the XLA path (outputs and gradients) for rows of 1..M documents; a batch with a row of more than M documents
    takes the fallback (the stand-in would merge its documents); V is zero-padded to K's width."""
    from jax._src.cudnn import fused_attention_stablehlo as fa
    seen = []
    monkeypatch.setattr(fa, "dot_product_attention", _fake_cudnn(seen))
    monkeypatch.setattr(ops, "CUDNN_MAX_DOCS", 4)
    B, T, K, V = 3, 24, 24, 16
    q, k, v = _qkv(B, T, K=K, V=V)
    w = jax.random.normal(jax.random.key(5), (B, T, 3, V))
    # each row's document starts after 0; the second batch has 5 > M = 4 documents in row 1, the last one long.
    # With tokamax installed (the Python 3.12 leg) the fallback is tokamax's attention, whose mask broadcasts by
    # rank promotion (conftest raises on it), also when traced under lax.cond
    with jax.numpy_rank_promotion("allow"):
        _check_fake_cudnn_cases(q, k, v, w, T)
    assert set(seen) == {(K, K, K)}


def _check_fake_cudnn_cases(q, k, v, w, T):
    for cuts in ([[], [3, 4, 17], [7, 8]], [[11], [2, 5, 7, 9], []]):
        seg = np.stack([np.searchsorted(c, np.arange(T), side="right") for c in cuts])
        start = ops.doc_starts(jnp.asarray(seg))
        ref = lambda q, k, v: ops._xla_causal(q, k, v, start, 0.3)  # noqa: E731
        got = lambda q, k, v: ops._cudnn_causal(q, k, v, start, 0.3)  # noqa: E731
        np.testing.assert_allclose(jax.jit(got)(q, k, v), ref(q, k, v), rtol=1e-5, atol=1e-5)
        loss = lambda f: lambda *a: (f(*a) * w).sum()  # noqa: E731
        for a, b in zip(jax.jit(jax.grad(loss(got), argnums=(0, 1, 2)))(q, k, v),
                        jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_attention_xla_ignores_kernels():
    """attention=xla is the XLA reference whatever `kernels` says; attention=auto follows kernels."""
    B, T = 2, 37
    q, k, v = _qkv(B, T)
    start = ops.doc_starts(_segments(B, T, 3))
    ref = ops._xla_causal(q, k, v, start, 0.3)
    for kernels in ("xla", "tokamax", "auto"):  # kernels=tokamax without tokamax: attention=xla never resolves it
        np.testing.assert_array_equal(ops.causal_attention(q, k, v, start, 0.3, kernels, "xla"), ref)
    np.testing.assert_array_equal(ops.causal_attention(q, k, v, start, 0.3, "xla", "auto"), ref)
    with pytest.raises(ValueError, match="attention='flash'"):
        ops.causal_attention(q, k, v, start, 0.3, "xla", "flash")


def test_attention_cudnn_off_gpu_names_the_field():
    from deepjax.schema import ConfigError
    B, T = 2, 16
    q, k, v = _qkv(B, T, dtype=jnp.bfloat16)
    start = ops.doc_starts(_segments(B, T, 4))
    with pytest.raises(ConfigError, match=r"model\.attention='cudnn': cuDNN attention runs on CUDA GPUs only"):
        jax.jit(lambda q: ops.causal_attention(q, k, v, start, 0.3, "auto", "cudnn"))(q)


def test_attention_cudnn_under_a_mesh_names_the_field(monkeypatch):
    """Under a mesh of several devices cuDNN attention is refused by name (jax's partitioner does not tie the
    segment arrays to q's rows); a one-device mesh, as `deepjax train` runs on one GPU, is allowed."""
    from deepjax.parallel import sharding as S
    from deepjax.schema import ConfigError
    monkeypatch.setattr(ops, "platform", lambda: "gpu")
    calls = []
    monkeypatch.setattr(ops, "_cudnn_causal", lambda q, *a: calls.append(q.shape) or q[..., :2])
    B, T = 2, 16
    q, k, v = _qkv(B, T, dtype=jnp.bfloat16)
    start = ops.doc_starts(_segments(B, T, 4))
    for n, ok in ((2, False), (1, True)):
        mc = S.MeshConfig(data=n, fsdp=1)
        with S.use_mesh(S.make_mesh(mc, jax.devices()[:n]), S.rules_for(mc.rules)):
            if ok:
                ops.causal_attention(q, k, v, start, 0.3, "auto", "cudnn")
            else:
                with pytest.raises(ConfigError, match=r"model\.attention='cudnn': .*this mesh has 2"):
                    ops.causal_attention(q, k, v, start, 0.3, "auto", "cudnn")
    assert calls == [q.shape]


def test_model_attention_field_reaches_the_op(monkeypatch):
    """ModelConfig.attention is what the model's attention is called with."""
    seen = []
    real = ops.causal_attention

    def spy(*a, **kw):
        seen.append(a[6] if len(a) > 6 else kw.get("attention"))
        return real(*a, **kw)

    monkeypatch.setattr(ops, "causal_attention", spy)
    cfg = dataclasses.replace(presets.tiny(), kernels="xla", attention="xla")
    graphdef, params = M.init(cfg, jax.random.key(0))
    M.forward(graphdef, params, jnp.zeros((1, 8), jnp.int32), None, None)
    assert seen and set(seen) == {"xla"}


# ---- grouped matmul -------------------------------------------------------------------------------------------

GROUPS = [  # (rows, group sizes): empty groups, a one-row group, uneven sizes, rows past sum(sizes)
    (64, [0, 1, 20, 0, 31, 12]),
    (75, [5, 0, 0, 50]),
    (40, [40]),
]


def _per_group(x, w, gs):
    x, w, out, s = np.asarray(x, np.float64), np.asarray(w, np.float64), np.zeros((x.shape[0], w.shape[2])), 0
    for g, n in enumerate(np.asarray(gs)):
        out[s:s + n] = x[s:s + n] @ w[g]
        s += n
    return out


def _per_group_dw(x, dy, gs):
    x, dy, out, s = np.asarray(x, np.float64), np.asarray(dy, np.float64), [], 0
    for n in np.asarray(gs):
        out.append(x[s:s + n].T @ dy[s:s + n])
        s += n
    return np.stack(out)


@pytest.mark.parametrize("M_, sizes", GROUPS)
def test_grouped_dw_kernel_equals_per_group_products(M_, sizes):
    gs = jnp.array(sizes, jnp.int32)
    x = jax.random.normal(jax.random.key(1), (M_, 32))
    dy = jax.random.normal(jax.random.key(2), (M_, 48))
    got = gmm_grad.grouped_dw(x, dy, gs, interpret=True)
    assert got.shape == (len(sizes), 32, 48) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, _per_group_dw(x, dy, gs), rtol=1e-5, atol=1e-4)
    assert not np.asarray(got)[np.asarray(sizes) == 0].any()  # an empty group: exactly zero
    # a bf16 gradient is the float32 accumulation rounded once, at the store
    low = gmm_grad.grouped_dw(x, dy, gs, interpret=True, out_dtype=jnp.bfloat16)
    assert low.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(low, np.float32), np.asarray(got.astype(jnp.bfloat16), np.float32))


def _check_grouped(f, M_, sizes, rtol=1e-5, atol=1e-4):
    """f(x, w, sizes): output and both gradients against per-group float64 products; rows past sum(sizes) zero."""
    gs = jnp.array(sizes, jnp.int32)
    G, K, N = len(sizes), 32, 48
    x = jax.random.normal(jax.random.key(3), (M_, K))
    w = jax.random.normal(jax.random.key(4), (G, K, N))
    dy = jax.random.normal(jax.random.key(5), (M_, N))
    y, vjp = jax.vjp(lambda x, w: f(x, w, gs), x, w)
    dx, dw = vjp(dy)
    used = int(sum(sizes))
    np.testing.assert_allclose(y, _per_group(x, w, gs), rtol=rtol, atol=atol)
    assert not np.asarray(y)[used:].any()
    dy_used = np.asarray(dy).copy()
    dy_used[used:] = 0
    dx_ref = np.zeros((M_, K))
    s = 0
    for g, n in enumerate(sizes):
        dx_ref[s:s + n] = dy_used[s:s + n] @ np.asarray(w, np.float64)[g].T
        s += n
    np.testing.assert_allclose(dx, dx_ref, rtol=rtol, atol=atol)
    np.testing.assert_allclose(dw, _per_group_dw(x, dy_used, gs), rtol=rtol, atol=atol)


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("M_, sizes", GROUPS)
def test_grouped_matmul_and_its_gradients(kernels, M_, sizes):
    _check_grouped(lambda x, w, g: ops.grouped_matmul(x, w, g, kernels), M_, sizes)


@pytest.mark.parametrize("M_, sizes", GROUPS)
def test_grouped_dx_kernel_equals_per_group_products(monkeypatch, M_, sizes):
    """`gmm_grad.grouped_dx` (the input gradient, w read untransposed) and `gmm_grad.grouped_matmul` (the forward by
    the same kernel): each group's rows against w[g], row blocks that straddle groups and empty groups included."""
    gs = jnp.array(sizes, jnp.int32)
    G, K, N = len(sizes), 32, 48
    dy = jax.random.normal(jax.random.key(2), (M_, N))
    w = jax.random.normal(jax.random.key(4), (G, K, N))
    used = int(sum(sizes))
    want = np.zeros((used, K))
    s = 0
    for g, n in enumerate(sizes):
        want[s:s + n] = np.asarray(dy, np.float64)[s:s + n] @ np.asarray(w, np.float64)[g].T
        s += n
    for bm in (64, 8):  # 8: blocks of 8 rows, most groups spanning several and several blocks straddling two
        monkeypatch.setitem(gmm_grad.ROW_TILES, "bm", bm)
        got = np.asarray(gmm_grad.grouped_dx(dy, w, gs, interpret=True))
        assert got.shape == (M_, K)
        np.testing.assert_allclose(got[:used], want, rtol=1e-5, atol=1e-4)
        x = dy[:, :K]  # the forward, the same kernel with w untransposed: [M, K] x [G, K, N]
        y = np.asarray(gmm_grad.grouped_matmul(x, w, gs, interpret=True))
        assert y.shape == (M_, N)
        np.testing.assert_allclose(y[:used], _per_group(x, w, gs)[:used], rtol=1e-5, atol=1e-4)
    assert gmm_grad.grouped_dx(dy[:0], w, gs * 0, interpret=True).shape == (0, K)  # no rows, as lax.ragged_dot
    with pytest.raises(ValueError, match="grouped_dx"):  # dy's width is not w's N: one clear error, no bad read
        gmm_grad.grouped_dx(dy[:, :N - 16], w, gs, interpret=True)
    with pytest.raises(ValueError, match="grouped_dw"):
        gmm_grad.grouped_dw(dy[:, :K], dy, gs, interpret=True, cols=(16, N))


@pytest.mark.parametrize("input_grad", [pytest.param("tokamax", marks=needs_tokamax), "triton"])
@pytest.mark.parametrize("M_, sizes", GROUPS)
def test_pair_custom_vjp_on_cpu(monkeypatch, input_grad, M_, sizes):
    """`ops._grouped_matmul_pair_gpu` (x against the concatenation of two weights without forming it: Triton row
    kernels, `grouped_dw` over each weight's columns), run on CPU through the Pallas interpreter: output and the
    three gradients equal those of the concatenated product."""
    monkeypatch.setattr(ops, "GMM_INPUT_GRAD", input_grad)
    monkeypatch.setitem(gmm_grad.ROW_TILES, "bm", 8)  # several row blocks, some straddling groups
    gs = jnp.array(sizes, jnp.int32)
    G, K, N = len(sizes), 32, 48
    x = jax.random.normal(jax.random.key(3), (M_, K))
    wa = jax.random.normal(jax.random.key(4), (G, K, N))
    wb = jax.random.normal(jax.random.key(6), (G, K, N))
    dy = jax.random.normal(jax.random.key(5), (M_, 2 * N))
    for all_rows in ([False, True] if sum(sizes) == M_ else [False]):
        y, vjp = jax.vjp(lambda x, wa, wb: ops._grouped_matmul_pair_gpu(x, wa, wb, gs, all_rows), x, wa, wb)
        y0, vjp0 = jax.vjp(lambda x, wa, wb: jax.lax.ragged_dot(x, jnp.concatenate([wa, wb], -1), gs), x, wa, wb)
        np.testing.assert_allclose(y, y0, rtol=1e-5, atol=1e-4)
        assert not np.asarray(y)[int(sum(sizes)):].any()
        for a, b in zip(vjp(dy), vjp0(dy)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("gather,scatter", [(True, False), (False, True), (True, True)])
def test_grouped_matmul_rows_equals_sorted_copy(monkeypatch, gather, scatter):
    """`gmm_grad.grouped_matmul_rows` (the experts' gate / up product with x's rows gathered in the Triton kernels)
    and `gmm_grad.grouped_matmul_unsorted` (the down product stored in token order, its gradients reading the
    token-order cotangent by index), run here in the Pallas interpreter inside `moe.routed_experts_dropless`: the
    output and every gradient equal the path through `moe.sorted_tokens`' copy and `moe.unsort_sum`'s gather;
    `gathers_rows` and `scatters_rows` keep them off the CPU's products."""
    from deepjax.model import moe
    monkeypatch.setitem(gmm_grad.ROW_TILES, "bm", 8)  # several row blocks, some straddling experts
    T, A, E, D, I = 30, 3, 5, 32, 16
    rng = np.random.default_rng(4)
    # distinct experts a token, expert 0 on every even token (skewed: groups of different sizes)
    idx = jnp.asarray(np.stack([np.r_[0, rng.permutation(np.arange(1, E))[:A - 1]] if t % 2 == 0 else
                                rng.permutation(E)[:A] for t in range(T)]), jnp.int32)
    ks = jax.random.split(jax.random.key(0), 6)
    x, w = jax.random.normal(ks[0], (T, D)), jax.random.uniform(ks[1], (T, A))
    wg, wu = jax.random.normal(ks[2], (E, D, I)) * 0.2, jax.random.normal(ks[3], (E, D, I)) * 0.2
    wd, ct = jax.random.normal(ks[4], (E, I, D)) * 0.2, jax.random.normal(ks[5], (T, D))
    gmm = lambda x, w, g: ops.grouped_matmul(x, w, g, "xla")  # noqa: E731

    def loss(new, x, w, wg, wu, wd):
        rows = (lambda x, r, i, g: gmm_grad.grouped_matmul_rows(x, r, i, wg, wu, g)) if new and gather else None  # noqa
        y = moe.routed_experts_dropless(x, w, idx, wg, wu, wd, ragged_dot=gmm, pairs=True, rows_product=rows,
                                        unsorted_product=gmm_grad.grouped_matmul_unsorted if new and scatter else None)
        return jnp.sum(y * ct), y

    (l1, y1), g1 = jax.value_and_grad(functools.partial(loss, True), argnums=range(5), has_aux=True)(x, w, wg, wu, wd)
    (l0, y0), g0 = jax.value_and_grad(functools.partial(loss, False), argnums=range(5), has_aux=True)(x, w, wg, wu, wd)
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)
    for a, b in zip(g1, g0):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert not ops.gathers_rows(x.astype(jnp.bfloat16), T * A, wg, wu, "auto")  # CPU: the copy
    monkeypatch.setattr(ops, "SCATTER_ROWS", True)
    assert not ops.scatters_rows(x.astype(jnp.bfloat16), T * A, wd, "auto")  # CPU: the unsort


def test_grouped_matmul_takes_pairs(monkeypatch):
    """`ops.grouped_matmul` with a pair of weights is the product with their concatenation on the XLA path, and
    `moe.grouped_swiglu(pairs=True)` hands it the pair."""
    from deepjax.model import moe
    monkeypatch.setattr(ops, "LARGE_GROUP_ROWS", 1)  # gate and up as one product from 1 row a group
    gs = jnp.array([3, 0, 5], jnp.int32)
    x = jax.random.normal(jax.random.key(0), (8, 16))
    wg, wu = (jax.random.normal(jax.random.key(i), (3, 16, 8)) for i in (1, 2))
    wd = jax.random.normal(jax.random.key(3), (3, 8, 16))
    np.testing.assert_allclose(ops.grouped_matmul(x, (wg, wu), gs, "xla"),
                               jax.lax.ragged_dot(x, jnp.concatenate([wg, wu], -1), gs), rtol=1e-6)
    seen = []

    def gmm(x, w):
        seen.append(type(w))
        return ops.grouped_matmul(x, w, gs, "xla")
    got = moe.grouped_swiglu(x, wg, wu, wd, gmm, pairs=True)
    want = moe.grouped_swiglu(x, wg, wu, wd, lambda x, w: jax.lax.ragged_dot(x, w, gs))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert seen[0] is tuple, seen  # gate and up as a pair, then down


def test_grouped_matmul_kernel_choices(monkeypatch):
    """GMM_FORWARD / GMM_INPUT_GRAD: "triton" takes the row kernels for pairs and single weights, "pairs" for pairs
    only, "tokamax" for neither; another value is one error naming the setting."""
    for value, single, pair in (("triton", True, True), ("pairs", False, True), ("tokamax", False, False)):
        for name in ("GMM_FORWARD", "GMM_INPUT_GRAD"):
            monkeypatch.setattr(ops, name, value)
            assert (ops._gmm_choice(name, False), ops._gmm_choice(name, True)) == (single, pair), (name, value)
    monkeypatch.setattr(ops, "LARGE_GROUP_ROWS", 1)
    x = jnp.zeros((64, 32), jnp.bfloat16)
    w = jnp.zeros((2, 32, 16), jnp.bfloat16)
    monkeypatch.setattr(ops, "GMM_FORWARD", "pairs")
    assert ops._pair_on_triton(x, w, w)
    monkeypatch.setattr(ops, "GMM_FORWARD", "tokamax")
    assert not ops._pair_on_triton(x, w, w)
    monkeypatch.setattr(ops, "GMM_INPUT_GRAD", "Triton")
    with pytest.raises(ValueError, match="GMM_INPUT_GRAD='Triton'"):
        ops._gmm_choice("GMM_INPUT_GRAD", True)
    with pytest.raises(ValueError, match="GMM_INPUT_GRAD='Triton'"):  # on every platform, not only the GPU's
        ops.grouped_matmul(x, w, jnp.array([32, 32], jnp.int32), "xla")


@needs_tokamax
@pytest.mark.parametrize("input_grad", ["tokamax", "triton"])
@pytest.mark.parametrize("M_, sizes", GROUPS)
def test_gpu_custom_vjp_wiring_on_cpu(monkeypatch, input_grad, M_, sizes):
    """The GPU path's custom VJP (output and input gradient from tokamax or gmm_grad's Triton row kernels,
    `gmm_grad.grouped_dw` weight gradient), run on CPU through tokamax's XLA implementation and the Pallas
    interpreter."""
    monkeypatch.setattr(ops, "GMM_INPUT_GRAD", input_grad)
    monkeypatch.setattr(ops, "GMM_FORWARD", input_grad)
    monkeypatch.setattr(ops, "LARGE_GROUP_ROWS", 1)  # the forward's switch applies from 1 row a group on
    _check_grouped(lambda x, w, g: ops._grouped_matmul_gpu(x, w, g, False), M_, sizes)
    if sum(sizes) == M_:  # groups over every row: the zeroing of rows past them is skipped, same results
        _check_grouped(lambda x, w, g: ops._grouped_matmul_gpu(x, w, g, True), M_, sizes)


@needs_tokamax
@pytest.mark.parametrize("gmm,rows", [("triton", False), ("triton", True), ("tokamax", False)])
def test_gpu_train_step_lowers_with_its_kernels(monkeypatch, gmm, rows):
    """The training step's GPU program, the paths `kernels=auto` takes on a GPU (tokamax's Mosaic attention and ragged
    dot, gmm_grad's Triton kernels, the layers as a Python loop), lowers for CUDA on this CPU machine (tokamax's
    cross-compile mode, an sm90 device assumed). A kernel that no longer lowers, or a dispatch that stops reaching
    one, fails here before any GPU run. The loop calls one jitted layer: each kernel appears once, whatever the
    number of layers."""
    from deepjax.train import optim, step as TS
    from deepjax.train.config import OptimConfig
    from tokamax._src import config as tokamax_config, gpu_utils
    monkeypatch.setattr(ops, "platform", lambda: "gpu")
    monkeypatch.setattr(gmm_grad, "on_gpu", lambda: True)
    monkeypatch.setattr(gpu_utils, "_compute_capability", lambda device=None: 9.0)
    monkeypatch.setattr(ops, "LARGE_GROUP_ROWS", 1)  # the small batch's experts take the training paths
    monkeypatch.setattr(ops, "GMM_FORWARD", gmm)
    monkeypatch.setattr(ops, "GMM_INPUT_GRAD", gmm)
    # rows: the gate / up product reading the tokens' rows, the down product storing them back: the same kernels
    monkeypatch.setattr(ops, "GATHER_ROWS", rows)
    monkeypatch.setattr(ops, "SCATTER_ROWS", rows)
    taken = []
    monkeypatch.setattr(gmm_grad, "grouped_matmul_rows", lambda *a: taken.append("rows") or ops_rows(*a))
    monkeypatch.setattr(gmm_grad, "grouped_matmul_unsorted", lambda *a: taken.append("unsorted") or ops_unsorted(*a))
    cfg = dataclasses.replace(presets.bench(), num_hidden_layers=3, vocab_size=512, dtype="bfloat16",
                              param_dtype="bfloat16", remat="none", layer_loop="python", kernels="auto")
    graphdef, params = M.abstract_init(cfg)[:2]
    optimizer, schedule = optim.make_optimizer(OptimConfig(), TS.split_params(params)[0], 10)
    state = jax.eval_shape(lambda p: TS.init_state(p, optimizer, 0), params)
    B, T = 2, 256
    row = jax.ShapeDtypeStruct((B, T), jnp.int32)
    step = jax.jit(TS.make_train_step(graphdef, cfg, optimizer, schedule), donate_argnums=0)
    # an H100 for the Triton lowering (jax's abstract device, as for ahead-of-time compiles)
    h100 = jax.sharding.AbstractMesh((1,), ("data",), (jax.sharding.AxisType.Auto,), abstract_device=(
        jax.sharding.AbstractDevice("NVIDIA H100 80GB HBM3", None, "cuda")))
    with tokamax_config.cross_compile(True), jax.sharding.use_abstract_mesh(h100):
        text = step.trace(state, TS.Batch(row, row, row)).lower(lowering_platforms=("cuda",)).as_text()
    triton = collections.Counter(re.findall(r'name = "(\w+)"', text))
    # forward: gate / up (a pair: two calls) and down; backward: their input gradients (one call for the pair) and
    # the three weight gradients; on tokamax's rows only the weight gradients are Triton's (gate / up concatenated)
    want = {"grouped_matmul": 3, "grouped_dx": 2, "grouped_dw": 3} if gmm == "triton" else {"grouped_dw": 2}
    assert dict(triton) == want, triton
    assert sorted(set(taken)) == (["rows", "unsorted"] if rows else []), taken
    assert text.count("custom_call @__gpu$xla.gpu.triton") == sum(want.values())
    assert text.count("custom_call @mosaic_gpu") >= (6 if gmm == "triton" else 10)  # attention (+ ragged dots)


# ---- LM head + cross-entropy ----------------------------------------------------------------------------------

@pytest.mark.parametrize("T", [5, 24])
def test_lm_head_ce_equals_full_logits(monkeypatch, T):
    monkeypatch.setattr(ops, "CE_CHUNK_TOKENS", 8)  # several chunks, the last one padded at T = 5 x B = 2
    B, D, V = 2, 16, 40
    h = jax.random.normal(jax.random.key(6), (B, T, D))
    w = jax.random.normal(jax.random.key(7), (D, V)) * 0.3
    t = jax.random.randint(jax.random.key(8), (B, T), 0, V)
    wt = jax.random.uniform(jax.random.key(9), (B, T)) * (jnp.arange(T) % 3 != 0)[None]

    def ref(h, w):
        return (optax.softmax_cross_entropy_with_integer_labels(h @ w, t) * wt).sum()

    got = lambda h, w: ops.lm_head_ce(h, w, t, wt)  # noqa: E731
    np.testing.assert_allclose(got(h, w), ref(h, w), rtol=1e-5)
    for a, b in zip(jax.grad(got, argnums=(0, 1))(h, w), jax.grad(ref, argnums=(0, 1))(h, w)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("T,dtype", [(5, jnp.float32), (24, jnp.float32), (24, jnp.bfloat16)])
def test_lm_head_logprobs_equal_full_logits(monkeypatch, T, dtype):
    """Chunked log-probs and entropy equal log_softmax over the whole [B, T, V] logits (rounded to h's dtype as
    Transformer.logits rounds them), and so does the gradient of a nonlinear function of the log-probs, through the
    recomputing backward; the entropy has no gradient."""
    monkeypatch.setattr(ops, "CE_CHUNK_TOKENS", 8)  # several chunks, the last one padded at T = 5 x B = 2
    B, D, V, tau = 2, 16, 40, 0.7
    h = (jax.random.normal(jax.random.key(6), (B, T, D))).astype(dtype)
    w = (jax.random.normal(jax.random.key(7), (D, V)) * 0.3).astype(dtype)
    t = jax.random.randint(jax.random.key(8), (B, T), 0, V)
    c = jax.random.normal(jax.random.key(9), (B, T))

    def ref(h, w):
        lp_BTV = jax.nn.log_softmax((h @ w).astype(jnp.float32) / tau, -1)
        return jnp.take_along_axis(lp_BTV, t[..., None], -1)[..., 0], -(jnp.exp(lp_BTV) * lp_BTV).sum(-1)

    got = lambda h, w: ops.lm_head_logprobs(h, w, t, tau)  # noqa: E731
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=2e-3, atol=2e-3)
    for a, b in zip(got(h, w), ref(h, w)):
        np.testing.assert_allclose(a, b, **tol)
    f = lambda fn: lambda h, w: (jnp.exp(fn(h, w)[0]) * c).sum()  # noqa: E731  (a nonlinear use of logp)
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == jnp.float32 else dict(rtol=3e-2, atol=3e-2)
    for a, b in zip(jax.grad(f(got), argnums=(0, 1))(h, w), jax.grad(f(ref), argnums=(0, 1))(h, w)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **tol)
    g = jax.grad(lambda h: got(h, w)[1].sum())(h)
    assert not np.asarray(g, np.float32).any()
    dh, dw = jax.grad(f(got), argnums=(0, 1))(h, w.astype(jnp.float32))  # mixed dtypes: each gradient in its own
    assert dh.dtype == h.dtype and dw.dtype == jnp.float32


def test_lm_head_logprobs_backward_keeps_the_forward_logits(monkeypatch):
    """With 16-bit logits under ops.KEEP_LOGITS_MAX_BYTES the backward takes the forward's logits (no head product
    recomputed: one product fewer in the gradient's jaxpr) and gives the recomputing backward's gradients bit for
    bit; float32 logits are recomputed."""
    monkeypatch.setattr(ops, "CE_CHUNK_TOKENS", 8)
    B, T, D, V, tau = 2, 11, 16, 40, 0.7
    h = jax.random.normal(jax.random.key(6), (B, T, D)).astype(jnp.bfloat16)
    w = (jax.random.normal(jax.random.key(7), (D, V)) * 0.3).astype(jnp.bfloat16)
    t = jax.random.randint(jax.random.key(8), (B, T), 0, V)
    c = jax.random.normal(jax.random.key(9), (B, T))

    def grads(limit):
        monkeypatch.setattr(ops, "KEEP_LOGITS_MAX_BYTES", limit)
        f = lambda h, w: (jnp.exp(ops.lm_head_logprobs(h, w, t, tau)[0]) * c).sum()  # noqa: E731
        g = jax.grad(f, argnums=(0, 1))
        products = sum(1 for e in _all_eqns(jax.make_jaxpr(g)(h, w).jaxpr) if e.primitive.name == "dot_general")
        return jax.jit(g)(h, w), products

    (kept, n_kept), (again, n_again) = grads(1 << 30), grads(0)
    monkeypatch.setattr(ops, "KEEP_LOGITS_MAX_BYTES", 1 << 30)
    assert ops._keeps_logits(h, w) and not ops._keeps_logits(h.astype(jnp.float32), w)
    assert n_kept == n_again - 1, (n_kept, n_again)
    for a, b in zip(kept, again):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def _all_eqns(jaxpr):
    for e in jaxpr.eqns:
        yield e
        for v in e.params.values():
            for sub in (v if isinstance(v, (list, tuple)) else [v]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _all_eqns(inner)


# ---- the model through the seam -------------------------------------------------------------------------------

@needs_tokamax
def test_model_on_tokamax_equals_xla():
    """The tiny model's logits and parameter gradients with kernels=tokamax (its XLA implementations on CPU, the
    custom VJP, the k_start mask) equal kernels=xla, with packed documents."""
    cfg = dataclasses.replace(presets.tiny(), initializer_range=0.2)
    graphdef, params = M.init(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 32), 0, cfg.vocab_size)
    seg = _segments(2, 32, 2)

    def loss(params, kernels):
        g = M.abstract_init(dataclasses.replace(cfg, kernels=kernels))[0]
        out = M.forward(g, params, tokens, None, seg)
        return (out.logits ** 2).mean(), out.logits

    (l1, x1), g1 = jax.value_and_grad(loss, has_aux=True)(params, "xla")
    with jax.numpy_rank_promotion("allow"):  # tokamax's mask broadcasts by rank promotion, also in its backward
        (l2, x2), g2 = jax.value_and_grad(loss, has_aux=True)(params, "tokamax")
    np.testing.assert_allclose(x2, x1, rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)


def test_resolve(monkeypatch):
    assert ops.resolve("xla") == "xla"
    assert ops.resolve("auto") == "xla"  # CPU is not in AUTO_TOKAMAX
    monkeypatch.setattr(ops, "AUTO_TOKAMAX", frozenset({"cpu"}))
    assert ops.resolve("auto", jnp.float32) == ("tokamax" if has_tokamax else "xla")
    if has_tokamax:
        assert ops.resolve("tokamax") == "tokamax"
    else:
        with pytest.raises(ImportError, match="tokamax is not installed"):
            ops.resolve("tokamax")
    with pytest.raises(ValueError, match="kernels='bogus'"):
        ops.resolve("bogus")


def test_auto_takes_the_kernels_on_gpu_for_bf16_only(monkeypatch):
    """kernels=auto on a GPU: tokamax for bf16 operands (its kernels passed tests/test_gpu_ops.py there), XLA for
    float32 (its Mosaic GPU kernels take none) and wherever tokamax does not import."""
    monkeypatch.setattr(ops, "platform", lambda: "gpu")
    assert ops.resolve("auto", jnp.bfloat16) == ("tokamax" if has_tokamax else "xla")
    assert ops.resolve("auto", jnp.float32) == "xla"
    monkeypatch.setattr(ops, "platform", lambda: "tpu")
    assert ops.resolve("auto", jnp.bfloat16) == "xla"  # compiled for v5p, never run on one


def test_lm_head_ce_chunks_count_tokens_per_device(monkeypatch):
    """CE_CHUNK_TOKENS is per device: under a mesh that splits the batch 8 ways, 8 rows of 64 tokens with 64
    tokens per chunk are one chunk per device, not 8 (the global batch read as one device's made DeepSeek-V3 on
    512 chips take 512 chunks, each all-reducing a [D, V] float32 weight-gradient partial)."""
    from deepjax.parallel import sharding as S
    monkeypatch.setattr(ops, "CE_CHUNK_TOKENS", 64)
    B, T, D, V = 8, 64, 16, 32
    h, w = jnp.ones((B, T, D)), jnp.ones((D, V))
    tgt, wt = jnp.zeros((B, T), jnp.int32), jnp.ones((B, T))

    def scan_lengths(f):
        jaxpr = jax.make_jaxpr(jax.grad(f))(h, w, tgt, wt)
        found = []

        def walk(j):
            for e in j.eqns:
                if e.primitive.name == "scan":
                    found.append(e.params["length"])
                for p in e.params.values():
                    if hasattr(p, "jaxpr"):
                        walk(p.jaxpr if hasattr(p.jaxpr, "eqns") else p.jaxpr.jaxpr)
        walk(jaxpr.jaxpr)
        return found

    assert scan_lengths(ops.lm_head_ce) == [8]  # one device: 64 tokens a chunk over 8 rows, 8 chunks
    mesh = S.make_mesh(S.MeshConfig(data=8, fsdp=1))
    with S.use_mesh(mesh, S.rules_for(S.MeshConfig().rules)):
        assert scan_lengths(ops.lm_head_ce) == [1]  # one row per device: the whole row is one chunk

"""The kernel seam on the GPU (deepjax/model/ops.py with tokamax; skipped without a GPU or tokamax), against float32
/ float64 references computed in the same process:

- grouped matmul in bf16 (tokamax's kernels or gmm_grad's Triton row kernels; a pair of weights without their
  concatenation): output, dx and dW against per-group float64 products of the same bf16 values, on empty,
  one-row and uneven groups and rows past sum(group_sizes) (which must come out zero); and tokamax's own bf16
  weight gradient, which this path replaces, must fail the same check (if a tokamax release fixes it, this test
  says so);
- causal attention within packed documents: tokamax's Mosaic kernel with the per-query k_start mask against the
  XLA path in float32, outputs and gradients, several documents per row at odd lengths, and one document per row
  (the plain causal kernel `ops._tokamax_causal` takes then);
- cuDNN's packed (segments) flash attention, `ops._cudnn_causal` (model.attention=cudnn), in bf16 against the
  XLA path in float32, outputs and gradients: one and three documents per row, and a batch with a row of more than
  CUDNN_MAX_DOCS documents (the tokamax fallback);
- the bench preset's training loss and gradients in bf16, kernels=tokamax and kernels=xla each against the
  float32 XLA reference.

    JAX_PLATFORMS=cuda PYTHONPATH=. python -m pytest -q -m gpu tests/test_gpu_ops.py
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepjax import model as M
from deepjax.model import ops, presets

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    jax.default_backend() != "gpu" or ops._tokamax() is None,
    reason="needs a CUDA GPU (JAX_PLATFORMS=cuda on the device machine) and tokamax")]

# (rows, group sizes) at the bench preset's expert widths: empty groups, a one-row group, uneven sizes, and 77 rows
# past the groups' end
M_ROWS, K_IN, N_OUT = 4096, 1024, 512
SIZES = [0, 1, 700, 0, 1203, 64, 5, 0, 1000, 1, 333, 711]


def _data():
    sizes = jnp.array(SIZES, jnp.int32)
    ks = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(ks[0], (M_ROWS, K_IN), jnp.bfloat16)
    w = (jax.random.normal(ks[1], (len(SIZES), K_IN, N_OUT)) * K_IN ** -0.5).astype(jnp.bfloat16)
    dy = jax.random.normal(ks[2], (M_ROWS, N_OUT), jnp.bfloat16)
    return x, w, sizes, dy


def _references(x, w, dy):
    """float64 per-group products of the bf16 values: y, dx (dy zero past the groups), dW."""
    x64, w64, dy64 = (np.asarray(a, np.float64) for a in (x, w, dy))
    used = sum(SIZES)
    dy64[used:] = 0
    y, dx, dw, s = np.zeros((M_ROWS, N_OUT)), np.zeros((M_ROWS, K_IN)), [], 0
    for g, n in enumerate(SIZES):
        y[s:s + n] = x64[s:s + n] @ w64[g]
        dx[s:s + n] = dy64[s:s + n] @ w64[g].T
        dw.append(x64[s:s + n].T @ dy64[s:s + n])
        s += n
    return y, dx, np.stack(dw)


def _errors(f):
    """Largest error of y, dx, dW relative to the reference's largest entry, and y / dx past the groups."""
    x, w, sizes, dy = _data()
    y, vjp = jax.vjp(lambda x, w: f(x, w, sizes), x, w)
    dx, dw = jax.jit(vjp)(dy)
    ref = _references(x, w, dy)
    rel = [float(np.abs(np.asarray(a, np.float64) - r).max() / np.abs(r).max()) for a, r in zip((y, dx, dw), ref)]
    used = sum(SIZES)
    past = float(max(np.abs(np.asarray(y, np.float32)[used:]).max(), np.abs(np.asarray(dx, np.float32)[used:]).max()))
    return rel, past


@pytest.mark.parametrize("input_grad", ["tokamax", "triton"])
def test_grouped_matmul_bf16_output_and_gradients(monkeypatch, input_grad):
    """input_grad: ops.GMM_FORWARD and GMM_INPUT_GRAD, tokamax's kernels (the gradient against the transposed
    weights) or gmm_grad's Triton row kernels."""
    monkeypatch.setattr(ops, "GMM_INPUT_GRAD", input_grad)
    monkeypatch.setattr(ops, "GMM_FORWARD", input_grad)
    monkeypatch.setattr(ops, "LARGE_GROUP_ROWS", 1)  # the test's 4,096 rows take the forward's switch too
    rel, past = _errors(lambda x, w, g: ops.grouped_matmul(x, w, g, "tokamax"))
    print("grouped_matmul relative errors y, dx, dW:", rel)
    assert max(rel) < 1e-2, rel  # bf16 outputs: relative rounding 2^-8
    assert past == 0.0


@pytest.mark.parametrize("input_grad", ["tokamax", "triton"])
def test_grouped_matmul_pair_bf16(monkeypatch, input_grad):
    """A pair of weights (w's two column halves) through `ops._grouped_matmul_pair_gpu` (GMM_FORWARD triton: no
    concatenation), the same check as the joined product's."""
    monkeypatch.setattr(ops, "GMM_FORWARD", "triton")
    monkeypatch.setattr(ops, "GMM_INPUT_GRAD", input_grad)
    monkeypatch.setattr(ops, "LARGE_GROUP_ROWS", 1)
    half = N_OUT // 2

    def f(x, w, g):
        return ops.grouped_matmul(x, (w[..., :half], w[..., half:]), g, "tokamax")
    rel, past = _errors(f)
    print("pair relative errors y, dx, dW:", rel)
    assert max(rel) < 1e-2, rel
    assert past == 0.0


@pytest.mark.parametrize("gather,scatter", [(True, False), (False, True), (True, True)])
def test_grouped_matmul_rows_bf16_equals_sorted_copy(monkeypatch, gather, scatter):
    """`gmm_grad.grouped_matmul_rows` (the experts' gate / up product with the tokens' rows gathered in the Triton
    kernels) and `gmm_grad.grouped_matmul_unsorted` (the down product stored in token order) inside the routed experts
    at the bench preset's widths, bf16: output and gradients against the path through `moe.sorted_tokens`' copy
    and `moe.unsort_sum`'s gather (the same kernels on the same values: equal up to the reduction order of x's
    gradient), both through `moe.routed_experts`."""
    from deepjax.model import moe
    T, A, E, D, I = 4096, 6, 64, 1024, 512  # (T * A >= ops.LARGE_GROUP_ROWS * E: the training paths)
    ks = jax.random.split(jax.random.key(1), 7)
    idx = jnp.argsort(jax.random.uniform(ks[0], (T, E)), axis=1)[:, :A].astype(jnp.int32)
    w = jax.random.uniform(ks[1], (T, A))
    x = jax.random.normal(ks[2], (T, D), jnp.bfloat16)
    wg, wu = ((jax.random.normal(k, (E, D, I)) * D ** -0.5).astype(jnp.bfloat16) for k in ks[3:5])
    wd = (jax.random.normal(ks[5], (E, I, D)) * I ** -0.5).astype(jnp.bfloat16)
    ct = jax.random.normal(ks[6], (T, D), jnp.bfloat16)
    monkeypatch.setattr(ops, "GATHER_ROWS", True)
    monkeypatch.setattr(ops, "SCATTER_ROWS", True)
    assert ops.gathers_rows(x, T * A, wg, wu, "tokamax")
    assert ops.scatters_rows(x, T * A, wd, "tokamax")

    def loss(x, w, wg, wu, wd):
        return jnp.sum((moe.routed_experts(x, w, idx, wg, wu, wd, kernels="tokamax") * ct).astype(jnp.float32))

    def run(gather, scatter):  # a new jit each time: the settings are read while tracing
        monkeypatch.setattr(ops, "GATHER_ROWS", gather)
        monkeypatch.setattr(ops, "SCATTER_ROWS", scatter)
        return jax.jit(jax.value_and_grad(loss, argnums=range(5)))(x, w, wg, wu, wd)

    (l1, g1), (l0, g0) = run(gather, scatter), run(False, False)
    assert np.isfinite(float(l1)) and abs(float(l1) - float(l0)) <= 1e-3 * abs(float(l0)) + 1e-3
    for name, a, b in zip(("x", "w", "gate", "up", "down"), g1, g0):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        rel = np.abs(a - b).max() / np.abs(b).max()
        print(f"gather {gather} scatter {scatter} vs the sorted copy, d{name}: max rel {rel:.2e}")
        assert rel < 1e-2, (name, rel)


def test_tokamax_own_weight_gradient_fails_the_same_check():
    """Why `ops` replaces tokamax's own VJP: the same check on tokamax.ragged_dot's own kernels fails (on the H200
    its bf16 dW was off by ~20%; on the H100, tokamax 0.0.17, y and dx came out NaN and dW 20% off). If a release
    fixes it, this test says so."""
    rel, _ = _errors(lambda x, w, g: ops._tokamax().ragged_dot(x, w, g, implementation="mosaic"))
    print("tokamax.ragged_dot relative errors y, dx, dW:", rel)
    assert not all(np.isfinite(r) and r < 1e-2 for r in rel), rel


def _segments(B, T, seed):
    rng = np.random.default_rng(seed)
    seg = np.zeros((B, T), np.int32)
    for b in range(B):
        cuts = np.sort(rng.choice(np.arange(1, T), size=5, replace=False))
        seg[b] = np.searchsorted(cuts, np.arange(T), side="right") + 1
    return jnp.asarray(seg)


@pytest.mark.parametrize("T,packed", [(256, True), (2048, True), (2048, False)])
def test_packed_causal_attention_kernel_equals_xla(T, packed):
    """packed: six documents per row (tokamax's k_start mask); else one per row (its plain causal kernel)."""
    B, N, K, V = 2, 16, 96, 64  # MLA's head dims at the bench preset: q/k 64 + 32, v 64
    ks = jax.random.split(jax.random.key(1), 4)
    q, k = (jax.random.normal(kk, (B, T, N, K), jnp.bfloat16) for kk in ks[:2])
    v = jax.random.normal(ks[2], (B, T, N, V), jnp.bfloat16)
    do = jax.random.normal(ks[3], (B, T, N, V), jnp.float32)
    start = ops.doc_starts(_segments(B, T, T) if packed else jnp.ones((B, T), jnp.int32))

    def run(kernels, dtype):
        f = lambda q, k, v: ops.causal_attention(q, k, v, start, K ** -0.5, kernels)  # noqa: E731
        o, vjp = jax.vjp(f, *(a.astype(dtype) for a in (q, k, v)))
        return (o, *vjp(do.astype(dtype)))

    ref = [np.asarray(a, np.float64) for a in run("xla", jnp.float32)]
    got = [np.asarray(a, np.float64) for a in run("tokamax", jnp.bfloat16)]
    rel = [float(np.abs(a - r).max() / np.abs(r).max()) for a, r in zip(got, ref)]
    print(f"attention T={T} packed={packed} relative errors o, dq, dk, dv:", rel)
    assert max(rel) < 2e-2, rel


def _docs(B, T, n_docs, seed):
    """Segment ids with n_docs[b] documents at random lengths in row b."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((B, T), np.int32)
    for b, n in enumerate(n_docs):
        cuts = np.sort(rng.choice(np.arange(1, T), size=n - 1, replace=False))
        seg[b] = np.searchsorted(cuts, np.arange(T), side="right") + 1
    return jnp.asarray(seg)


def _cudnn_errors(n_docs):
    """Largest errors of o, dq, dk, dv of `ops._cudnn_causal` in bf16 relative to XLA's float32 on the same values:
    B 2, T 1024, N 4, K 96, V 64 (MLA's head dims at the bench preset), n_docs[b] documents in row b."""
    B, T, N, K, V = 2, 1024, 4, 96, 64
    ks = jax.random.split(jax.random.key(2), 4)
    q, k = (jax.random.normal(kk, (B, T, N, K), jnp.bfloat16) for kk in ks[:2])
    v = jax.random.normal(ks[2], (B, T, N, V), jnp.bfloat16)
    do = jax.random.normal(ks[3], (B, T, N, V), jnp.float32)
    start = ops.doc_starts(_docs(B, T, n_docs, sum(n_docs)))
    assert list(ops.doc_segments(start, min(ops.CUDNN_MAX_DOCS, T))[2]) == list(n_docs)

    def run(f, dtype):
        o, vjp = jax.vjp(lambda q, k, v: f(q, k, v, start, K ** -0.5), *(a.astype(dtype) for a in (q, k, v)))
        return (o, *vjp(do.astype(dtype)))

    with jax.default_matmul_precision("highest"):
        ref = [np.asarray(a, np.float64) for a in jax.jit(run, static_argnums=(0, 1))(ops._xla_causal, jnp.float32)]
    got = jax.jit(run, static_argnums=(0, 1))(ops._cudnn_causal, jnp.bfloat16)
    assert got[0].dtype == jnp.bfloat16 and got[0].shape == (B, T, N, V)
    got = [np.asarray(a, np.float64) for a in got]
    rel = [float(np.abs(a - r).max() / np.abs(r).max()) for a, r in zip(got, ref)]
    print(f"cudnn attention docs {n_docs} relative errors o, dq, dk, dv:", rel)
    return rel


@pytest.mark.parametrize("n_docs", [(1, 1), (3, 3), (3, ops.CUDNN_MAX_DOCS + 4)])
def test_cudnn_packed_causal_attention_equals_xla(n_docs):
    """cuDNN flash attention over packed documents (V zero-padded to K's width), bf16, against
    XLA in float32; the last case has a row of more than CUDNN_MAX_DOCS documents (the tokamax fallback)."""
    rel = _cudnn_errors(n_docs)
    assert max(rel) < 2e-2, rel


def _rel_l2(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / (np.linalg.norm(b) + 1e-30))


def test_bench_training_gradients_on_tokamax_equal_xla():
    """The bench preset (3 layers, packed documents) in bf16: the loss and every parameter gradient with
    kernels=tokamax and kernels=xla, each against the float32 XLA reference (same parameters). bf16 rounding flips
    some tokens' expert choices, so neither bf16 path equals the reference; the kernels must be no further from it
    than XLA's own bf16 path (relative L2 per parameter, within 1.5x + 0.01)."""
    cfg = dataclasses.replace(presets.bench(), num_hidden_layers=3, dtype="bfloat16")
    graphdef, params = M.init(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 512), 0, cfg.vocab_size)
    seg = _segments(2, 512, 7)

    def loss(params, kernels, dtype):
        g = M.abstract_init(dataclasses.replace(cfg, kernels=kernels, dtype=dtype))[0]
        out = M.forward(g, params, tokens, None, seg)
        return jax.nn.logsumexp(out.logits.astype(jnp.float32), -1).mean()

    step = jax.jit(jax.value_and_grad(loss), static_argnums=(1, 2))
    with jax.default_matmul_precision("highest"):
        l_ref, g_ref = step(params, "xla", "float32")
    l_x, g_x = step(params, "xla", "bfloat16")
    l_t, g_t = step(params, "tokamax", "bfloat16")
    print(f"loss float32 {float(l_ref):.5f}  xla bf16 {float(l_x):.5f}  tokamax bf16 {float(l_t):.5f}")
    assert abs(float(l_t) - float(l_ref)) < 2e-2 * abs(float(l_ref))
    names = ["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
             for path, _ in jax.tree_util.tree_flatten_with_path(g_ref)[0]]
    worse = []
    for name, r, x, t in zip(names, jax.tree.leaves(g_ref), jax.tree.leaves(g_x), jax.tree.leaves(g_t)):
        ex, et = _rel_l2(x, r), _rel_l2(t, r)
        print(f"{name:60s} xla {ex:.4f}  tokamax {et:.4f}")
        if not et <= 1.5 * ex + 1e-2:
            worse.append((name, ex, et))
    assert not worse, worse

"""The Pallas kernels compiled through Triton on a real GPU, against the XLA code they replace (tests/test_kernels.py
and tests/test_grouped.py check the same kernel bodies in Pallas' interpreter on the CPU).

    JAX_PLATFORMS=cuda PYTHONPATH=. python -m pytest -q -m gpu tests/test_gpu_*.py     (skipped without a GPU)

Decode kernels (`deepjax.infer.fast.kernels`): the bench preset's shapes with 3 layers (1 dense, 2 MoE: the
second MoE layer's attn_in kernel sums the first one's expert outputs), a 128-token prefill, then 4
teacher-forced decode steps (in a scan, over a 256-position cache) with the fused weights, once with the kernels
and once without (and the unfused module path), at batch 1 and 64 (different kernels: KERNELS_AT); and
`prefill_fused` (attention over the fused weights, the grouped-matmul experts) against `prefill`. In float32 under
full-precision matmuls: XLA:GPU's default float32 matmul is TF32 on H100/H200, which flips near-tied routing
choices of the random router, and a flipped choice changes a row's later logits (docs/LOG.md, session 7: with
"highest" every path agreed to ~2e-6). Measured here on one H200 (jax 0.11.2): decode kernels and module path vs
fused XLA 2.0e-6 / 1.9e-6 of the largest logit, prefill_fused vs prefill 2.7e-6 (logits) and 2.9e-6 (cache rows);
bfloat16 at batch 64: 96% greedy agreement, median difference 1e-2.

Grouped experts (`deepjax.infer.fast.grouped`): the bench preset's expert shapes in bfloat16 (64 routed experts,
6 per token, + 2 shared ones on every token) against `moe.routed_experts_blocked` in float32 at full precision on
the same bf16 inputs (docs/LOG.md, session 5: 3.1e-3 / 3.6e-3 of the largest output; XLA's own bf16 path 5.2e-3 /
6.6e-3), with the default tiles and a few others (a tile-specific bug shows as a wrong output).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepjax import model as M
from deepjax.infer import sampling as SP
from deepjax.infer.fast import grouped as KG
from deepjax.infer.fast import kernels as KN
from deepjax.model import presets
from deepjax.model.moe import routed_experts_blocked

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    jax.default_backend() != "gpu", reason="needs a CUDA GPU (JAX_PLATFORMS=cuda on the device machine)")]

PROMPT, STEPS, CACHE = 128, 4, 256  # CACHE: cache positions while decoding (attention kernel blocks of 128 rows)
# the Pallas kernels the fused decode step runs at each batch size (`fused.fuse_block`): a test configuration
# that turned one off would pass without testing it (a cache of 132 positions has no 16-row block: no attention)
KERNELS_AT = {1: ("attention", "attn_in", "moe_in", "experts"), 64: ("attention", "attn_pre", "route")}


# ------------------------------------------------------------------------------------------------ decode kernels


@functools.cache
def _model(dtype: str):
    """(graphdef, params, cfg): the bench preset with 3 layers (1 dense, 2 MoE: every kernel's shapes)."""
    cfg = dataclasses.replace(presets.bench(), dtype=dtype, param_dtype=dtype, num_hidden_layers=3)
    return (*M.init(cfg, jax.random.key(0)), cfg)


def _prefill(graphdef, params, prompts):
    """(logits, cache of CACHE positions) after `prefill` of the prompts (all PROMPT long)."""
    model = nnx.merge(graphdef, params)
    B, P = prompts.shape
    cache = SP.init_cache(model.cfg, B, CACHE)
    return SP.prefill(model, prompts, jnp.full((B,), P, jnp.int32), cache, SP.prefill_experts_fn(model.cfg))


def _decode_logits(graphdef, params, cache, cont, kernels, tuning=()):
    """Logits [B, steps, V] float32 of teacher-forced decode steps (tokens cont [B, steps]) after the prompts, in a
    scan (one compiled step, as generate's while_loop). kernels: None (the fused XLA path), "gpu" (the fused path
    with the Pallas kernels) or "module" (the unfused module path); tuning: kernel_tuning strings."""
    model = nnx.merge(graphdef, params)
    B, S = cont.shape[0], (cache.dense or cache.moe)[0].shape[1]
    if kernels == "module":  # for scale: two XLA paths differ this much too
        layers, fn = SP.unstack_layers(model), SP.decode_experts_fn(model.cfg, B)
    else:
        layers, fn = SP.fuse_layers(model, B, kernels, S, tuning=KN.tuning(tuning)), None

    def step(cache, tok_i):
        tok_B, i = tok_i
        logits, cache = SP.decode_step(model, tok_B, jnp.full((B,), PROMPT, jnp.int32) + i, cache, fn, "absorbed",
                                       layers)
        return cache, logits.astype(jnp.float32)

    _, logits = jax.lax.scan(step, cache, (cont.T, jnp.arange(cont.shape[1], dtype=jnp.int32)))
    return jnp.swapaxes(logits, 0, 1)


def _prefill_logits(graphdef, params, prompts, fused):
    """(last-token logits [B, V], every layer's cache rows [layers, B, P, C + R]) in float32: `prefill`, or
    `prefill_fused` with the GPU kernels; rows of different lengths."""
    model = nnx.merge(graphdef, params)
    B, P = prompts.shape
    lengths = jnp.full((B,), P, jnp.int32) - jnp.arange(B, dtype=jnp.int32) % 7
    cache = SP.init_cache(model.cfg, B, P + 16)
    if fused:
        layers = SP.fuse_layers(model, B, "gpu", P + 16)
        assert SP.fused_prefill_ok(layers, prompts.size)  # the grouped kernels run
        logits, cache = SP.prefill_fused(model, layers, prompts, lengths, cache)
    else:
        logits, cache = SP.prefill(model, prompts, lengths, cache, SP.prefill_experts_fn(model.cfg))
    rows = jnp.stack([c[:, :P] for c in (*cache.dense, *cache.moe)])
    return logits.astype(jnp.float32), rows.astype(jnp.float32)


def _inputs(vocab: int, B: int):
    rng = np.random.default_rng(B)
    return (jnp.asarray(rng.integers(0, vocab, (B, PROMPT)), jnp.int32),
            jnp.asarray(rng.integers(0, vocab, (B, STEPS)), jnp.int32))


@functools.cache
def _prefilled(dtype: str, B: int):
    graphdef, params, cfg = _model(dtype)
    prompts, cont = _inputs(cfg.vocab_size, B)
    with jax.default_matmul_precision("highest"):
        _, cache = jax.jit(_prefill, static_argnums=0)(graphdef, params, prompts)
    return cache, cont


@pytest.mark.parametrize("B", sorted(KERNELS_AT))
def test_decode_runs_the_kernels(B):
    """The decode tests' shapes take the kernels KERNELS_AT names, in every MoE layer (`fuse_layers` traced as in
    `_decode_logits`: its static "kernels" entries say which run)."""
    graphdef, params, _ = _model("float32")
    used = []

    def fuse(p):
        used.extend(blk["kernels"] for blk in SP.fuse_layers(nnx.merge(graphdef, p), B, "gpu", CACHE)["moe_layers"])
        return jnp.zeros(())

    jax.eval_shape(fuse, params)
    assert used and all(u[k] == "gpu" for u in used for k in KERNELS_AT[B]), used


@functools.cache
def _decode(dtype: str, B: int, kernels, tuning=()):
    graphdef, params, _ = _model(dtype)
    cache, cont = _prefilled(dtype, B)
    with jax.default_matmul_precision("highest"):
        return np.asarray(jax.jit(_decode_logits, static_argnums=(0, 4, 5))(graphdef, params, cache, cont, kernels,
                                                                             tuning))


def _rel_rows(got, ref):
    """|got - ref| max over the vocabulary, per (row, step), over the largest |ref| logit."""
    return np.abs(got - ref).max(-1) / np.abs(ref).max()


@pytest.mark.parametrize("B", [1, 64])
@pytest.mark.parametrize("other", ["module", "gpu"])  # (module first: it pays the shared prefill and reference)
def test_decode_kernels_match_fused_xla(B, other):
    """float32, full-precision matmuls: the kernels (and the module path) against the fused XLA path, every
    (row, step) within 1e-3 of the largest logit (measured ~2e-6), the same greedy tokens, finite."""
    ref, got = _decode("float32", B, None), _decode("float32", B, other)
    assert np.isfinite(got).all()
    d = _rel_rows(got, ref)
    print(f"float32 batch {B} {other} vs fused xla: max rel diff {d.max():.2e}, greedy agree "
          f"{100 * (got.argmax(-1) == ref.argmax(-1)).mean():.1f}%")
    assert d.max() < 1e-3, (other, B, d.max(), int((d > 1e-3).sum()))
    assert (got.argmax(-1) == ref.argmax(-1)).all()


# the 512-row step's layout at 64 rows, with the session-30 candidates (off by default until timed): the shared
# experts apart, the route kernel on XLA's logits, the dispatch kernel
GROUPED_AT_64 = ("grouped.decode_min_tokens=64",)
CANDIDATES = GROUPED_AT_64 + ("grouped.shared_dense=True", "grouped.dispatch_kernel=True", "route.max_tokens=64",
                              "route.logits=False", "route.bt=8")


@pytest.mark.parametrize("tuning", [GROUPED_AT_64, CANDIDATES], ids=["grouped", "candidates"])
def test_decode_grouped_kernels_match_fused_xla(tuning):
    """float32, full precision, batch 64 with the decode's experts as grouped matmuls (the rollout's layout), and
    with the candidate kernels: against the fused XLA path, as `test_decode_kernels_match_fused_xla`."""
    ref, got = _decode("float32", 64, None), _decode("float32", 64, "gpu", tuning)
    assert np.isfinite(got).all()
    d = _rel_rows(got, ref)
    print(f"float32 batch 64 {tuning}: max rel diff {d.max():.2e}")
    assert d.max() < 1e-3, (tuning, d.max())
    assert (got.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("B", [1, 64])
def test_decode_kernels_bfloat16(B):
    """bfloat16: the kernels round where the XLA path does, not identically; a few (row, step) pairs may differ by
    a routing flip. Finite, and greedy agreement on nearly every (row, step)."""
    ref, got = _decode("bfloat16", B, None), _decode("bfloat16", B, "gpu")
    assert np.isfinite(got).all()
    d = _rel_rows(got, ref)
    print(f"bfloat16 batch {B} kernels vs fused xla: rel diff median {np.median(d):.2e} max {d.max():.2e}, "
          f"(row, step) over 1e-2: {int((d > 1e-2).sum())} of {d.size}, greedy agree "
          f"{100 * (got.argmax(-1) == ref.argmax(-1)).mean():.1f}%")
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
    assert np.median(_rel_rows(got, ref)) < 5e-2


@pytest.mark.parametrize("B", [1, 64])
def test_prefill_fused_matches_prefill(B):
    """float32, full-precision matmuls: `prefill_fused` (absorbed attention, grouped-matmul experts) against
    `prefill`: last-token logits within 2e-3 of the largest (measured 4.7e-4 on 12 layers), the same greedy
    tokens, and every token's cache row in every layer within 1e-3 of the layer's largest value."""
    graphdef, params, cfg = _model("float32")
    prompts, _ = _inputs(cfg.vocab_size, B)
    f = jax.jit(_prefill_logits, static_argnums=(0, 3))
    with jax.default_matmul_precision("highest"):
        (l0, c0), (l1, c1) = f(graphdef, params, prompts, False), f(graphdef, params, prompts, True)
    l0, c0, l1, c1 = map(np.asarray, (l0, c0, l1, c1))
    assert np.isfinite(l1).all() and np.isfinite(c1).all()
    tok = np.abs(c1 - c0).max(-1) / np.abs(c0).max((1, 2, 3))[:, None, None]  # [layers, B, P]
    print(f"batch {B} prefill_fused vs prefill: logits max rel diff {np.abs(l1 - l0).max() / np.abs(l0).max():.2e}, "
          f"greedy agree {100 * (l1.argmax(-1) == l0.argmax(-1)).mean():.1f}%, cache rows max rel diff per layer "
          f"{[f'{t:.1e}' for t in tok.max((1, 2))]}")
    assert np.abs(l1 - l0).max() / np.abs(l0).max() < 2e-3
    assert (l1.argmax(-1) == l0.argmax(-1)).all()
    assert tok.max() < 1e-3, tok.max((1, 2))


# ----------------------------------------------------------------------------------------------- grouped experts

E, S, K = 64, 2, 6  # bench preset: routed experts, shared experts, experts per token
D, I = 1024, 512
X, A = E + S, K + S


@functools.cache
def _grouped_case(T: int):
    """bf16 x [T, D]; routing idx, w [T, A] (6 distinct routed experts, then the 2 shared ones at weight 1); the
    fused weight layouts w_gu [X, 2I, D], w_down [X, D, I] and flat [D, X*I]; and the float32 full-precision
    `routed_experts_blocked` output on the same bf16 values (float64 numpy)."""
    rng = np.random.default_rng(T)
    bf = jnp.bfloat16
    x = jnp.asarray(rng.normal(size=(T, D)), bf)
    idx = np.concatenate([rng.random((T, E)).argsort(1)[:, :K], np.broadcast_to(np.arange(E, X), (T, S))], 1)
    w = np.concatenate([rng.random((T, K)) * 0.5, np.ones((T, S))], 1)
    idx, w = jnp.asarray(idx, jnp.int32), jnp.asarray(w, jnp.float32)
    kg, kd = jax.random.split(jax.random.key(T))
    w_gu = (jax.random.normal(kg, (X, 2 * I, D)) / np.sqrt(D)).astype(bf)
    w_down = (jax.random.normal(kd, (X, D, I)) / np.sqrt(I)).astype(bf)
    flat = jnp.moveaxis(w_down, 0, 1).reshape(D, X * I)  # column e*I + i: expert e's unit i
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    gate, up = jnp.swapaxes(f32(w_gu[:, :I]), 1, 2), jnp.swapaxes(f32(w_gu[:, I:]), 1, 2)  # [X, D, I]
    with jax.default_matmul_precision("highest"):
        ref = jax.jit(routed_experts_blocked)(f32(x), w, idx, gate, up, jnp.swapaxes(f32(w_down), 1, 2))
    return x, w, idx, w_gu, w_down, flat, np.asarray(ref, np.float64)


def _grouped_errors(T: int, flat: bool, bm=None, **kw):
    x, w, idx, w_gu, w_down, w_flat, ref = _grouped_case(T)
    f = jax.jit(functools.partial(KG.experts_grouped, mode="gpu", flat=flat, bm=bm, **kw))  # traced anew: TUNING
    got = np.asarray(f(x, w, idx, w_gu, w_flat if flat else w_down), np.float64)
    assert np.isfinite(got).all()
    d = got - ref
    return np.abs(d).max() / np.abs(ref).max(), np.linalg.norm(d) / np.linalg.norm(ref)


@pytest.mark.parametrize("T", [128, 8192, 512])  # bm 16 and 128 (`block_rows`); 512: a decode step's 64
@pytest.mark.parametrize("flat", [False, True])
def test_grouped_experts_match_xla(T, flat):
    """Default tiles, both w_down layouts: max and rms error under 1e-2 of the float32 reference (measured
    3.1e-3 / 3.6e-3; the bf16 inputs and the bf16 hidden activations between the kernels set the floor). At 512
    tokens the blocks are a decode step's (`decode_block_rows`: 64 rows)."""
    mx, rms = _grouped_errors(T, flat, KG.decode_block_rows(T * (K + S), E + S) if T == 512 else None)
    print(f"T {T} {'flat' if flat else 'gathered'}: max {mx:.2e} rms {rms:.2e}")
    assert mx < 1e-2 and rms < 1e-2, (mx, rms)


def test_dispatch_kernel_on_gpu():
    """`grouped.dispatch_kernel` compiled by Triton: `dispatch`'s layout bit for bit at a decode step's shapes (512
    and 2,048 rows; the routed experts only, and with the shared ones appended; uniform and skewed routing), and the
    grouped experts through it within the bound of `test_grouped_experts_match_xla`."""
    rng = np.random.default_rng(0)
    for T in (512, 2048):
        uniform = rng.random((T, E)).argsort(1)[:, :K]
        skewed = np.stack([rng.permutation(K)[:K] for _ in range(T)])  # experts 0..5 only: the rest empty
        for top in (uniform, skewed):
            for idx, n in ((top, E), (np.concatenate([top, np.broadcast_to(np.arange(E, X), (T, S))], 1), X)):
                idx = jnp.asarray(idx, jnp.int32)
                bm = KG.decode_block_rows(idx.size, n)
                want = jax.jit(functools.partial(KG.dispatch, n_experts=n, bm=bm, distinct=True, pad_token=0))(idx)
                got = jax.jit(functools.partial(KG.dispatch_kernel, n_experts=n, bm=bm, mode="gpu"))(idx)
                for a, b in zip(got, want):
                    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    mx, rms = _grouped_errors(512, True, KG.decode_block_rows(512 * A, X), distinct=True, dispatch_in_kernel=True)
    print(f"T 512 flat, dispatch kernel: max {mx:.2e} rms {rms:.2e}")
    assert mx < 1e-2 and rms < 1e-2, (mx, rms)


TILE = lambda bn, bk, w, s, rf=False: {"bn": bn, "bk": bk, "num_warps": w, "num_stages": s,  # noqa: E731
                                       "rows_fastest": rf}


@pytest.mark.parametrize("T,kind,tiles,bm", [
    (128, "swiglu", TILE(64, 64, 4, 4), None),
    (128, "swiglu", TILE(128, 128, 4, 3), None),
    (128, "down", TILE(256, 64, 8, 3), None),
    (128, None, None, 32),
    (8192, "swiglu", TILE(64, 64, 8, 3, True), None),
    (8192, "down", TILE(64, 64, 4, 3, True), None),
    (8192, "down", TILE(128, 64, 8, 4), None),
    (8192, None, None, 64),
])
def test_grouped_experts_other_tiles(T, kind, tiles, bm, monkeypatch):
    """Other tiles (for every bm) and block sizes from bench/tune.py's sweep: the same error bound."""
    if kind is not None:
        monkeypatch.setitem(KG.TUNING, kind, {16: tiles})
    mx, rms = _grouped_errors(T, False, bm)
    print(f"T {T} {kind} {tiles} bm {bm}: max {mx:.2e} rms {rms:.2e}")
    assert mx < 1e-2 and rms < 1e-2, (mx, rms)


def test_router_split_on_gpu_equals_float64():
    """The GPU's router product (`moe.router_logits` for bf16 activations: the float32 gate in three bf16 parts on
    the tensor cores) at the bench preset's width and a GRPO micro-batch's rows, jitted: logits and the gate's
    gradient within float32 summation error of float64 products of the same values, x's gradient within its bf16
    rounding; and the gate rounded to one bf16 part misses, so the check can fail."""
    from deepjax.model import moe
    rng = np.random.default_rng(0)
    T, D, E = 8192, 1024, 64
    x = jnp.asarray(rng.normal(size=(T, D)), jnp.bfloat16)
    gate = jnp.asarray(rng.normal(size=(D, E)) * 0.02, jnp.float32)
    ct = jnp.asarray(rng.normal(size=(T, E)), jnp.float32)
    parts = jax.jit(lambda g: moe.bf16_parts(g, 3))(gate)  # XLA:GPU must not fold the parts into the first one
    np.testing.assert_array_equal(sum(np.asarray(p, np.float64) for p in parts), np.asarray(gate, np.float64))
    x64, g64, c64 = (np.asarray(a, np.float64) for a in (x.astype(jnp.float32), gate, ct))
    logits, vjp = jax.jit(lambda x, g: jax.vjp(moe.router_logits, x, g))(x, gate)
    dx, dg = jax.jit(vjp)(ct)
    scale = np.abs(x64) @ np.abs(g64)
    assert np.max(np.abs(np.asarray(logits, np.float64) - x64 @ g64) / scale) < 1e-6
    dg_want, dg_scale = x64.T @ c64, np.abs(x64.T) @ np.abs(c64)
    assert np.max(np.abs(np.asarray(dg, np.float64) - dg_want) / dg_scale) < 1e-6
    dx_want = c64 @ g64.T
    assert np.max(np.abs(np.asarray(dx.astype(jnp.float32), np.float64) - dx_want)
                  / (np.abs(dx_want) * 2.0**-8 + np.abs(c64) @ np.abs(g64.T) * 2.0**-14)) <= 1.0
    one = jax.jit(lambda x, g: jnp.dot(x, g.astype(jnp.bfloat16), preferred_element_type=jnp.float32))(x, gate)
    assert np.max(np.abs(np.asarray(one, np.float64) - x64 @ g64) / scale) > 1e-6

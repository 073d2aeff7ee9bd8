"""The Pallas decode kernels (`deepjax.kernels`) in Pallas' interpreter against the XLA code they replace: the
same kernel bodies compile through Triton on GPU (bench/kernels_check.py compares them there)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepjax import decode_fused as DF
from deepjax import kernels as KN
from deepjax import model as M
from deepjax import moe, presets
from deepjax import sampling as SP
from deepjax.config import load_config


@pytest.mark.parametrize("preset", ["tiny", "bench", "deepseek_v2_lite", "deepseek_v3"])
def test_route_kernel_equals_route(preset):
    """Same experts in the same order and the same weights as `moe.route` (V2's 160 experts are not a power of two:
    its group-limited greedy router is checked on 64), ties included; shared experts appended with weight 1."""
    cfg = getattr(presets, preset)()
    if cfg.topk_method == "group_limited_greedy" or preset == "deepseek_v2_lite":
        cfg = dataclasses.replace(cfg, n_routed_experts=64, topk_method="group_limited_greedy", n_group=8,
                                  topk_group=3)
    E, K, S = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_shared_experts
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(4, E)) * 2, jnp.float32)
    logits = jnp.concatenate([logits, jnp.zeros((1, E)), jnp.round(logits[:1])])  # ties
    bias = jnp.asarray(rng.normal(size=E) * 0.1, jnp.float32) if cfg.topk_method == "noaux_tc" else None
    idx, w, dense = KN.route(logits, bias, cfg, "interpret")
    w_ref, idx_ref, _ = moe.route(logits, bias, cfg)
    np.testing.assert_array_equal(np.asarray(idx[:, :K]), np.asarray(idx_ref))
    np.testing.assert_allclose(np.asarray(w[:, :K]), np.asarray(w_ref), rtol=1e-6)
    assert (np.asarray(idx[:, K:]) == np.arange(E, E + S)).all() and (np.asarray(w[:, K:]) == 1).all()
    want = np.zeros((logits.shape[0], E), np.float32)
    np.put_along_axis(want, np.asarray(idx_ref), np.asarray(w_ref), axis=1)
    np.testing.assert_allclose(np.asarray(dense), want, rtol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_latent_attention_kernel_equals_absorbed_attention(dtype):
    """Per row: the new row written at its position (and nothing else changed), and the output equal to softmax
    attention over positions [0, pos] of the latent part; rows at different positions, several blocks."""
    cfg = dataclasses.replace(presets.tiny(), num_attention_heads=16)
    dt = jnp.dtype(dtype)
    B, S, N, C, R = 4, 40, 16, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (B, N, C + R)).astype(dt)
    kv = jax.random.normal(ks[1], (B, S, C + R)).astype(dt)
    row = jax.random.normal(ks[2], (B, C + R)).astype(dt)
    pos = jnp.array([0, 7, 8, 39])  # first position, inside / on a block edge (blocks of 8), the last one
    o, kv2 = KN.latent_attention(q, row, kv, pos, cfg, "interpret")
    want_kv = DF.write_rows(kv, pos[:, None], row[:, None])
    np.testing.assert_array_equal(np.asarray(kv2), np.asarray(want_kv))
    mask = jnp.arange(S)[None, None] <= pos[:, None, None]
    eye = jnp.broadcast_to(jnp.eye(C, C + R, dtype=dt).T[None], (N, C + R, C)).transpose(0, 2, 1)  # o's latent part
    wo = jnp.broadcast_to(jnp.eye(N * C, dtype=dt).reshape(N * C, N, C), (N * C, N, C))
    want = DF.absorbed_attention(q[:, None], want_kv, mask, eye, wo, cfg.softmax_scale)[:, 0].reshape(B, N, C)
    tol = 1e-5 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(np.asarray(o[..., :C], np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol)
    assert (np.asarray(o[..., C:]) == 0).all()


@pytest.mark.parametrize("split", [True, False])
def test_experts_kernel_equals_gathered_experts(split, monkeypatch):
    monkeypatch.setitem(KN.TUNING, "down", dict(KN.TUNING["down"], split=split))
    rng = np.random.default_rng(0)
    T, X, E, D, I = 3, 4, 6, 64, 32
    x = jnp.asarray(rng.normal(size=(T, D)), jnp.float32)
    res = jnp.asarray(rng.normal(size=(T, D)), jnp.float32)
    idx = jnp.asarray(rng.integers(0, E, (T, X)), jnp.int32)  # repeats allowed
    w = jnp.asarray(rng.random((T, X)), jnp.float32)
    w_gu = jnp.asarray(rng.normal(size=(E, 2 * I, D)) * 0.2, jnp.float32)
    w_down = jnp.asarray(rng.normal(size=(E, D, I)) * 0.2, jnp.float32)
    got = KN.experts_gathered(x, res, idx, w, w_gu, w_down, "interpret")
    want = res + DF.experts_gathered(x, w, idx, w_gu, w_down)
    assert np.abs(np.asarray(want - res)).max() > 0.5
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiny():
    cfg = dataclasses.replace(load_config("tiny").model, initializer_range=0.2)
    graphdef, params = M.init(cfg, jax.random.key(0))
    return cfg, graphdef, params


@pytest.mark.parametrize("mtp", [False, True])
def test_generate_with_kernels_equals_xla(tiny, mtp):
    """`generate` with every kernel (interpreted) gives XLA's fused path's tokens and log-probs, with and without
    MTP drafting (two tokens per step: the route and expert kernels on 2B tokens, XLA attention)."""
    cfg, graphdef, params = tiny
    prompts, lengths = SP.pad_prompts([[5, 17, 300], [9, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11]])
    args = (graphdef, params, jnp.asarray(prompts), jnp.asarray(lengths), jax.random.key(0))
    sc = SP.SamplingConfig(max_new_tokens=6, temperature=0.0, mtp_draft=mtp)
    ref = SP.jit_generate(*args, dataclasses.replace(sc, kernels="xla"))
    got = SP.jit_generate(*args, dataclasses.replace(sc, kernels="interpret"))
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(ref.tokens))
    np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(ref.logprobs), atol=1e-5)


def test_kernel_choice_follows_shapes_and_settings():
    """On GPU a kernel runs only where Triton's power-of-two blocks fit; kernel_set narrows the choice; the experts
    kernel only on the gathered path (few tokens per step)."""
    bench = presets.bench()
    assert all(KN.supported(bench, 384).values())
    assert not KN.supported(presets.tiny(), 384)["attention"]  # 4 heads: under tl.dot's 16 rows
    assert not KN.supported(presets.deepseek_v2(), 384)["route"]  # 160 experts
    assert KN._cache_block(presets.deepseek_v3(), 4096) == 64 and KN._cache_block(bench, 384) == 128
    assert all(KN.supported(presets.tiny(), 384, "interpret").values())
    wide = dataclasses.replace(presets.tiny(), num_attention_heads=16, qk_rope_head_dim=16)
    assert KN.supported(wide, 384)["attention"]
    assert not KN.supported(wide, 0)["attention"] and not KN.supported(wide, 100)["attention"]  # 100: blocks of 4
    assert SP.validate(SP.SamplingConfig(max_new_tokens=100), 128) == 240  # rounded up to 16 rows
    cfg = dataclasses.replace(load_config("tiny").model)
    model = M.init(cfg, jax.random.key(0))
    from flax import nnx
    mod = nnx.merge(*model)
    one = SP.fuse_layers(mod, 1, "interpret", 16, ("attention", "experts"))["moe_layers"][0]
    assert one["gathered"] and one["kernels"] == {"attention": "interpret", "route": None, "experts": "interpret"}
    many = SP.fuse_layers(mod, 64, "interpret", 16)["moe_layers"][0]
    assert not many["gathered"] and many["kernels"]["experts"] is None and many["kernels"]["route"] == "interpret"
    assert SP.kernel_mode(SP.SamplingConfig(kernels="xla")) is None
    assert SP.kernel_mode(SP.SamplingConfig(kernels="auto")) == ("gpu" if jax.default_backend() == "gpu" else None)

"""The whole model: exact parameter counts of the published shapes (through jax.eval_shape), YaRN and RoPE
oracles, causality, packed-document isolation, padding, remat, bf16, and MTP learning a toy sequence.

Oracles come from docs/deepseek.md. Forward tests share one tiny model and one input shape [B=2, T=16],
so `jit_forward` compiles once for all of them.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from deepjax import model as M
from deepjax.model import presets
from deepjax.model.layers import RouterBias
from deepjax.model.rope import apply_rope, rope_tables, yarn_inv_freq

B, T = 2, 16


# ---- parameter counts (abstract: nothing is allocated) --------------------------------------------

@pytest.fixture(scope="module")
def v3_abstract():
    return M.abstract_init(presets.deepseek_v3())[1]


def _shapes(params) -> dict:
    return {path: shape for path, shape, _ in M.param_table(params)}


def test_v3_main_model_params_exact(v3_abstract):
    assert M.count_params(v3_abstract, include_mtp=False) == 671_026_419_200


def test_v2_lite_params_exact():
    assert M.count_params(M.abstract_init(presets.deepseek_v2_lite())[1]) == 15_706_484_224


def test_v2_params_exact():
    assert M.count_params(M.abstract_init(presets.deepseek_v2())[1]) == 235_741_434_880


def test_v3_active_params(v3_abstract):
    # Paper: 37B activated; with embedding and head about 37.55B (docs/deepseek.md, Presets).
    active = M.count_active_params(presets.deepseek_v3(), v3_abstract)
    assert 36e9 < active < 38e9


def test_v3_expert_and_attention_block_from_shapes(v3_abstract):
    shapes = _shapes(v3_abstract)
    L = 58  # MoE layers, the leading (scanned) axis
    expert = sum(math.prod(shapes[f"moe_layers.ffn.{w}"][2:]) for w in ("w_gate", "w_up", "w_down"))
    assert all(shapes[f"moe_layers.ffn.{w}"][:2] == (L, 256) for w in ("w_gate", "w_up", "w_down"))
    assert expert == 44_040_192
    attn = {p: s for p, s in shapes.items() if p.startswith("moe_layers.attn.")}
    assert all(s[0] == L for s in attn.values())
    assert sum(math.prod(s[1:]) for s in attn.values()) == 187_107_328
    mtp_attn = {p: s for p, s in shapes.items() if p.startswith("mtp.0.block.attn.")}
    assert sum(math.prod(s) for s in mtp_attn.values()) == 187_107_328


def test_v3_mtp_module_params(v3_abstract):
    D = 7168
    attention_block = 187_107_328
    moe_layer = 11_320_164_608  # 257 experts' worth (256 routed + 1 shared) + router [D, 256] + bias [256]
    assert moe_layer == 257 * 44_040_192 + D * 256 + 256
    norms = 2 * D + 2 * D + D  # enorm, hnorm; the block's attn_norm, ffn_norm; shared_head.norm
    expected = norms + 2 * D * D + attention_block + moe_layer  # eh_proj [2D x D]
    assert expected == 11_610_068_224  # "about 11.6B unique parameters"
    total = M.count_params(v3_abstract, include_mtp=True)
    assert total - 671_026_419_200 == expected


# ---- YaRN, softmax scale, RoPE ------------------------------------------------------------------

def test_yarn_inv_freq_oracle():
    cfg = presets.deepseek_v3()
    f = yarn_inv_freq(cfg)
    assert f.shape == (32,) and f.dtype == np.float32
    np.testing.assert_allclose(f[[1, 10, 31]], [0.749894, 0.0562341, 3.3338e-6], rtol=1e-5)
    base = 1.0 / (10000.0 ** (np.arange(0, 64, 2, dtype=np.float64) / 64))
    # Ramp bounds low = 10, high = 23: pure extrapolation up to 10, pure interpolation (/40) from 23.
    np.testing.assert_allclose(f[:11], base[:11], rtol=1e-6)
    np.testing.assert_allclose(f[23:], base[23:] / 40.0, rtol=1e-6)
    mid = slice(11, 23)
    assert np.all(f[mid] < base[mid] * (1 - 1e-4)) and np.all(f[mid] > base[mid] / 40.0 * (1 + 1e-4))
    # Without rope_scaling, the plain RoPE frequencies.
    plain = yarn_inv_freq(dataclasses.replace(cfg, rope_scaling=None))
    np.testing.assert_allclose(plain, base, rtol=1e-6)


@pytest.mark.parametrize("name,expected", [
    ("deepseek_v3", 0.1352338), ("deepseek_v2", 0.1147214), ("deepseek_v2_lite", 0.1147214)])
def test_softmax_scale(name, expected):
    np.testing.assert_allclose(getattr(presets, name)().softmax_scale, expected, rtol=1e-6)


@jax.jit
def _rotate(x_R, pos):
    """One R-dim vector rotated to position pos, with the V3 YaRN frequencies."""
    cos, sin = rope_tables(presets.deepseek_v3(), jnp.full((1, 1), pos, jnp.int32))
    return apply_rope(x_R[None, None], cos, sin)[0, 0]


def test_rope_dot_depends_only_on_offset():
    q, k = np.random.default_rng(0).normal(size=(2, 64)).astype(np.float32)
    dot = lambda m, n: float(_rotate(q, m) @ _rotate(k, n))
    ref = dot(5, 2)
    for m, n in [(3, 0), (40, 37), (203, 200)]:
        np.testing.assert_allclose(dot(m, n), ref, rtol=1e-4, atol=1e-4)
    ref_neg = dot(2, 7)
    np.testing.assert_allclose(dot(30, 35), ref_neg, rtol=1e-4, atol=1e-4)
    assert abs(dot(5, 3) - ref) > 1e-2  # a different offset gives a different score
    assert abs(ref - float(q @ k)) > 1e-2  # and the rotation is not the identity


def test_rope_adjacent_pairs_and_norm():
    cfg = presets.deepseek_v3()
    inv = yarn_inv_freq(cfg)
    # DeepSeek's layout: pair i is (x[2i], x[2i+1]) rotated by angle pos * inv_freq[i].
    e = np.zeros(64, np.float32)
    e[2] = 1.0
    np.testing.assert_allclose(np.asarray(_rotate(e, 7))[:6],
                               [0, 0, np.cos(7 * inv[1]), np.sin(7 * inv[1]), 0, 0], atol=1e-6)
    rng = np.random.default_rng(1)
    x_BTNR = rng.normal(size=(2, 5, 3, 64)).astype(np.float32)
    pos_BT = rng.integers(0, 100_000, (2, 5)).astype(np.int32)

    @jax.jit
    def rotate(x_BTNR, pos_BT):
        cos, sin = rope_tables(cfg, pos_BT)
        return apply_rope(x_BTNR, cos, sin), apply_rope(x_BTNR[:, :, 0], cos, sin)

    y, y3 = map(np.asarray, rotate(x_BTNR, pos_BT))
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x_BTNR, axis=-1), rtol=1e-5)
    assert np.abs(y - x_BTNR).max() > 0.1
    np.testing.assert_allclose(y3, y[:, :, 0], rtol=1e-6, atol=1e-6)  # the shared key has no head axis


# ---- the tiny model -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    cfg = presets.tiny()
    graphdef, params = M.init(cfg, jax.random.key(0))
    return cfg, graphdef, params


def _fwd(tiny, tokens, positions=None, segment_ids=None):
    """Always passes positions and segment ids so every call shares one compiled forward."""
    _, graphdef, params = tiny
    if positions is None:
        positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
    if segment_ids is None:
        segment_ids = np.ones(tokens.shape, np.int32)
    return M.jit_forward(graphdef, params, jnp.asarray(tokens, jnp.int32), jnp.asarray(positions, jnp.int32),
                         jnp.asarray(segment_ids, jnp.int32))


def _tokens(seed, shape=(B, T), vocab=512):
    return np.random.default_rng(seed).integers(1, vocab, shape).astype(np.int32)


def test_forward_shapes(tiny):
    cfg = tiny[0]
    out = _fwd(tiny, _tokens(0))
    assert out.logits.shape == (B, T, cfg.vocab_size) and out.logits.dtype == jnp.float32
    assert out.mtp_logits.shape == (1, B, T, cfg.vocab_size)
    assert out.expert_load.shape == (cfg.n_moe_layers, cfg.n_routed_experts)
    assert out.balance_loss.shape == (cfg.n_moe_layers,)
    assert bool(jnp.all(jnp.isfinite(out.logits))) and bool(jnp.all(jnp.isfinite(out.mtp_logits)))


def test_causality_token_perturbation(tiny):
    """Main logits at t see tokens <= t; MTP depth k logits at i see tokens <= i + k (V3 section 2.2)."""
    rng = np.random.default_rng(1)
    tokens = _tokens(2)
    base = _fwd(tiny, tokens)
    for t in range(T - 1):
        after = tokens.copy()
        after[:, t + 1:] = rng.integers(1, 512, (B, T - t - 1))
        after[:, t + 1] = (tokens[:, t + 1] + 1) % 512  # surely changed
        out = _fwd(tiny, after)
        np.testing.assert_array_equal(out.logits[:, :t + 1], base.logits[:, :t + 1])
        assert np.all(np.abs(out.logits[:, t + 1] - base.logits[:, t + 1]).max(-1) > 1e-6)
        # MTP depth 1 at i embeds t_{i+1}: positions <= t - 1 unchanged, position t changed.
        if t >= 1:
            np.testing.assert_array_equal(out.mtp_logits[0, :, :t], base.mtp_logits[0, :, :t])
        assert np.all(np.abs(out.mtp_logits[0, :, t] - base.mtp_logits[0, :, t]).max(-1) > 1e-6)


def test_causality_through_derivatives(tiny):
    """The gradient of the main logits at position t (a random cotangent over the vocabulary) reaches the input
    embedding rows of positions s <= t only, and that of the MTP depth-1 logits at t (which embed t_{t+1}) those of
    s <= t + 1 only: exact zeros expected elsewhere. Reverse mode, as training differentiates (the routed experts'
    permutations have custom VJPs: no forward mode). All B*T tokens are distinct, so an embedding row identifies
    one position."""
    cfg, graphdef, params = tiny
    tokens = np.random.default_rng(3).permutation(np.arange(1, cfg.vocab_size))[:B * T].reshape(B, T)
    tokens = jnp.asarray(tokens, jnp.int32)
    emb, rest = nnx.split_state(params, nnx.PathContains("embed"), ...)
    assert [p for p, _ in nnx.to_flat_state(emb)] == [("embed",)]
    r_BV = jax.random.normal(jax.random.key(4), (B, cfg.vocab_size))

    @jax.jit
    def reach(emb, t, mtp):
        def f(emb):
            out = M.forward(graphdef, nnx.merge_state(emb, rest), tokens)
            logits = jnp.where(mtp, out.mtp_logits[0][:, t], out.logits[:, t])
            return jnp.sum(logits.astype(jnp.float32) * r_BV)

        g_VD = jax.grad(f)(emb)["embed"][...]
        return jnp.abs(g_VD[tokens]).max(-1)  # [B, T]: the gradient at each position's embedding row

    pos = np.arange(T)
    for t in range(T):
        main, mtp = (np.asarray(reach(emb, t, m)) for m in (False, True))
        assert np.all(main[:, pos > t] == 0) and np.all(main[:, pos <= t] > 0), t
        assert np.all(mtp[:, pos > t + 1] == 0) and np.all(mtp[:, pos <= t + 1] > 0), t


def test_packed_segments_are_isolated(tiny):
    """[doc A | doc B] with restarting positions: doc B's logits equal doc B alone in its own row."""
    n_a = 7
    n_b = T - n_a
    rng = np.random.default_rng(5)
    doc_a, doc_b = rng.integers(1, 512, n_a), rng.integers(1, 512, n_b)
    tokens = np.zeros((B, T), np.int32)
    tokens[0] = np.concatenate([doc_a, doc_b])
    tokens[1, :n_b] = doc_b  # then padding: token 0, segment 0 (as the shifted MTP input past a row's end)
    pos = np.zeros((B, T), np.int32)
    pos[0] = np.concatenate([np.arange(n_a), np.arange(n_b)])
    pos[1] = np.concatenate([np.arange(n_b), np.arange(T - n_b)])
    seg = np.zeros((B, T), np.int32)
    seg[0] = [1] * n_a + [2] * n_b
    seg[1, :n_b] = 1
    out = _fwd(tiny, tokens, pos, seg)
    np.testing.assert_allclose(out.logits[0, n_a:], out.logits[1, :n_b], atol=1e-5, rtol=0)
    np.testing.assert_allclose(out.mtp_logits[0, 0, n_a:], out.mtp_logits[0, 1, :n_b], atol=1e-5, rtol=0)
    # RoPE is relative: the same document at positions shifted by n_a gives the same logits.
    shifted = _fwd(tiny, tokens, pos + np.array([[0], [n_a]], np.int32), seg)
    np.testing.assert_allclose(shifted.logits[1, :n_b], out.logits[1, :n_b], atol=1e-5, rtol=0)

    other = tokens.copy()
    other[0, :n_a] = rng.integers(1, 512, n_a)
    out2 = _fwd(tiny, other, pos, seg)
    np.testing.assert_allclose(out2.logits[0, n_a:], out.logits[0, n_a:], atol=1e-6, rtol=0)
    assert float(jnp.abs(out2.logits[0, :n_a] - out.logits[0, :n_a]).max()) > 1e-4
    # Without segment ids the same row does mix the documents.
    mixed = _fwd(tiny, other, pos, np.ones_like(seg))
    ref = _fwd(tiny, tokens, pos, np.ones_like(seg))
    assert float(jnp.abs(mixed.logits[0, n_a:] - ref.logits[0, n_a:]).max()) > 1e-4


def test_padding_excluded_from_expert_load(tiny):
    cfg = tiny[0]
    K = cfg.num_experts_per_tok
    tokens = _tokens(6)
    seg = np.ones((B, T), np.int32)
    n_pad = 6
    seg[1, T - n_pad:] = 0
    out = _fwd(tiny, tokens, None, seg)
    n_valid = B * T - n_pad
    np.testing.assert_array_equal(out.expert_load.sum(-1), [n_valid * K] * cfg.n_moe_layers)
    assert np.all(np.asarray(out.expert_load) >= 0)
    # MTP depth 1 at i embeds t_{i+1}: positions whose next token is padding or past the end are excluded.
    _, mtp_valid = M.mtp_targets(jnp.asarray(tokens), jnp.asarray(seg), 0)
    assert int(mtp_valid.sum()) == (T - 1) + (T - n_pad - 1)
    np.testing.assert_array_equal(out.mtp_expert_load.sum(-1), [int(mtp_valid.sum()) * K])
    # Without padding every token counts.
    full = _fwd(tiny, tokens)
    np.testing.assert_array_equal(full.expert_load.sum(-1), [B * T * K] * cfg.n_moe_layers)
    # Padding content does not reach the valid tokens.
    repad = tokens.copy()
    repad[1, T - n_pad:] = _tokens(7, (n_pad,))
    out2 = _fwd(tiny, repad, None, seg)
    np.testing.assert_array_equal(out2.logits[:, :T - n_pad], out.logits[:, :T - n_pad])
    np.testing.assert_array_equal(out2.expert_load, out.expert_load)


def _loss(out, tokens, seg):
    """Next-token CE + depth-k MTP CE (each masked to targets inside the document) + a little balance loss."""
    ce = 0.0
    for k, logits in enumerate([out.logits, *out.mtp_logits]):
        tgt, mask = M.mtp_targets(tokens, seg, k)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, tgt)
        ce = ce + (nll * mask).sum() / mask.sum()
    return ce + 0.01 * out.balance_loss.sum()


def _train_loss(graphdef, trainable, rest, tokens, seg):
    out = M.forward(graphdef, nnx.merge_state(trainable, rest), tokens, None, seg)
    tgt, mask = M.mtp_targets(tokens, seg, 1)
    mtp_nll = optax.softmax_cross_entropy_with_integer_labels(out.mtp_logits[0], tgt)
    return _loss(out, tokens, seg), ((mtp_nll * mask).sum() / mask.sum(), out.logits)


# One compiled gradient shared by the remat and the MTP-learning tests (compiles dominate the runtime).
_value_and_grad = jax.jit(jax.value_and_grad(_train_loss, argnums=1, has_aux=True), static_argnums=0)


def _toy_batch(vocab):
    """A random 7-token pattern repeated: [4, 32]."""
    pattern = np.random.default_rng(10).choice(np.arange(1, vocab), 7, replace=False)
    tokens = jnp.asarray(np.tile(pattern, (4, 5))[:, :32], jnp.int32)
    return tokens, jnp.ones(tokens.shape, jnp.int32)


def _remat_policies(jaxpr) -> list:
    """The policies of every remat in a jaxpr, nested jaxprs (scan bodies) included."""
    found = []

    def walk(j):
        for eqn in j.eqns:
            if eqn.primitive.name.startswith("remat") or eqn.primitive.name == "checkpoint":
                found.append(eqn.params.get("policy"))
            for v in eqn.params.values():
                for sub in v if isinstance(v, (tuple, list)) else (v,):
                    if hasattr(sub, "eqns"):
                        walk(sub)
                    elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                        walk(sub.jaxpr)

    walk(jaxpr.jaxpr)
    return found


def test_remat_policies_match(tiny):
    cfg, graphdef, params = tiny
    tokens, seg = _toy_batch(cfg.vocab_size)
    trainable, rest = nnx.split_state(params, nnx.Param, ...)
    expected_policy = {"none": None, "full": None,
                       "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
    results = {}
    for policy in ("none", "full", "save_dots", "save_outputs", "save_experts"):
        g = graphdef if policy == "none" else M.abstract_init(dataclasses.replace(cfg, remat=policy))[0]
        # The config is honoured: both layer scans (dense, MoE) are rematerialized with the named policy.
        found = _remat_policies(jax.make_jaxpr(lambda p, g=g: M.forward(g, p, tokens).logits)(params))
        if policy == "none":
            assert found == []
        elif policy in ("save_outputs", "save_experts"):  # a fresh save_only_these_names(...) per trace
            assert len(found) == 2 and all(f is not None for f in found), found
        else:
            assert len(found) == 2 and all(f is expected_policy[policy] for f in found), (policy, found)
        results[policy] = _value_and_grad(g, trainable, rest, tokens, seg)
    (loss0, (_, logits0)), grads0 = results["none"]
    for policy in ("full", "save_dots", "save_outputs", "save_experts"):
        (loss, (_, logits)), grads = results[policy]
        np.testing.assert_allclose(loss, loss0, rtol=1e-6)
        np.testing.assert_allclose(logits, logits0, rtol=1e-5, atol=1e-6)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(grads0)) > 1e-3


def test_bf16_close_to_fp32(tiny):
    cfg, graphdef, params = tiny
    cfg16 = dataclasses.replace(cfg, dtype="bfloat16", param_dtype="bfloat16")
    g16, abstract16 = M.abstract_init(cfg16)
    params16 = jax.tree.map(lambda a, x: x.astype(a.dtype), abstract16, params)
    assert params16["embed"][...].dtype == jnp.bfloat16
    tokens = _tokens(9)
    out16 = _fwd((cfg16, g16, params16), tokens)
    out32 = _fwd(tiny, tokens)
    assert out16.logits.dtype == jnp.float32  # logits are returned in fp32
    assert bool(jnp.all(jnp.isfinite(out16.logits))) and bool(jnp.all(jnp.isfinite(out16.mtp_logits)))
    err = jnp.linalg.norm(out16.logits - out32.logits) / jnp.linalg.norm(out32.logits)
    assert float(err) < 0.06  # 0.03 in practice; a broken bf16 path gives O(1)
    assert float(err) > 0  # bf16 really ran
    agree = jnp.mean(out16.logits.argmax(-1) == out32.logits.argmax(-1))
    assert float(agree) > 0.9


def test_mtp_learns_repeating_sequence(tiny):
    """A 7-token pattern repeated: the depth-1 MTP head (predicting t_{i+2}) must learn it."""
    cfg, graphdef, params = tiny
    tokens, seg = _toy_batch(cfg.vocab_size)
    trainable, rest = nnx.split_state(params, nnx.Param, ...)
    # The router correction bias is not a Param: the optimizer never sees it.
    assert not any(isinstance(v, RouterBias) for _, v in nnx.to_flat_state(trainable))
    assert any(isinstance(v, RouterBias) for _, v in nnx.to_flat_state(rest))
    opt = optax.adam(3e-3)

    @jax.jit
    def update(grads, opt_state, trainable):
        updates, opt_state = opt.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state

    opt_state = opt.init(trainable)
    history = []
    for _ in range(30):
        (_, (mtp, _)), grads = _value_and_grad(graphdef, trainable, rest, tokens, seg)
        trainable, opt_state = update(grads, opt_state, trainable)
        history.append(float(mtp))
    assert np.isfinite(history).all()
    assert history[0] > 0.8 * math.log(cfg.vocab_size)  # starts near chance
    assert history[-1] < 0.2 * history[0], history  # 6.3 -> 0.2 in practice


@pytest.mark.parametrize("remat", ["none", "save_experts"])
def test_unrolled_layers_equal_scanned(tiny, remat):
    """`model.layer_loop=python` (a Python loop over the stacked layers, for GPUs where the scan's stacked
    residuals cost more than they save) gives the scan's loss, logits and gradients, and no scan is left; "auto"
    scans on the CPU and loops on a GPU for small models."""
    cfg, graphdef, params = tiny
    tokens, seg = _toy_batch(cfg.vocab_size)
    trainable, rest = nnx.split_state(params, nnx.Param, ...)
    scanned = M.abstract_init(dataclasses.replace(cfg, remat=remat))[0]
    unrolled = M.abstract_init(dataclasses.replace(cfg, remat=remat, layer_loop="python"))[0]
    from deepjax.model import transformer
    assert not transformer.python_layer_loop(cfg)  # auto on the CPU
    assert transformer.python_layer_loop(dataclasses.replace(cfg, layer_loop="python"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(transformer.ops, "platform", lambda: "gpu")
        assert transformer.python_layer_loop(cfg) and not transformer.python_layer_loop(presets.deepseek_v3())
        assert not transformer.python_layer_loop(dataclasses.replace(cfg, layer_loop="scan"))
    n_scans = {g: str(jax.make_jaxpr(lambda p, g=g: M.forward(g, p, tokens).logits)(params)).count(" scan[")
               for g in (scanned, unrolled)}
    assert n_scans[scanned] == n_scans[unrolled] + 2, n_scans  # the dense and the MoE stacks
    (loss0, (_, logits0)), grads0 = _value_and_grad(scanned, trainable, rest, tokens, seg)
    (loss, (_, logits)), grads = _value_and_grad(unrolled, trainable, rest, tokens, seg)
    np.testing.assert_allclose(loss, loss0, rtol=1e-6)
    np.testing.assert_allclose(logits, logits0, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(grads)) > 1e-3


def test_stack_gradients_in_place_equal_concat():
    """The Python loop's split of a stack (`_split_dus`: the layers' gradients written into a zero-filled stack in
    place) has the gradient of the plain split (one concatenation), unused layers' zeros included, and its
    gradient is in-place slice writes, not a concatenation."""
    from deepjax.model import transformer
    a = jax.random.normal(jax.random.key(0), (5, 3, 4))
    w = jax.random.normal(jax.random.key(1), (5, 3, 4))
    loss = lambda split: lambda a: sum(jnp.sum(jnp.sin(p) * w[i]) for i, p in enumerate(split(a)) if i != 2)  # noqa
    want = jax.grad(loss(transformer._split))(a)
    got = jax.grad(loss(transformer._split_dus))(a)
    np.testing.assert_array_equal(got, want)
    assert not np.asarray(got[2]).any() and np.asarray(got[0]).any()
    jaxpr = str(jax.make_jaxpr(jax.grad(loss(transformer._split_dus)))(a))
    assert "dynamic_update_slice" in jaxpr and "concatenate" not in jaxpr


def test_stack_gradient_writes_every_slice(monkeypatch):
    """The stack `_split_dus`'s gradient writes into is uninitialized outside a mesh and on a one-device mesh
    (`lax.empty`, zeros on CPU): filled with NaN here, every layer's slice, an unused layer's zeros included, is
    overwritten; on a larger mesh it is zeros (no `empty` in the gradient's program)."""
    from deepjax.model import transformer
    from deepjax.parallel import sharding
    a = jax.random.normal(jax.random.key(0), (4, 3, 2))
    loss = lambda a: sum(jnp.sum(jnp.cos(p)) for i, p in enumerate(transformer._split_dus(a)) if i != 1)  # noqa
    want = jax.grad(lambda a: sum(jnp.sum(jnp.cos(p)) for i, p in enumerate(a) if i != 1))(a)
    assert " empty[" in str(jax.make_jaxpr(jax.grad(loss))(a))
    with sharding.use_mesh(jax.make_mesh((1,), ("data",)), {}):  # one device: as `deepjax train` on one GPU
        assert " empty[" in str(jax.make_jaxpr(jax.grad(loss))(a))
    with sharding.use_mesh(jax.make_mesh((2,), ("data",)), {}):
        under_mesh = str(jax.make_jaxpr(jax.grad(loss))(a))
    assert " empty[" not in under_mesh and "dynamic_update_slice" in under_mesh
    monkeypatch.setattr(transformer.jax.lax, "empty", lambda shape, dtype: jnp.full(shape, jnp.nan, dtype))
    np.testing.assert_array_equal(jax.grad(loss)(a), want)

"""The sampler: absorbed-MLA decode vs the full forward, greedy vs argmax, log-probs vs the training forward,
sampled frequencies vs the (truncated) softmax, EOS / max length per row, sharded vs single device, errors."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepjax.infer.fast import fused as DF
from deepjax import model as M
from deepjax.model import presets
from deepjax.infer import sampling as SP
from deepjax.parallel import sharding as S
from deepjax.config import MeshConfig, load_config

PROMPTS = ([5, 17, 300], [9, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11], [400, 2, 2, 2, 41, 7])


@pytest.fixture(scope="module")
def tiny():
    """The tiny preset with weights drawn 30x larger than init: peaked next-token distributions and far from
    uniform routing, so greedy choices and expert choices are decisive (random init is nearly uniform)."""
    cfg = dataclasses.replace(load_config("tiny").model, initializer_range=0.2)
    graphdef, params = M.init(cfg, jax.random.key(0))
    return cfg, graphdef, params


def _forward_logits(graphdef, params, seq, width: int = 64):
    """The full forward's logits at each position of seq. The row is right-padded to `width` (one compile for every
    length: causal attention and dropless experts make a position's logits independent of what follows it)."""
    n = len(seq)
    row = list(seq) + [0] * (-(-n // width) * width - n)
    return np.asarray(M.jit_forward(graphdef, params, jnp.asarray([row], jnp.int32)).logits[0, :n])


@pytest.mark.parametrize("attention", ["absorbed", "naive", "fused", "fused_all", "fused_kernels", "fused_kernels_all"])
def test_cached_decode_equals_full_forward_teacher_forced(tiny, attention):
    """Module path (absorbed and naive attention) and the fused-weight path (`generate`'s one-device default):
    its experts gathered (few tokens per step) or all (many: `experts_all_flat`), with XLA or with the Pallas
    kernels in Pallas' interpreter (`deepjax.infer.fast.kernels`: the code that runs compiled on GPU)."""
    cfg, graphdef, params = tiny
    rng = np.random.default_rng(1)
    cont = rng.integers(0, cfg.vocab_size, (len(PROMPTS), 5)).astype(np.int32)
    prompts, lengths = SP.pad_prompts(list(PROMPTS))

    @jax.jit
    def run(params):
        model = nnx.merge(graphdef, params)
        fn = M.default_experts_fn(cfg)
        cache = SP.init_cache(cfg, len(PROMPTS), prompts.shape[1] + 5)
        logits, cache = SP.prefill(model, jnp.asarray(prompts), jnp.asarray(lengths), cache, fn)
        fused = attention.startswith("fused")
        n_tokens = 64 if attention.endswith("_all") else 1  # the experts layout: all / gathered
        layers = SP.fuse_layers(model, n_tokens, "interpret" if "kernels" in attention else None,
                                cache.moe[0].shape[1]) if fused else None
        out = [logits]
        for i in range(4):
            logits, cache = SP.decode_step(model, jnp.asarray(cont[:, i]), jnp.asarray(lengths) + i, cache, fn,
                                           "absorbed" if fused else attention, layers)
            out.append(logits)
        return jnp.stack(out, 1)

    got = np.asarray(run(params))
    for b, p in enumerate(PROMPTS):
        full = _forward_logits(graphdef, params, list(p) + list(cont[b, :4]))
        want = full[len(p) - 1:len(p) + 4]
        assert np.abs(want).max() > 1.0  # not a near-zero comparison
        np.testing.assert_allclose(got[b], want, rtol=1e-5, atol=2e-5)


def test_decode_expert_paths_agree(expert_problem):
    from deepjax.model import moe
    T, D, I, E, K = 5, 16, 8, 8, 3
    x, w, idx, ws = expert_problem(0, T, D, I, E, K)
    ref = moe.routed_experts_dense(x, w, idx, *ws)
    gu, down = jnp.swapaxes(jnp.concatenate(ws[:2], -1), 1, 2), jnp.swapaxes(ws[2], 1, 2)  # contracted axis last
    np.testing.assert_allclose(DF.experts_gathered(x, w, idx, gu, down), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(DF.experts_all(x, w, idx, gu, down), ref, rtol=1e-5, atol=1e-5)
    comb = jnp.einsum("tk,tke->te", w, jax.nn.one_hot(idx, E))  # the fused all-experts layout: [E*2I, D], [D, E*I]
    flat = DF.experts_all_flat(x, comb, gu.reshape(E * 2 * I, D), jnp.moveaxis(down, 1, 0).reshape(D, E * I))
    np.testing.assert_allclose(flat, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(moe.routed_experts_dropless(x, w, idx, *ws), ref, rtol=1e-5, atol=1e-5)
    cfg = load_config("tiny").model  # 8 experts, top-2, 1 shared (appended as a 9th expert when fused)
    assert DF.experts_fn_for(cfg, 3) is DF.experts_gathered and DF.experts_fn_for(cfg, 4) is DF.experts_all
    for n in (4, 64, 1024):  # 1024: past the dense-decode bound, the model's own experts (block-sorted on XLA)
        np.testing.assert_allclose(SP.decode_experts_fn(cfg, n)(x, w, idx, *ws), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(moe.routed_experts(x, w, idx, *ws), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["tiny", "bench", "deepseek_v2", "deepseek_v2_lite", "deepseek_v3"])
def test_route_by_rank_equals_route(preset):
    """The sort-free router of the fused decode picks the same experts, in the same order, with the same weights."""
    from deepjax.model import moe
    cfg = getattr(presets, preset)()
    rng = np.random.default_rng(1)
    E = cfg.n_routed_experts
    logits = jnp.asarray(rng.normal(size=(6, E)) * 2, jnp.float32)
    bias = jnp.asarray(rng.normal(size=E) * 0.1, jnp.float32) if cfg.topk_method == "noaux_tc" else None
    tied = jnp.concatenate([logits, jnp.zeros((1, E))])  # ties everywhere: lax.top_k keeps the lower index
    for lg in (logits, tied):
        w, idx, _ = moe.route(lg, bias, cfg)
        w2, idx2 = DF.route_by_rank(lg, bias, cfg)
        np.testing.assert_array_equal(np.asarray(idx2), np.asarray(idx))
        np.testing.assert_allclose(np.asarray(w2), np.asarray(w), rtol=1e-6)


def test_route_by_rank_pieces():
    """`fused._top2_sum` (one variadic reduction) equals lax.top_k(v, 2)'s sum bit for bit, ties included; and
    `_rank_desc` with a first class gives the first class the ranks it has with every other entry -inf, the others
    ranks past them (so the group mask of route_by_rank needs no select)."""
    rng = np.random.default_rng(3)
    v = jnp.asarray(np.round(rng.normal(size=(64, 8, 8)), 1), jnp.float32)  # rounded: many ties
    v = v.at[0].set(1.0).at[1, :, :2].set(-jnp.inf)
    for f in (DF._top2_sum, jax.jit(DF._top2_sum)):
        np.testing.assert_array_equal(np.asarray(f(v)), np.asarray(jax.lax.top_k(v, 2)[0].sum(-1)))
    s = jnp.asarray(np.round(rng.normal(size=(64, 32)), 1), jnp.float32)
    first = jnp.asarray(rng.random((64, 32)) < 0.4)
    got = np.asarray(jax.jit(DF._rank_desc)(s, first))
    want = np.asarray(DF._rank_desc(jnp.where(first, s, -jnp.inf)))
    f_np = np.asarray(first)
    np.testing.assert_array_equal(got[f_np], want[f_np])
    assert (got[~f_np] >= np.broadcast_to(f_np.sum(-1, keepdims=True), got.shape)[~f_np]).all()
    assert sorted(got[5].tolist()) == list(range(32))  # a permutation
    # which needs K experts in the kept groups: a config short of them (past ModelConfig.validate) is refused
    short = dataclasses.replace(presets.tiny(), topk_group=1, num_experts_per_tok=3)
    with pytest.raises(ValueError, match=r"model\.topk_group"):
        DF.route_by_rank(jnp.zeros((2, short.n_routed_experts)), None, short)


def test_greedy_equals_repeated_full_forward_argmax(tiny):
    cfg, graphdef, params = tiny
    prompts, lengths = SP.pad_prompts(list(PROMPTS))
    sc = SP.SamplingConfig(max_new_tokens=8, temperature=0.0)
    out = SP.jit_generate(graphdef, params, jnp.asarray(prompts), jnp.asarray(lengths), jax.random.key(0), sc)
    for b, p in enumerate(PROMPTS):
        seq = list(p)
        for _ in range(8):
            seq.append(int(np.argmax(_forward_logits(graphdef, params, seq)[-1])))
        assert np.asarray(out.tokens[b]).tolist() == seq[len(p):]
    assert np.asarray(out.lengths).tolist() == [8, 8, 8] and not np.asarray(out.done).any()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 20, 0.9), (0.0, 0, 1.0)])
def test_sampler_logprobs_equal_training_forward(tiny, temperature, top_k, top_p):
    cfg, graphdef, params = tiny
    prompts, lengths = SP.pad_prompts(list(PROMPTS))
    sc = SP.SamplingConfig(max_new_tokens=7, temperature=temperature, top_k=top_k, top_p=top_p)
    out = SP.jit_generate(graphdef, params, jnp.asarray(prompts), jnp.asarray(lengths), jax.random.key(3), sc)
    t = temperature or 1.0
    for b, p in enumerate(PROMPTS):
        new = np.asarray(out.tokens[b]).tolist()
        logits = _forward_logits(graphdef, params, list(p) + new)
        logp = jax.nn.log_softmax(jnp.asarray(logits[len(p) - 1:-1]) / t, axis=-1)
        want = np.asarray(jnp.take_along_axis(logp, jnp.asarray(new)[:, None], axis=-1)[:, 0])
        np.testing.assert_allclose(np.asarray(out.logprobs[b]), want, atol=1e-5, rtol=0)


def test_sampled_frequencies_match_the_truncated_softmax():
    logits = jnp.asarray([[2.0, 1.5, 0.3, -0.5, -1.0, 0.9]])
    p = np.asarray(jax.nn.softmax(logits[0] / 0.8))
    n = 40_000
    keys = jax.random.split(jax.random.key(0), n)

    def freqs(sc):
        tok, lp = jax.jit(jax.vmap(lambda k: SP.sample(logits, k, sc)))(keys)
        np.testing.assert_allclose(np.asarray(lp[:, 0]), np.log(p[np.asarray(tok[:, 0])]), atol=1e-5)
        return np.bincount(np.asarray(tok[:, 0]), minlength=6) / n

    def close(f, q):  # 5 standard errors
        assert np.all(np.abs(f - q) <= 5 * np.sqrt(q * (1 - q) / n) + 1e-9), (f, q)

    close(freqs(SP.SamplingConfig(temperature=0.8)), p)
    top2 = np.where(np.isin(np.arange(6), [0, 1]), p, 0)
    close(freqs(SP.SamplingConfig(temperature=0.8, top_k=2)), top2 / top2.sum())
    order = np.argsort(-p)
    keep = order[:np.searchsorted(np.cumsum(p[order]), 0.75) + 1]  # smallest set reaching 0.75
    nucleus = np.where(np.isin(np.arange(6), keep), p, 0)
    assert 2 <= len(keep) < 6
    close(freqs(SP.SamplingConfig(temperature=0.8, top_p=0.75)), nucleus / nucleus.sum())


def test_categorical_by_cdf_draws_the_softmax_and_never_a_zero_probability_entry():
    """The two-level CDF search over a vocabulary of 1,000 (7 full blocks of 128 and a partial one) with masked
    entries (-inf: probability 0), a whole masked block and masked entries at both ends: frequencies within 5
    standard errors of the softmax's, masked entries never drawn, log-probs equal to log_softmax's."""
    rng = np.random.default_rng(0)
    V = 1000
    logits = rng.normal(size=V) * 2.0
    logits[[0, 1, 2, V - 1, 500]] = -np.inf
    logits[256:384] = -np.inf
    scaled = jnp.asarray(logits[None], jnp.float32)
    p = np.asarray(jax.nn.softmax(scaled[0]))
    n = 60_000
    keys = jax.random.split(jax.random.key(1), n)
    tok, lp = jax.jit(jax.vmap(lambda k: SP.categorical_by_cdf(scaled, k)))(keys)
    tok = np.asarray(tok[:, 0])
    assert tok.min() >= 0 and tok.max() < V and np.all(p[tok] > 0)
    np.testing.assert_allclose(np.asarray(lp[:, 0]), np.log(p[tok]), atol=2e-5)
    f = np.bincount(tok, minlength=V) / n
    assert np.all(np.abs(f - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-9)
    # the 12 most likely entries' frequencies, together, within 5 standard errors too (a coarser check with power)
    top = np.argsort(-p)[:12]
    q = p[top].sum()
    assert abs(f[top].sum() - q) <= 5 * np.sqrt(q * (1 - q) / n)
    # one-hot rows (all mass on one entry, at a block's first and last position and at the end) draw it every time
    for j in (0, 127, 128, V - 1):
        one = jnp.full((2, V), -jnp.inf).at[:, j].set(0.0)
        t, l = SP.categorical_by_cdf(one, jax.random.key(j))
        assert np.asarray(t).tolist() == [j, j] and np.allclose(np.asarray(l), 0.0)


def test_cdf_draw_at_block_boundaries_never_takes_a_masked_entry():
    """`cdf_draw` at uniforms on the float32 grid around every block boundary of a 16,000-entry vocabulary whose
    blocks start and end with masked entries: rounding in the block-level sums must not land on them (a review
    found r < 0 picking a block's masked first entry); u = 0 and the largest float32 below 1 too."""
    V = 16000
    x = np.random.default_rng(0).normal(size=V).astype(np.float32) * 2
    x[::128] = -np.inf
    x[127::128] = -np.inf
    scaled = jnp.asarray(x)[None]
    p = np.exp(x - x.max())
    cum = np.cumsum(p.reshape(-1, 128).sum(1), dtype=np.float64) / p.sum()
    # the 8 float32 values on each side of each boundary (the bit patterns next to it), then 0 and 1 - 2^-24
    near = (cum.astype(np.float32).view(np.int32)[:, None] + np.arange(-8, 9, dtype=np.int32)).view(np.float32)
    u = jnp.asarray(np.clip(np.append(near.ravel(), [0.0, 1 - 2.0 ** -24]), 0.0, 1 - 2.0 ** -24), jnp.float32)
    tok, lp = jax.jit(SP.cdf_draw)(jnp.broadcast_to(scaled, (u.shape[0], V)), u)
    tok = np.asarray(tok)
    assert tok.min() >= 0 and tok.max() < V
    assert np.all(np.isfinite(x[tok])), np.unique(tok[~np.isfinite(x[tok])])
    assert np.all(np.isfinite(np.asarray(lp)))


def test_eos_and_max_length_per_row(tiny):
    cfg, graphdef, params = tiny
    prompts, lengths = SP.pad_prompts(list(PROMPTS))
    args = (graphdef, params, jnp.asarray(prompts), jnp.asarray(lengths), jax.random.key(0))
    free = SP.jit_generate(*args, SP.SamplingConfig(max_new_tokens=8, temperature=0.0))
    free_tok = np.asarray(free.tokens)
    eos = int(free_tok[0, 2])
    out = SP.jit_generate(*args, SP.SamplingConfig(max_new_tokens=8, temperature=0.0, eos_ids=(eos, 99999),
                                                   pad_id=-1))
    tok, lp = np.asarray(out.tokens), np.asarray(out.logprobs)
    for b in range(len(PROMPTS)):
        hits = np.nonzero(free_tok[b] == eos)[0]
        n = hits[0] + 1 if len(hits) else 8
        assert int(out.lengths[b]) == n and bool(out.done[b]) == bool(len(hits))
        np.testing.assert_array_equal(tok[b, :n], free_tok[b, :n])
        assert (tok[b, n:] == -1).all() and (lp[b, n:] == 0).all() and (lp[b, :n] < 0).all()
    assert int(out.lengths[0]) == 3 and bool(out.done[0])


def test_sharded_generation_equals_single_device(tiny):
    cfg, graphdef, params = tiny
    rng = np.random.default_rng(5)
    prompts = [list(rng.integers(0, cfg.vocab_size, n)) for n in (3, 9, 5, 12, 7, 2, 8, 4)]
    P, L = SP.pad_prompts(prompts)
    sc = SP.SamplingConfig(max_new_tokens=6, temperature=0.0)
    ref = SP.jit_generate(graphdef, params, jnp.asarray(P), jnp.asarray(L), jax.random.key(0), sc)
    mcfg = MeshConfig(data=2, fsdp=2, expert=2)
    mesh, rules = S.make_mesh(mcfg), S.rules_for(mcfg.rules)
    shardings = M.param_shardings(params, mesh, rules)
    sharded = jax.device_put(params, shardings)
    batch = S.batch_spec(mesh, rules)
    with S.use_mesh(mesh, rules):
        out = SP.jit_generate(graphdef, sharded, jax.device_put(jnp.asarray(P), batch),
                              jax.device_put(jnp.asarray(L), S.batch_spec(mesh, rules, ndim=1)),
                              jax.random.key(0), sc)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref.logprobs), atol=1e-5)
    assert len(out.tokens.sharding.device_set) == 8


@pytest.mark.parametrize("eos,fused", [(False, True), (True, True), (False, False)])
def test_mtp_drafting_gives_the_plain_greedy_output(tiny, eos, fused):
    cfg, graphdef, params = tiny
    prompts, lengths = SP.pad_prompts(list(PROMPTS))
    args = (graphdef, params, jnp.asarray(prompts), jnp.asarray(lengths), jax.random.key(0))
    plain = SP.jit_generate(*args, SP.SamplingConfig(max_new_tokens=10, temperature=0.0))
    eos_ids = (int(plain.tokens[1, 4]),) if eos else ()
    sc = SP.SamplingConfig(max_new_tokens=10, temperature=0.0, eos_ids=eos_ids,
                           decoder="fused" if fused else "model")
    plain = SP.jit_generate(*args, sc)
    drafted = SP.jit_generate(*args, dataclasses.replace(sc, mtp_draft=True))
    np.testing.assert_array_equal(np.asarray(drafted.tokens), np.asarray(plain.tokens))
    np.testing.assert_allclose(np.asarray(drafted.logprobs), np.asarray(plain.logprobs), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(drafted.lengths), np.asarray(plain.lengths))
    np.testing.assert_array_equal(np.asarray(drafted.done), np.asarray(plain.done))
    n, prop, acc = (np.asarray(x) for x in (drafted.lengths, drafted.drafts_proposed, drafted.drafts_accepted))
    assert (acc <= prop).all() and (1 + prop <= n).all() and (n <= 1 + prop + acc).all()
    assert plain.drafts_proposed is None


def test_mtp_accepted_drafts_emit_two_tokens_per_step(tiny):
    """With a zero head every position's greedy choice is token 0, for the main model and the MTP module alike:
    every draft is right, so each step emits two tokens (the acceptance path of the drafting loop)."""
    cfg, graphdef, params = tiny
    zero_head = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.zeros_like(x) if M.path_str(p).split(".")[0] == "head" else x, params)
    prompts, lengths = SP.pad_prompts([[7] * 5, [3, 9, 11]])
    sc = SP.SamplingConfig(max_new_tokens=9, temperature=0.0, mtp_draft=True)
    out = SP.jit_generate(graphdef, zero_head, jnp.asarray(prompts), jnp.asarray(lengths), jax.random.key(0), sc)
    assert (np.asarray(out.tokens) == 0).all() and np.asarray(out.lengths).tolist() == [9, 9]
    assert np.asarray(out.drafts_proposed).tolist() == [4, 4]  # 1 from prefill, then 4 steps x 2 tokens
    assert np.asarray(out.drafts_accepted).tolist() == [4, 4]
    np.testing.assert_allclose(np.asarray(out.logprobs), -np.log(cfg.vocab_size), rtol=1e-5)


def test_bad_sampling_settings_are_named(tiny):
    cfg, graphdef, params = tiny
    prompts, lengths = SP.pad_prompts(list(PROMPTS))
    cases = [(dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"),
             (dict(temperature=-0.5), "temperature"), (dict(max_new_tokens=0), "max_new_tokens"),
             (dict(decoder="flash"), "decoder"), (dict(cache_len=10), "cache_len"),
             (dict(mtp_draft=True, temperature=0.7), "mtp_draft"), (dict(decoder="triton"), "decoder"),
             (dict(kernel_set=("attention", "mlp")), "kernel_set"),
             (dict(kernel_tuning=("route.warps=4",)), "kernel_tuning"),
             (dict(kernel_tuning=("grouped.decode_min_tokens='64'",)), "kernel_tuning"),
             (dict(kernel_tuning=("down.split=1",)), "kernel_tuning"),
             (dict(kernel_tuning=("down=1",)), "kernel_tuning"),
             (dict(kernel_tuning=("grouped.decode_bm=48",)), "kernel_tuning"),
             (dict(kernel_tuning=("grouped.down_out=bf16",)), "kernel_tuning")]
    if jax.default_backend() != "gpu":
        cases.append((dict(decoder="pallas"), "decoder"))  # Pallas here compiles for GPU only
    for kw, field in cases:
        with pytest.raises(ValueError, match=f"sampling.{field}|{field}"):
            SP.jit_generate(graphdef, params, jnp.asarray(prompts), jnp.asarray(lengths), jax.random.key(0),
                            SP.SamplingConfig(**kw))
    with pytest.raises(ValueError, match="at least one token"):
        SP.pad_prompts([[1, 2], []])


def test_cache_is_576_values_per_token_per_layer_at_v3():
    v3 = dataclasses.replace(presets.deepseek_v3(), dtype="bfloat16")
    assert v3.kv_lora_rank + v3.qk_rope_head_dim == 576
    assert SP.cache_bytes_per_token(v3) == 70_272  # docs/deepseek.md, MLA: 61 layers x 576 x 2 bytes
    cache = jax.eval_shape(lambda: SP.init_cache(v3, 2, 16))
    assert len(cache.dense) == 3 and len(cache.moe) == 58
    assert {c.shape for c in cache.dense + cache.moe} == {(2, 16, 576)}  # rows [c (512) ; k_pe (64)]


def test_eval_and_grpo_take_the_fused_decode_on_one_device(tiny, capsys, monkeypatch):
    """`text.complete` (the one path of `deepjax eval` and GRPO's rollouts): on a one-device mesh it samples outside
    the mesh and takes the fused decode; on the 8-device mesh the modules decode, said once on stderr. Greedy
    tokens agree."""
    from deepjax.data.tokenizer import ByteTokenizer
    from deepjax.infer import text

    cfg, graphdef, params = tiny
    tok = ByteTokenizer()
    sc = SP.SamplingConfig(max_new_tokens=6, temperature=0.0)
    one = S.make_mesh(MeshConfig(fsdp=1), devices=jax.devices()[:1])
    many = S.make_mesh(MeshConfig())
    rules = S.rules_for(MeshConfig().rules)
    assert many.devices.size == 8
    assert text.decode_path(sc, one, 8) == "fused" and text.decode_path(sc, many, 8) == "model"
    assert text.decode_path(sc, one, 512) == "fused"  # GRPO's 64 prompts x 8 (faster fused on an H100)
    assert text.decode_path(sc, one, SP.FUSED_DECODE_MAX_TOKENS + 1) == "model"
    assert text.decode_path(dataclasses.replace(sc, decoder="model"), one, 8) == "model"
    with pytest.raises(ValueError, match="sampling.decoder='fused'"):  # a fused decoder named on 8 devices
        text.decode_path(dataclasses.replace(sc, decoder="fused"), many, 8)
    prompts = [tok.encode(p, add_bos=True) for p in ("1 + 2 =", "hello", "7 - 3 =", "ab", "x", "99", "0", "q?")]
    key = jax.random.key(0)
    fused = []  # traces that built the fused weights
    real = SP.fuse_layers
    monkeypatch.setattr(SP, "fuse_layers", lambda *a, **k: fused.append(1) or real(*a, **k))
    monkeypatch.setattr(text, "_SAID", set())  # said once per process: earlier tests may have said it already
    a = text.complete(graphdef, params, tok, prompts, key, sc, one, rules)
    assert fused == [1]
    capsys.readouterr()
    b = text.complete(graphdef, params, tok, prompts, key, sc, many, rules)
    assert fused == [1]
    text.complete(graphdef, params, tok, prompts, key, sc, many, rules)
    assert capsys.readouterr().err.count("the model's modules decode on this 8-device mesh") == 1
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)


@pytest.mark.parametrize("decoder", ["model", "fused"])  # the cast happens before any decoder runs
def test_float32_master_weights_are_cast_once_without_changing_samples(decoder, monkeypatch):
    """GRPO samples from float32 master weights with bf16 compute: `generate` casts them to bf16 once per call
    (`compute_params`; the router's float32 gate and bias kept) rather than at every decode step. The samples, their
    log-probs and routes equal those of the uncast weights exactly (the module and fused decoders)."""
    cfg = dataclasses.replace(presets.tiny(), dtype="bfloat16", param_dtype="float32")
    graphdef, params = M.init(cfg, jax.random.key(2))
    cast = SP.compute_params(params, cfg.dtype)
    kinds = {jax.tree_util.keystr(p): x.dtype for p, x in jax.tree_util.tree_flatten_with_path(cast)[0]}
    assert kinds["['moe_layers']['ffn']['gate'].value"] == jnp.float32
    assert kinds["['moe_layers']['ffn']['bias'].value"] == jnp.float32
    assert kinds["['moe_layers']['ffn']['w_up'].value"] == jnp.bfloat16 and kinds["['head'].value"] == jnp.bfloat16
    prompts, lengths = SP.pad_prompts(list(PROMPTS))
    sc = SP.SamplingConfig(max_new_tokens=6, temperature=1.0, decoder=decoder, record_routes=True)
    run = lambda: SP.generate(graphdef, params, jnp.asarray(prompts), jnp.asarray(lengths),  # noqa: E731
                              jax.random.key(5), sc)
    got = jax.jit(run)()
    monkeypatch.setattr(SP, "compute_params", lambda p, dtype: p)
    want = jax.jit(run)()
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_array_equal(np.asarray(got.routes), np.asarray(want.routes))
    np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(want.logprobs), rtol=0, atol=1e-6)


def test_compiler_options_by_rows():
    """jit_generate's XLA options: cuBLAS for XLA's dense products from CUBLAS_MIN_ROWS rows on one GPU (measured at
    GRPO's 512), the concurrent command buffers on one GPU at any size, nothing on CPU or under a mesh."""
    many, few = SP.CUBLAS_MIN_ROWS, SP.CUBLAS_MIN_ROWS - 1
    assert SP.compiler_options("gpu", True, many) == {**SP.GPU_COMPILER_OPTIONS, "xla_gpu_enable_triton_gemm": False}
    assert SP.compiler_options("gpu", True, few) == SP.GPU_COMPILER_OPTIONS
    assert SP.compiler_options("gpu", False, many) is None and SP.compiler_options("cpu", True, many) is None


@pytest.mark.parametrize("early", [False, True])
def test_stop_checked_every_k_steps_changes_nothing(tiny, monkeypatch, early):
    """With EOS ids the loop checks whether every row has ended once every K steps (`STOP_CHECK_EVERY`, dividing
    max_new_tokens): tokens, log-probs, lengths, done and each row's routes equal a check after every step, when
    rows end in different chunks and when every row ends in the first chunk (the chunk then runs on)."""
    cfg, graphdef, params = tiny
    prompts, lengths = SP.pad_prompts(list(PROMPTS))
    args = (graphdef, params, jnp.asarray(prompts), jnp.asarray(lengths), jax.random.key(3))
    N = 24  # K = gcd(24, 16) = 8: three chunks
    free = np.asarray(SP.jit_generate(*args, SP.SamplingConfig(max_new_tokens=N, temperature=0.0)).tokens)
    eos = tuple(sorted({int(t) for t in free[:, 1]})) if early else (int(free[0, 10]), int(free[1, 3]))
    sc = SP.SamplingConfig(max_new_tokens=N, temperature=0.0, eos_ids=eos, record_routes=True)
    outs = []
    for every in (1, SP.STOP_CHECK_EVERY):
        monkeypatch.setattr(SP, "STOP_CHECK_EVERY", every)
        SP._JITS.clear()  # (read while tracing)
        outs.append(SP.jit_generate(*args, sc))
    one, chunked = outs
    n = np.asarray(one.lengths)
    assert (n < N).any() and (n <= 2).all() == early
    for f in ("tokens", "logprobs", "lengths", "done"):
        np.testing.assert_array_equal(np.asarray(getattr(one, f)), np.asarray(getattr(chunked, f)), err_msg=f)
    r1, rk = np.asarray(one.routes), np.asarray(chunked.routes)
    for b in range(len(PROMPTS)):  # positions up to the row's last token
        end = int(lengths[b]) + int(n[b])
        np.testing.assert_array_equal(r1[b, :end], rk[b, :end])
    assert np.array_equal(r1, rk) != early  # every row ended early: the chunk ran on past them (routes written)

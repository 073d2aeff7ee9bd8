"""Routing replay (DeepSeek-V3.2's "Keep Routing"): the sampler records the experts every token used in every MoE
layer, the trainer's forward can use them instead of its own router's choice (gate weights still from its current
scores, so the router is trained), and the share of (token, layer) routes that differ is measured.

Checks: the recorded routes equal the full forward's own routes on every real position (model and fused decoders);
with the sampler's parameters, replaying changes nothing; with a perturbed router, the replayed forward uses exactly
the recorded experts where the unreplayed one does not, the router still gets a gradient, and `grpo_objective`'s
routing_mismatch equals the share computed by hand."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepjax import model as M
from deepjax.config import load_config
from deepjax.infer import sampling as SP
from deepjax.model import moe
from deepjax.rl import loss as G
from deepjax.rl import update
from deepjax.train import step as TS

PROMPTS = ([5, 17, 300], [9, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11], [400, 2, 2, 2, 41, 7])
N_NEW = 6


@pytest.fixture(scope="module")
def tiny():
    cfg = dataclasses.replace(load_config("tiny").model, initializer_range=0.2)
    assert cfg.n_moe_layers > 0
    graphdef, params = M.init(cfg, jax.random.key(0))
    return cfg, graphdef, params


def _rollouts(graphdef, params, decoder: str):
    prompts, lengths = SP.pad_prompts(list(PROMPTS))
    sc = SP.SamplingConfig(max_new_tokens=N_NEW, temperature=1.0, decoder=decoder, record_routes=True)
    out = SP.jit_generate(graphdef, params, jnp.asarray(prompts), jnp.asarray(lengths), jax.random.key(3), sc)
    assert out.routes is not None and out.routes.shape[:2] == (len(PROMPTS), SP.cache_length(sc, prompts.shape[1]))
    assert out.routes.dtype == jnp.int16  # converted in the sampler's program: half the bytes to the host
    T = prompts.shape[1] + N_NEW
    return update.rollouts_from_samples(prompts, lengths, np.asarray(out.tokens), np.asarray(out.logprobs),
                                        np.asarray(out.lengths), np.zeros(len(PROMPTS)), T,
                                        routes=np.asarray(out.routes))


def _forward(graphdef, params, b, routes=None, replay=True):
    return jax.jit(update._forward, static_argnums=(0, 5, 7))(
        graphdef, params, b.tokens, b.positions, b.segment_ids, None, routes, replay)


def _as_sets(routes_LBTK):
    return np.sort(np.asarray(routes_LBTK), axis=-1)


@pytest.mark.parametrize("decoder", ["model", "fused"])
def test_recorded_routes_are_the_forward_routes(tiny, decoder):
    cfg, graphdef, params = tiny
    b = _rollouts(graphdef, params, decoder)
    real = np.asarray(b.segment_ids) > 0
    rec = np.asarray(b.routes)  # [B, T, L, K]
    assert rec.shape[2:] == (cfg.n_moe_layers, cfg.num_experts_per_tok)
    assert (rec[real] >= 0).all() and (rec[~real] == -1).all()  # every fed token recorded, nothing else
    own = np.moveaxis(_as_sets(_forward(graphdef, params, b).routes), 0, 2)  # [B, T, L, K]
    np.testing.assert_array_equal(np.sort(rec, -1)[real], own[real])


def _perturbed(params, scale=0.5):
    """The router's gate weights moved, so some tokens route elsewhere (the rest unchanged)."""
    key = iter(jax.random.split(jax.random.key(7), 64))

    def move(path, x):
        return x + scale * jnp.std(x) * jax.random.normal(next(key), x.shape, x.dtype) if \
            ".ffn.gate." in M.path_str(path) else x
    return jax.tree_util.tree_map_with_path(move, params)


def test_replay_uses_the_recorded_experts(tiny):
    cfg, graphdef, params = tiny
    b = _rollouts(graphdef, params, "model")
    routes = b.routes  # [B, T, L, K], as Rollouts carry them (`update._forward` moves the layer axis first)
    real = np.asarray(b.segment_ids) > 0
    # with the sampler's own parameters, replay changes nothing
    same = _forward(graphdef, params, b, routes)
    np.testing.assert_allclose(np.asarray(same.logits), np.asarray(_forward(graphdef, params, b).logits), atol=1e-5)
    assert float(np.sum(same.route_diff)) == 0

    moved = _perturbed(params)
    own = _forward(graphdef, moved, b)
    replayed = _forward(graphdef, moved, b, routes)
    want = _as_sets(jnp.moveaxis(routes, 2, 0))
    differ = (_as_sets(own.routes) != want).any(-1)[:, real]  # [L, n_real]
    assert differ.any() and not differ.all(), differ.mean()  # the perturbation moved some routes, not all
    np.testing.assert_array_equal(_as_sets(replayed.routes)[:, real], want[:, real])  # replayed: the recorded ones
    # the layers as a Python loop (`model.layer_loop`, GPU's default) replay each layer's own routes too
    loop = _forward(M.abstract_init(dataclasses.replace(cfg, layer_loop="python"))[0], moved, b, routes)
    np.testing.assert_array_equal(np.asarray(loop.routes), np.asarray(replayed.routes))
    np.testing.assert_allclose(np.asarray(loop.logits), np.asarray(replayed.logits), atol=1e-5)
    # per layer, the tokens whose own choice differs: in the first MoE layer those of the unreplayed forward; deeper,
    # the trainer's own choice on the replayed path's hidden states
    assert float(replayed.route_diff[0]) == differ[0].sum() and (np.asarray(replayed.route_diff) > 0).all()
    assert np.abs(np.asarray(replayed.logits) - np.asarray(own.logits)).max() > 1e-3
    # measuring without replaying: the forward's own routes and outputs, the same count
    measured = _forward(graphdef, moved, b, routes, replay=False)
    np.testing.assert_array_equal(np.asarray(measured.routes), np.asarray(own.routes))
    np.testing.assert_array_equal(np.asarray(measured.route_diff), differ.sum(-1))

    # the router is still trained under replay: the gate weights of the used experts come from its scores
    def loss(p):
        return jnp.sum(jax.nn.log_softmax(update._forward(graphdef, p, b.tokens, b.positions, b.segment_ids, None,
                                                          routes).logits)[..., 0])
    grads = jax.jit(jax.grad(loss))(moved)  # (jitted: compiled once, not op by op)
    gate = [g for path, g in jax.tree_util.tree_leaves_with_path(grads) if M.path_str(path).startswith("moe_layers.ffn.gate.")]
    assert gate and all(float(jnp.abs(g).max()) > 0 for g in gate)


def test_replay_route_weights(tiny):
    """moe.replay_route: the given experts with the current scores' gate weights; -1 rows route themselves."""
    cfg = tiny[0]
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    logits = jax.random.normal(jax.random.key(0), (5, E)) * 3
    given = jnp.asarray(np.stack([np.arange(K), np.arange(E - K, E), -np.ones(K), np.arange(K), -np.ones(K)]),
                        jnp.int32)
    w, idx, scores, own = moe.replay_route(logits, None, given, cfg)
    w0, idx0, _ = moe.route(logits, None, cfg)
    for t in range(5):
        if given[t, 0] >= 0:
            np.testing.assert_array_equal(np.asarray(idx[t]), np.asarray(given[t]))
            want = moe.gate_weights(jnp.take(scores[t], given[t])[None], cfg)[0]
            np.testing.assert_allclose(np.asarray(w[t]), np.asarray(want), rtol=1e-6)
        else:
            np.testing.assert_array_equal(np.asarray(idx[t]), np.asarray(idx0[t]))
            np.testing.assert_allclose(np.asarray(w[t]), np.asarray(w0[t]), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(own), np.asarray(idx0))


def test_grpo_objective_reports_the_share_of_routes_that_differ(tiny):
    cfg, graphdef, params = tiny
    b = _rollouts(graphdef, params, "model")
    moved = _perturbed(params)
    gcfg = G.GRPOConfig(beta=0.0, group_size=3)
    real = np.asarray(b.segment_ids) > 0
    own = _as_sets(_forward(graphdef, moved, b).routes)
    want = float((own != _as_sets(jnp.moveaxis(b.routes, 2, 0))).any(-1)[:, real].mean())
    objective = jax.jit(update.grpo_objective, static_argnums=(2, 4, 5, 6, 7))
    _, (metrics, _) = objective(*TS.split_params(moved), graphdef, b, gcfg, 1.0, None, False)
    assert abs(float(metrics["routing_mismatch"]) - want) < 1e-6 and want > 0
    _, (metrics, _) = objective(*TS.split_params(moved), graphdef, b, gcfg, 1.0, None, True)  # (see above: deeper
    diff = _forward(graphdef, moved, b, b.routes).route_diff  # layers on the replayed path)
    assert abs(float(metrics["routing_mismatch"]) - float(np.sum(diff)) / (real.sum() * len(diff))) < 1e-6
    _, (metrics, _) = objective(*TS.split_params(params), graphdef, b, gcfg, 1.0, None, True)
    assert float(metrics["routing_mismatch"]) == 0
    _, (metrics, _) = objective(*TS.split_params(params), graphdef, b._replace(routes=None), gcfg, 1.0, None, True)
    assert "routing_mismatch" not in metrics


def test_routes_out_keeps_int32_past_int16_expert_ids():
    routes = jnp.full((1, 2, 1, 2), 32_767, jnp.int32)
    assert SP.routes_out(routes, SimpleNamespace(n_routed_experts=32_768)).dtype == jnp.int16  # ids <= 32,767
    wide = SP.routes_out(routes, SimpleNamespace(n_routed_experts=32_769))
    assert wide.dtype == jnp.int32 and int(wide.max()) == 32_767
    assert SP.routes_out(None, SimpleNamespace(n_routed_experts=8)) is None


def test_routes_on_device_equal_the_host_path(tiny):
    """GRPO's rollout leaves the routes on the device (`text.complete(routes_on_device=True)`): placed there by
    `update.routes_on_device`, they equal `rollouts_from_samples`' host placement, cut to the rows' width or padded
    with -1 past the sampler's cache, int16 kept."""
    cfg, graphdef, params = tiny
    prompts, lengths = SP.pad_prompts(list(PROMPTS))
    sc = SP.SamplingConfig(max_new_tokens=N_NEW, temperature=1.0, record_routes=True)
    out = SP.jit_generate(graphdef, params, jnp.asarray(prompts), jnp.asarray(lengths), jax.random.key(3), sc)
    S = out.routes.shape[1]
    for T in (prompts.shape[1] + N_NEW, S + 5):  # cut (T < S), padded (T > S)
        b = update.rollouts_from_samples(prompts, lengths, np.asarray(out.tokens), np.asarray(out.logprobs),
                                         np.asarray(out.lengths), np.zeros(len(PROMPTS)), T,
                                         routes=np.asarray(out.routes))
        got = update.routes_on_device(out.routes, jnp.asarray(b.segment_ids))
        assert got.dtype == jnp.int16 and got.shape == b.routes.shape == (len(PROMPTS), T, cfg.n_moe_layers,
                                                                           cfg.num_experts_per_tok)
        np.testing.assert_array_equal(np.asarray(got), b.routes)
        assert (b.routes[b.segment_ids == 0] == -1).all() and (b.routes[b.segment_ids > 0] >= 0).all()

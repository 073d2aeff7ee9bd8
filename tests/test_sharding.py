"""Sharded execution on 8 fake CPU devices equals the single-device result."""

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepjax import model as M
from deepjax.model import presets
from deepjax.parallel import sharding as S
from deepjax.model.expert_parallel import ShardedExperts
from deepjax.model.moe import routed_experts_dense

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "bench_param_specs.json")
MESHES = {
    "data8": S.MeshConfig(data=8, fsdp=1),
    "fsdp8": S.MeshConfig(fsdp=8),
    "expert8": S.MeshConfig(fsdp=1, expert=8),
    "data2_fsdp2_expert2": S.MeshConfig(data=2, fsdp=2, expert=2),
    "fsdp2_expert2_tensor2": S.MeshConfig(fsdp=2, expert=2, tensor=2),
}


def _loss(params, graphdef, tokens, mesh_context=None):
    out = M.forward(graphdef, params, tokens)
    # Logits, MTP logits and the balance loss all enter, so every path carries gradient.
    loss = jnp.mean(out.logits**2) + jnp.mean(out.mtp_logits**2) + out.balance_loss.sum()
    return loss, out.expert_load


def _value_and_grad(params, graphdef, tokens):
    """Traced afresh under the caller's mesh context (jit's cache does not see `use_mesh`)."""
    return jax.jit(jax.value_and_grad(_loss, has_aux=True), static_argnums=(1, 3))(
        params, graphdef, tokens, S.context_key())


@pytest.fixture(scope="module")
def reference():
    cfg = presets.tiny()
    graphdef, params = M.init(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (8, 12), 0, cfg.vocab_size)
    (loss, load), grads = _value_and_grad(params, graphdef, tokens)
    return cfg, tokens, loss, load, grads, graphdef, params


def _rel(a, b):
    return float(jnp.abs(a - b).max() / (jnp.abs(b).max() + 1e-30))


@pytest.mark.parametrize("name", list(MESHES) + ["data2_fsdp2_expert2/python"])
def test_sharded_equals_single_device(reference, name):
    """.../python: the layer stacks as a Python loop (`model.layer_loop`, GPU's default) under the mesh."""
    cfg, tokens, loss, load, grads, graphdef, params = reference
    name, _, loop = name.partition("/")
    if loop:
        graphdef = M.abstract_init(dataclasses.replace(cfg, layer_loop=loop))[0]
    mcfg = MESHES[name]
    mesh, rules = S.make_mesh(mcfg), S.rules_for(mcfg.rules)
    shardings = M.param_shardings(params, mesh, rules)
    params = jax.device_put(params, shardings)
    # Parameters really are distributed as the rules say (not silently replicated).
    w = params["moe_layers"]["ffn"]["w_gate"][...]
    assert w.sharding.spec == shardings["moe_layers"]["ffn"]["w_gate"].spec
    if mcfg.expert > 1:
        assert "expert" in str(w.sharding.spec)
    sharded_tokens = jax.device_put(tokens, S.batch_spec(mesh, rules))
    with S.use_mesh(mesh, rules):
        (loss2, load2), grads2 = _value_and_grad(params, graphdef, sharded_tokens)
    assert _rel(loss2, loss) < 1e-5
    np.testing.assert_array_equal(np.asarray(load2), np.asarray(load))  # counts are exact
    for (path, g1), (_, g2) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(grads2)):
        assert _rel(g2[...], g1[...]) < 1e-5, path


def _moe_inputs(T=64, D=16, I=8, E=8, K=3, seed=0):
    ks = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(ks[0], (T, D))
    logits = jax.random.normal(ks[1], (T, E))
    idx = jax.lax.top_k(logits, K)[1].astype(jnp.int32)
    w = jax.random.uniform(ks[2], (T, K))
    wg = jax.random.normal(ks[3], (E, D, I)) * 0.3
    wu = jax.random.normal(ks[4], (E, D, I)) * 0.3
    wd = jax.random.normal(ks[5], (E, I, D)) * 0.3
    return x, w, idx, wg, wu, wd


@pytest.mark.parametrize("mcfg,chunk", [(S.MeshConfig(fsdp=1, expert=8), 1024), (S.MeshConfig(fsdp=1, expert=8), 4),
                                        (S.MeshConfig(fsdp=2, expert=2, tensor=2), 1024)])
def test_expert_parallel_dropless_equals_dense_reference(monkeypatch, mcfg, chunk):
    """chunk 4: each device's 8 tokens go through the exchange in two blocks."""
    import deepjax.model.expert_parallel as EP

    monkeypatch.setattr(EP, "TOKEN_CHUNK", chunk)
    mesh, rules = S.make_mesh(mcfg), S.rules_for(mcfg.rules)
    args = _moe_inputs()
    fn = ShardedExperts(mesh, rules)
    y, dropped = jax.jit(fn)(*args)
    ref = routed_experts_dense(*args)
    assert int(dropped) == 0
    assert _rel(y, ref) < 1e-5
    # Gradients through the all-to-all too.
    g = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a)[0] ** 2), argnums=(0, 1, 3, 5)))(*args)
    g_ref = jax.jit(jax.grad(lambda *a: jnp.sum(routed_experts_dense(*a) ** 2), argnums=(0, 1, 3, 5)))(*args)
    for a, b in zip(g, g_ref):
        assert _rel(a, b) < 1e-5


def _emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                                axis_name):
    """ragged_all_to_all's documented semantics from all_gather (XLA:CPU lacks the collective): lets the
    ragged path's offset arithmetic run here."""
    me = jax.lax.axis_index(axis_name)
    ops = jax.lax.all_gather(operand, axis_name)  # [P, rows, ...]
    in_off = jax.lax.all_gather(input_offsets, axis_name)[:, me]  # where source s's slice for me starts
    sizes = jax.lax.all_gather(send_sizes, axis_name)[:, me]
    out_off = jax.lax.all_gather(output_offsets, axis_name)[:, me]  # where it lands in my output
    r = jnp.arange(output.shape[0])
    for s in range(ops.shape[0]):
        inside = (r >= out_off[s]) & (r < out_off[s] + sizes[s])
        src = jnp.clip(in_off[s] + r - out_off[s], 0, operand.shape[0] - 1)
        shape = (-1,) + (1,) * (output.ndim - 1)
        output = jnp.where(inside.reshape(shape), ops[s][src], output)
    return output


@pytest.mark.parametrize("capacity_factor", [None, 1.5])
def test_ragged_exchange_equals_padded(monkeypatch, capacity_factor):
    """The ragged_all_to_all path (GPU/TPU) gives the padded path's result, drops included."""
    import deepjax.model.expert_parallel as EP

    mcfg = S.MeshConfig(fsdp=1, expert=8)
    mesh, rules = S.make_mesh(mcfg), S.rules_for(mcfg.rules)
    x, w, idx, wg, wu, wd = _moe_inputs(seed=5)
    idx = jnp.where(jnp.arange(64)[:, None] % 3 != 0, jnp.array([[0, 1, 5]]), idx).astype(jnp.int32)
    args = (x, w, idx, wg, wu, wd)
    y_pad, d_pad = jax.jit(ShardedExperts(mesh, rules, capacity_factor, exchange="padded"))(*args)
    monkeypatch.setattr(EP, "ragged_all_to_all", _emulated_ragged_all_to_all)
    ragged = ShardedExperts(mesh, rules, capacity_factor, exchange="ragged")
    y_rag, d_rag = jax.jit(ragged)(*args)
    assert int(d_rag) == int(d_pad) and (capacity_factor is None) == (int(d_pad) == 0)
    assert _rel(y_rag, y_pad) < 1e-6
    g_rag = jax.jit(jax.grad(lambda x, wg: jnp.sum(ragged(x, w, idx, wg, wu, wd)[0] ** 2), argnums=(0, 1)))(x, wg)
    padded = ShardedExperts(mesh, rules, capacity_factor, exchange="padded")
    g_pad = jax.jit(jax.grad(lambda x, wg: jnp.sum(padded(x, w, idx, wg, wu, wd)[0] ** 2), argnums=(0, 1)))(x, wg)
    for a, b in zip(g_rag, g_pad):
        assert _rel(a, b) < 1e-5


def test_capacity_mode_drops_exactly_the_overflow():
    """Expert axis 8 also splits the tokens 8 ways. On each source device, assignments are sorted by
    expert; the ones past C = ceil(c X / P) in a destination's block are dropped."""
    mcfg = S.MeshConfig(fsdp=1, expert=8)
    mesh, rules = S.make_mesh(mcfg), S.rules_for(mcfg.rules)
    T, K, E, P = 64, 3, 8, 8
    x, w, idx, wg, wu, wd = _moe_inputs(T=T, E=E, K=K, seed=3)
    # Skew the routing so some destinations overflow: most tokens prefer experts 0 and 1 (device 0, 1).
    idx = jnp.where(jnp.arange(T)[:, None] % 4 != 0, jnp.array([[0, 1, 2]]), idx).astype(jnp.int32)
    cf = 1.5
    fn = ShardedExperts(mesh, rules, capacity_factor=cf)
    y, dropped = jax.jit(fn)(x, w, idx, wg, wu, wd)

    idx_np, keep = np.asarray(idx), np.ones((T, K), bool)
    T_l, E_l = T // P, E // P
    X = T_l * K
    C = math.ceil(cf * X / P)
    for src in range(P):
        rows = range(src * T_l, (src + 1) * T_l)
        assignments = sorted(((idx_np[t, k], t, k) for t in rows for k in range(K)),
                             key=lambda a: (a[0], (a[1] - src * T_l) * K + a[2]))
        per_dest = {}
        for e, t, k in assignments:
            d = e // E_l
            per_dest[d] = per_dest.get(d, 0) + 1
            if per_dest[d] > C:
                keep[t, k] = False
    assert (~keep).sum() > 0, "the test must actually overflow"
    assert int(dropped) == (~keep).sum()
    ref = routed_experts_dense(x, w * keep, idx, wg, wu, wd)
    assert _rel(y, ref) < 1e-5


def test_init_sharded_places_and_matches_unsharded_init(reference):
    """Parameters are created in their shardings (one jit, out_shardings) with the same values as init."""
    cfg, _, _, _, _, _, params = reference
    mcfg = MESHES["fsdp2_expert2_tensor2"]
    mesh, rules = S.make_mesh(mcfg), S.rules_for(mcfg.rules)
    _, sharded, shardings = M.init_sharded(cfg, jax.random.key(0), mesh, rules)
    for (path, a), (_, b), (_, sh) in zip(nnx.to_flat_state(params), nnx.to_flat_state(sharded),
                                          jax.tree_util.tree_leaves_with_path(shardings)):
        assert b[...].sharding == sh, path
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]))
    w = sharded["moe_layers"]["ffn"]["w_gate"][...]
    assert w.addressable_shards[0].data.shape == (w.shape[0], w.shape[1] // 2, w.shape[2] // 2, w.shape[3] // 2)


def test_capacity_factor_through_the_model(reference):
    cfg, tokens, *_ = reference
    mcfg = MESHES["expert8"]
    mesh, rules = S.make_mesh(mcfg), S.rules_for(mcfg.rules)
    tight = dataclasses.replace(cfg, capacity_factor=0.5)
    graphdef, params, _ = M.init_sharded(tight, jax.random.key(0), mesh, rules)
    with S.use_mesh(mesh, rules):
        out = M.jit_forward(graphdef, params, jax.device_put(tokens, S.batch_spec(mesh, rules)))
    assert int(out.dropped_tokens) > 0


def _spec_dump():
    _, abstract = M.abstract_init(presets.bench())
    return {preset: M.spec_table(abstract, S.rules_for(preset)) for preset in sorted(S.RULE_PRESETS)}


def test_golden_partition_specs_for_bench():
    """Every parameter's PartitionSpec under each preset; regenerate with DEEPJAX_UPDATE_GOLDEN=1."""
    dump = _spec_dump()
    if os.environ.get("DEEPJAX_UPDATE_GOLDEN"):
        os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
        with open(GOLDEN, "w") as f:
            json.dump(dump, f, indent=1, sort_keys=True)
    with open(GOLDEN) as f:
        golden = json.load(f)
    assert dump == golden
    # Spot checks that the golden file itself says what we mean.
    assert golden["fsdp_expert"]["moe_layers.ffn.w_gate"] == [None, "expert", "fsdp"]  # [layer, E, D, I]
    assert golden["fsdp"]["moe_layers.ffn.w_gate"] == [None, None, "fsdp"]
    assert golden["fsdp_tensor"]["moe_layers.attn.wq_b"] == [None, "fsdp", "tensor"]  # [layer, Q, N, K]
    assert golden["fsdp_expert_tensor"]["embed"] == ["tensor", "fsdp"]  # [V, D]


def test_indivisible_mesh_axis_is_named():
    cfg = presets.tiny()  # 4 heads
    mesh = S.make_mesh(S.MeshConfig(fsdp=1, tensor=8))
    _, abstract = M.abstract_init(cfg)
    with pytest.raises(ValueError, match=r"parameter .*wkv_b dim 2 \(size 4\) is not divisible by mesh axis "
                                         r"tensor \(size 8\)"):
        M.param_shardings(abstract, mesh, S.rules_for("fsdp_tensor"))
    with pytest.raises(ValueError, match="needs 16 devices, have 8"):
        S.make_mesh(S.MeshConfig(data=2, fsdp=8))


def test_no_recompilation_across_steps(reference):
    cfg, tokens, _, _, _, graphdef, params = reference
    mcfg = MESHES["data2_fsdp2_expert2"]
    mesh, rules = S.make_mesh(mcfg), S.rules_for(mcfg.rules)
    shardings = M.param_shardings(params, mesh, rules)
    params = jax.device_put(params, shardings)
    data_sharding = S.batch_spec(mesh, rules)

    def sgd_step(params, tokens):
        with S.use_mesh(mesh, rules):
            (loss, _), grads = jax.value_and_grad(_loss, has_aux=True)(params, graphdef, tokens)
        return jax.tree.map(lambda p, g: p - 0.01 * g, params, grads), loss

    step = jax.jit(sgd_step, in_shardings=(shardings, data_sharding), out_shardings=(shardings, None),
                   donate_argnums=0)
    losses = []
    for i in range(3):
        batch = jax.device_put(jnp.roll(tokens, i, axis=1), data_sharding)
        params, loss = step(params, batch)
        losses.append(float(loss))
    assert step._cache_size() == 1
    assert losses[0] != losses[2]


@pytest.mark.parametrize("preset", sorted(S.RULE_PRESETS))
def test_no_large_parameter_left_replicated_at_v3_scale(preset):
    """Every DeepSeek-V3 parameter over 1M values is split over some mesh axis under every preset: a
    replicated one costs every chip its full size (wq_b alone is 2.2B values)."""
    _, abstract = M.abstract_init(presets.deepseek_v3())
    specs = M.spec_table(abstract, S.rules_for(preset))
    sizes = {path: math.prod(shape) for path, shape, _ in M.param_table(abstract)}
    replicated = [p for p, spec in specs.items() if sizes[p] > 1_000_000 and not any(spec)]
    assert not replicated, replicated

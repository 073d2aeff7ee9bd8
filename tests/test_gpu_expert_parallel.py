"""Expert parallelism on >= 2 real GPUs: the ragged_all_to_all dispatch (what GPUs and TPUs run; XLA:CPU lacks the
collective, so tests/test_sharding.py runs the padded all_to_all and an emulation of the ragged one) against the
dense reference MoE and against the padded all_to_all, and the tiny model sharded over every GPU against one GPU.

    JAX_PLATFORMS=cuda PYTHONPATH=. python -m pytest -q -m gpu tests/test_gpu_*.py     (skipped without 2 GPUs)

docs/LOG.md (2 x H200): ragged vs dense 5.1e-08, ragged vs padded 5.1e-08 (gradients 1.1e-07), both dropping the
same 686 assignments at capacity factor 1.0; the sharded tiny model's loss and expert loads equal one GPU's,
gradients 5.5e-07. All under full-precision matmuls.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from deepjax import model as M
from deepjax.model import presets
from deepjax.model.expert_parallel import ShardedExperts
from deepjax.model.moe import routed_experts_dense
from deepjax.parallel import sharding as S

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    jax.default_backend() != "gpu" or jax.device_count() < 2,
    reason="needs >= 2 CUDA GPUs (JAX_PLATFORMS=cuda on a device machine of several GPUs)")]


def rel(a, b) -> float:
    return float(jnp.abs(a - b).max() / (jnp.abs(b).max() + 1e-30))


@functools.cache
def _mesh():
    mcfg = S.MeshConfig(fsdp=1, expert=jax.device_count())
    return S.make_mesh(mcfg), S.rules_for(mcfg.rules)


def _experts_case():
    """256 tokens and 8 experts per GPU, 4 experts per token; two tokens in three pick experts 0-3 (skewed, so a
    capacity factor of 1 drops assignments)."""
    n = jax.device_count()
    T, D, I, E, K = 256 * n, 64, 32, 8 * n, 4
    ks = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(ks[0], (T, D))
    idx = jax.lax.top_k(jax.random.normal(ks[1], (T, E)), K)[1].astype(jnp.int32)
    idx = jnp.where(jnp.arange(T)[:, None] % 3 != 0, jnp.arange(K)[None], idx).astype(jnp.int32)
    w = jax.random.uniform(ks[2], (T, K))
    wg, wu = (jax.random.normal(k, (E, D, I)) * 0.2 for k in ks[3:5])
    wd = jax.random.normal(ks[5], (E, I, D)) * 0.2
    return x, w, idx, wg, wu, wd


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_ragged_dispatch_matches_padded_and_dense(capacity_factor):
    """Outputs and gradients (x, w_gate) of the ragged exchange equal the padded one's (1e-5); dropless, both equal
    the dense reference with nothing dropped; at capacity factor 1, both drop the same (non-zero) count."""
    mesh, rules = _mesh()
    x, w, idx, wg, wu, wd = args = _experts_case()
    out = {}
    with jax.default_matmul_precision("highest"):
        for ex in ("ragged", "padded"):
            fn = ShardedExperts(mesh, rules, capacity_factor=capacity_factor, exchange=ex)
            y, dropped = jax.jit(fn)(*args)
            g = jax.jit(jax.grad(lambda x, wg: jnp.sum(fn(x, w, idx, wg, wu, wd)[0] ** 2), argnums=(0, 1)))(x, wg)
            out[ex] = (y, int(dropped), g)
        ref = routed_experts_dense(*args)
    (y_r, drop_r, g_r), (y_p, drop_p, g_p) = out["ragged"], out["padded"]
    assert rel(y_r, y_p) < 1e-5
    assert max(rel(a, b) for a, b in zip(g_r, g_p)) < 1e-5
    if capacity_factor is None:
        assert drop_r == 0 and rel(y_r, ref) < 1e-5
    else:
        assert drop_r == drop_p > 0


def test_sharded_model_matches_one_gpu():
    """The tiny model, params sharded over `expert` = every GPU: loss (1e-5), expert loads (equal) and gradients
    (1e-4) against the same step on one GPU."""
    mesh, rules = _mesh()
    cfg = presets.tiny()
    graphdef, params = M.init(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2 * jax.device_count(), 32), 0, cfg.vocab_size)

    def loss(p, g, t, ctx=None):
        out = M.forward(g, p, t)
        return jnp.mean(out.logits ** 2) + out.balance_loss.sum(), out.expert_load

    step = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=(1, 3))
    with jax.default_matmul_precision("highest"):
        (l1, load1), g1 = step(params, graphdef, tokens, None)
        with S.use_mesh(mesh, rules):
            (l2, load2), g2 = step(jax.device_put(params, M.param_shardings(params, mesh, rules)), graphdef,
                                   jax.device_put(tokens, S.batch_spec(mesh, rules)), S.context_key())
    assert rel(l2, l1) < 1e-5
    assert bool(jnp.all(load1 == load2))
    assert max(rel(a, b) for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(g1))) < 1e-4

"""MLA attention: query-blocked attention equals one block, through the whole model and its gradient."""

import jax
import jax.numpy as jnp
import numpy as np

from deepjax.model import ops

from deepjax.model import presets
from deepjax import model as M


def test_query_blocks_equal_single_block(monkeypatch):
    cfg = presets.tiny()
    graphdef, params = M.init(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
    segments = jnp.array([[1] * 10 + [2] * 6, [1] * 16])  # a document boundary inside a block

    def loss(p):
        out = M.forward(graphdef, p, tokens, None, segments)
        return (out.logits**2).mean(), out.logits

    (l1, logits1), g1 = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    monkeypatch.setattr(ops, "Q_BLOCK", 4)
    (l2, logits2), g2 = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    np.testing.assert_allclose(np.asarray(logits2), np.asarray(logits1), rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-7)

"""The language-model loss and a pure, micro-batched training step.

    loss = CE(next token) + lambda/D sum_k CE_k(MTP depth k) + alpha sum_layers L_bal   (V3 eq. 17-25)

Shape key: B batch, T length, V vocab, M micro-batches.

The step is a pure function (params, opt_state, batch) -> (params, opt_state, metrics): the router
correction biases ride along in `params` but are not differentiated and not touched by the optimizer (the
aux-loss-free update is applied separately after the step, with global loads).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from deepjax import model as M
from deepjax.config import ModelConfig
from deepjax.nn import RouterBias


class Batch(NamedTuple):
    tokens: jax.Array  # [B, T] int32
    segment_ids: jax.Array  # [B, T] int32, 0 = padding
    positions: jax.Array  # [B, T] int32
    loss_mask: Optional[jax.Array] = None  # [B, T] 1 where the *next* token is a training target


def masked_ce(logits_BTV, targets_BT, mask_BT):
    ce_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32), targets_BT)
    m = mask_BT.astype(jnp.float32)
    return (ce_BT * m).sum() / jnp.maximum(m.sum(), 1.0)


def lm_loss(trainable, frozen, graphdef, batch: Batch, cfg: ModelConfig, mtp_lambda: float,
            balance_alpha: float, experts_fn=None):
    """(total loss, (metrics, expert_load)). trainable: nnx.Param state; frozen: RouterBias state."""
    out = M.forward(graphdef, nnx.merge_state(trainable, frozen), batch.tokens, batch.positions,
                    batch.segment_ids, experts_fn)
    extra = 1 if batch.loss_mask is None else batch.loss_mask
    targets, mask = M.mtp_targets(batch.tokens, batch.segment_ids, 0)
    ce = masked_ce(out.logits, targets, mask * extra)
    mtp = jnp.zeros((), jnp.float32)
    if out.mtp_logits is not None:
        for k in range(out.mtp_logits.shape[0]):
            t_k, m_k = M.mtp_targets(batch.tokens, batch.segment_ids, k + 1)
            mtp = mtp + masked_ce(out.mtp_logits[k], t_k, m_k * extra)
        mtp = mtp * mtp_lambda / out.mtp_logits.shape[0]
    bal = balance_alpha * out.balance_loss.sum()
    total = ce + mtp + bal
    metrics = {"loss": ce, "mtp_loss": mtp, "balance_loss": bal, "dropped_tokens": out.dropped_tokens}
    return total, (metrics, out.expert_load)


def split_params(params):
    """(trainable nnx.Param state, RouterBias state)."""
    return params.split(nnx.Param, RouterBias)


def decay_mask(trainable):
    """Weight decay on matrices only (not norms, not the router bias): by rank of each parameter's slot."""
    from deepjax.model import logical_axes

    axes = logical_axes(trainable)
    return jax.tree.map(lambda a: len([x for x in a if x != "layers"]) >= 2, axes,
                        is_leaf=lambda x: isinstance(x, tuple))


def adamw(lr, trainable, b1=0.9, b2=0.95, weight_decay=0.1, clip=1.0) -> optax.GradientTransformation:
    """DeepSeek-V3's optimizer (section 4.2): AdamW(0.9, 0.95, wd 0.1 on matrices), global-norm clip 1.0."""
    return optax.chain(optax.clip_by_global_norm(clip),
                       optax.adamw(lr, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask(trainable)))


def make_train_step(graphdef, cfg: ModelConfig, optimizer: optax.GradientTransformation, *,
                    micro_batches: int = 1, mtp_lambda: float = 0.3, balance_alpha: float = 1e-4,
                    experts_fn=None) -> Callable:
    """step(trainable, frozen, opt_state, batch) -> (trainable, opt_state, metrics, expert_load).
    With micro_batches M, the batch's leading dim is split M ways and gradients are averaged (lax.scan)."""
    grad_fn = jax.value_and_grad(lm_loss, has_aux=True)

    def step(trainable, frozen, opt_state, batch: Batch):
        def one(b):
            (_, (metrics, load)), grads = grad_fn(trainable, frozen, graphdef, b, cfg, mtp_lambda,
                                                  balance_alpha, experts_fn)
            return grads, metrics, load

        if micro_batches == 1:
            grads, metrics, load = one(batch)
        else:
            split = jax.tree.map(lambda x: x.reshape(micro_batches, x.shape[0] // micro_batches, *x.shape[1:]),
                                 batch)

            def body(acc, b):
                g, m, l = one(b)
                return jax.tree.map(jnp.add, acc, (g, m, l)), None

            zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(one, jax.tree.map(lambda x: x[0], split)))
            (grads, metrics, load), _ = jax.lax.scan(body, zeros, split)
            grads, metrics = jax.tree.map(lambda g: g / micro_batches, (grads, metrics))
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics["grad_norm"] = optax.global_norm(grads)
        return trainable, opt_state, metrics, load

    return step

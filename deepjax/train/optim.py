"""The optimizer: optax AdamW with DeepSeek-V3's settings, and the learning-rate schedules.

    AdamW(beta1 0.9, beta2 0.95, weight decay 0.1 on matrices only), global-norm clipping 1.0  (V3 section 4.2)

Schedules (`optim.schedule`), as functions of the optimizer step (0-based):

    constant       linear warmup 0 -> lr over warmup_steps, then lr
    warmup_cosine  linear warmup, then cosine from lr to lr*final_ratio at train.steps
    deepseek_v3    V3's shape: warmup -> lr held until constant_steps -> cosine to lr*final_ratio over
                   decay_steps -> lr*final_ratio -> lr*tail_ratio for the last tail_steps of train.steps
                   (V3: 2K warmup steps to 2.2e-4, cosine to 2.2e-5, then 2.2e-5 and finally 7.3e-6)

Gradient accumulation is the train step's `optim.micro_batches` (deepjax/train/step.py), not an optax
wrapper: the micro-batches of one optimizer step are summed inside one jitted step.
"""

from __future__ import annotations

import jax
import optax

from deepjax.model import logical_axes
from deepjax.train.config import OptimConfig


def schedule(o: OptimConfig, total_steps: int) -> optax.Schedule:
    warm = max(o.warmup_steps, 0)
    warmup = optax.linear_schedule(0.0, o.lr, max(warm, 1))
    if o.schedule == "constant":
        return optax.join_schedules([warmup, optax.constant_schedule(o.lr)], [warm])
    if o.schedule == "warmup_cosine":
        decay = max(total_steps - warm, 1)
        cosine = optax.cosine_decay_schedule(o.lr, decay, alpha=o.final_ratio)
        return optax.join_schedules([warmup, cosine], [warm])
    if o.schedule == "deepseek_v3":
        b1 = warm + o.constant_steps
        b2 = b1 + o.decay_steps
        b3 = max(total_steps - o.tail_steps, b2)
        return optax.join_schedules(
            [warmup, optax.constant_schedule(o.lr),
             optax.cosine_decay_schedule(o.lr, max(o.decay_steps, 1), alpha=o.final_ratio),
             optax.constant_schedule(o.lr * o.final_ratio), optax.constant_schedule(o.lr * o.tail_ratio)],
            [warm, b1, b2, b3])
    raise ValueError(f"optim.schedule={o.schedule!r}: unknown")


def decay_mask(trainable):
    """Weight decay on matrices only (not norms, not biases): by the rank of each parameter's logical axes,
    not counting the stacked `layers` axis."""
    axes = logical_axes(trainable)
    return jax.tree.map(lambda a: len([x for x in a if x != "layers"]) >= 2, axes,
                        is_leaf=lambda x: isinstance(x, tuple))


def adamw(lr, trainable, b1=0.9, b2=0.95, weight_decay=0.1, clip=1.0, eps=1e-8) -> optax.GradientTransformation:
    """DeepSeek-V3's optimizer: clip_by_global_norm(clip) then AdamW; `lr` is a float or a schedule."""
    return optax.chain(optax.clip_by_global_norm(clip),
                       optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                                   mask=decay_mask(trainable)))


def make_optimizer(o: OptimConfig, trainable, total_steps: int) -> tuple[optax.GradientTransformation,
                                                                         optax.Schedule]:
    sched = schedule(o, total_steps)
    return adamw(sched, trainable, o.b1, o.b2, o.weight_decay, o.clip_norm, o.eps), sched

"""The language-model loss and the pure training step: (state, batch) -> (state, metrics).

    loss = CE(next token) + lambda/D sum_k CE_k(MTP depth k) + alpha sum_layers L_bal      (V3 eq. 17-25)

After the gradient update, the aux-loss-free rule moves each MoE layer's routing bias (V3 section 2.1.2):

    b_i += gamma * sign(mean_j load_j - load_i)        loads counted over the whole global batch

The biases live in `TrainState.router_bias`, outside the optimizer: no gradient, no weight decay, no Adam
moments ever touch them. A step whose loss or gradient is not finite is not applied (params, optimizer
state and biases keep their old values); `nonfinite_streak` / `nonfinite_total` count such steps, and the
loop stops after `train.max_nonfinite` in a row.

Shape key: B batch, T length, V vocab, L MoE layers, E routed experts, M micro-batches.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from deepjax import model as M
from deepjax.model.config import ModelConfig
from deepjax.model.layers import RouterBias, dtype_of
from deepjax.parallel import sharding as S
from deepjax.train.checkpoint import all_finite
from deepjax.train.optim import adamw, decay_mask  # noqa: F401  (re-exported: the optimizer used by the step)


class Batch(NamedTuple):
    tokens: jax.Array  # [B, T] int32
    segment_ids: jax.Array  # [B, T] int32: 1, 2, ... per packed document, 0 = padding
    positions: jax.Array  # [B, T] int32, 0-based within each document
    target_mask: Optional[jax.Array] = None  # [B, T] 1 where this token is a training target (SFT: completion)


class TrainState(NamedTuple):
    step: jax.Array  # int32 []: optimizer steps attempted (applied + skipped as non-finite)
    params: Any  # nnx.State of nnx.Param: what the optimizer trains
    router_bias: Any  # nnx.State of RouterBias: the aux-loss-free correction biases
    opt_state: Any  # optax state of `params`
    rng: jax.Array  # uint32 [2]: raw key data (split every step; kept so a resumed run continues the stream)
    nonfinite_streak: jax.Array  # int32 []: non-finite steps in a row
    nonfinite_total: jax.Array  # int32 []: non-finite steps in all


def split_params(params):
    """(trainable nnx.Param state, RouterBias state)."""
    return nnx.split_state(params, nnx.Param, RouterBias)


def init_state(params, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    trainable, bias = split_params(params)
    z = lambda: jnp.zeros((), jnp.int32)  # noqa: E731  (distinct buffers: the state is donated)
    return TrainState(z(), trainable, bias, optimizer.init(trainable),
                      jax.random.key_data(jax.random.key(seed)), z(), z())


def target_counts(batch: Batch, depths: int) -> jax.Array:
    """[1 + depths] float32: how many targets the main head and each MTP depth have in `batch`."""
    return jnp.stack([depth_targets(batch, k)[1].sum() for k in range(depths + 1)]).astype(jnp.float32)


def depth_targets(batch: Batch, k: int):
    """Targets t_{i+k+1} for depth k (0 = main head) and where they count: same document, and the target
    token is a training target."""
    targets, valid = M.mtp_targets(batch.tokens, batch.segment_ids, k)
    if batch.target_mask is not None:
        s = k + 1
        valid = valid & (jnp.pad(batch.target_mask[:, s:], ((0, 0), (0, s))) > 0)
    return targets, valid


def lm_loss(trainable, bias, graphdef, batch: Batch, cfg: ModelConfig, mtp_lambda: float,
            balance_alpha: float, experts_fn=None, denoms=None, share: float = 1.0):
    """(total loss, (metrics, loads)). loads: (expert_load [L, E], mtp_expert_load [D, E] or None).

    For one micro-batch of several: `denoms` are the whole batch's `target_counts` and `share` the micro-batch's
    fraction of the rows, so that the micro-batch losses (and gradients) sum to the whole batch's exactly."""
    D = cfg.num_nextn_predict_layers
    pairs = []
    for k in range(1 + D):  # the mean over a depth's targets (or the whole batch's, `denoms`) as weights
        t_k, v_k = depth_targets(batch, k)
        m_k = v_k.astype(jnp.float32)
        pairs.append((t_k, m_k / jnp.maximum(m_k.sum() if denoms is None else denoms[k], 1.0)))
    out = M.forward(graphdef, nnx.merge_state(trainable, bias), batch.tokens, batch.positions,
                    batch.segment_ids, experts_fn, targets=tuple(pairs))
    ce = out.ce[0]
    valid = pairs[0][1] > 0
    mtp = out.ce[1:].sum() * mtp_lambda / D if D else jnp.zeros((), jnp.float32)
    bal = out.balance_loss.sum()  # each layer's loss is a mean over rows: a micro-batch contributes its share
    if out.mtp_balance_loss is not None:
        bal = bal + out.mtp_balance_loss.sum()
    bal = balance_alpha * bal * share
    metrics = {"loss": ce, "mtp_loss": mtp, "balance_loss": bal, "dropped_tokens": out.dropped_tokens,
               "target_tokens": valid.sum().astype(jnp.float32)}
    return ce + mtp + bal, (metrics, (out.expert_load, out.mtp_expert_load))


def max_violation(load_LE):
    """MaxVio per layer (V3 section 4.5.2): max_i load_i / mean load - 1; 0 is perfectly balanced."""
    load = load_LE.astype(jnp.float32)
    return load.max(-1) / jnp.maximum(load.mean(-1), 1e-9) - 1.0


def update_router_bias(bias, loads, gamma: float):
    """b_i += gamma * sign(mean load - load_i), per MoE layer, for the main stack and each MTP module."""
    load_LE, mtp_load_DE = loads

    def step(b, load):
        load = load.astype(jnp.float32)
        return b + gamma * jnp.sign(load.mean(-1, keepdims=True) - load)

    def one(path, v):
        keys = [getattr(p, "key", getattr(p, "idx", None)) for p in path]
        if keys[0] == "moe_layers":
            return step(v, load_LE)
        if keys[0] == "mtp":
            return step(v, mtp_load_DE[keys[1]])
        raise ValueError(f"router bias at {jax.tree_util.keystr(path)}: no load to update it with")

    return jax.tree_util.tree_map_with_path(one, bias)


_global_norm = optax.tree.norm if hasattr(optax, "tree") and hasattr(optax.tree, "norm") else optax.global_norm


def guarded_update(state: TrainState, grads, loss, optimizer: optax.GradientTransformation, router_bias):
    """(new state, grad_norm, finite): the optimizer update of `state.params` by `grads` and the new `router_bias`,
    applied only when `loss` and the gradient norm are finite (otherwise params, optimizer state and biases keep
    their old values and the non-finite counters move). `step` and `rng` advance either way."""
    grad_norm = _global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0])
    new = TrainState(
        step=state.step + 1, params=keep(params, state.params), router_bias=keep(router_bias, state.router_bias),
        opt_state=keep(opt_state, state.opt_state), rng=rng,
        nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
        nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32))
    return new, grad_norm, finite


def make_train_step(graphdef, cfg: ModelConfig, optimizer: optax.GradientTransformation,
                    lr_schedule: Optional[optax.Schedule] = None, *, micro_batches: int = 1,
                    mtp_lambda: float = 0.3, balance_alpha: float = 1e-4, bias_update_speed: float = 1e-3,
                    experts_fn=None) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """step(state, batch) -> (state, metrics), pure; jit it with the state donated.

    With micro_batches M the batch's leading dim is split M ways and gradients, metrics and expert loads are
    summed in a `lax.scan` (gradient accumulation, exact: equal to the whole batch's up to float rounding). Metrics: loss, mtp_loss, balance_loss, grad_norm,
    lr, applied (1/0), maxvio [L] (per MoE layer, this batch), maxvio_mtp [D], dropped_tokens, target_tokens.
    """
    grad_fn = jax.value_and_grad(lm_loss, has_aux=True)

    def grads_of(params, bias, b, denoms=None):
        (_, (metrics, loads)), grads = grad_fn(params, bias, graphdef, b, cfg, mtp_lambda, balance_alpha,
                                               experts_fn, denoms, 1.0 / micro_batches)
        return grads, metrics, loads

    def step(state: TrainState, batch: Batch):
        if micro_batches == 1:
            grads, metrics, loads = grads_of(state.params, state.router_bias, batch)
        else:
            # Exact accumulation: each micro-batch's CE is divided by the whole batch's target count, so the
            # summed gradients equal the whole batch's (not a mean of per-micro-batch means).
            denoms = target_counts(batch, cfg.num_nextn_predict_layers)
            split = jax.tree.map(lambda x: x.reshape(micro_batches, x.shape[0] // micro_batches, *x.shape[1:]),
                                 batch)
            # the routed expert stacks cast to the compute dtype once for all micro-batches, their gradients summed
            # into float32 (`model.precast_experts`: the same gradients; as GRPO's update)
            params = M.precast_experts(state.params, dtype_of(cfg.dtype))

            def body(acc, b):
                return jax.tree.map(lambda a, g: a + g.astype(a.dtype), acc,
                                    grads_of(params, state.router_bias, b, denoms)), None

            _, m_shape, l_shape = jax.eval_shape(grads_of, params, state.router_bias,
                                                 jax.tree.map(lambda x: x[0], split), denoms)
            zeros = jax.tree.map(jnp.zeros_like, (state.params, m_shape, l_shape))
            (grads, metrics, loads), _ = jax.lax.scan(body, zeros, split)
        total = metrics["loss"] + metrics["mtp_loss"] + metrics["balance_loss"]
        bias = update_router_bias(state.router_bias, loads, bias_update_speed) if bias_update_speed else \
            state.router_bias
        applied = state.step - state.nonfinite_total  # optimizer updates applied before this step
        new, grad_norm, finite = guarded_update(state, grads, total, optimizer, bias)
        metrics = dict(metrics, grad_norm=grad_norm, applied=finite.astype(jnp.int32),
                       maxvio=max_violation(loads[0]))
        if loads[1] is not None:
            metrics["maxvio_mtp"] = max_violation(loads[1])
        if lr_schedule is not None:
            metrics["lr"] = jnp.asarray(lr_schedule(applied), jnp.float32)
        return new, metrics

    return step


def state_shardings(state: TrainState, mesh, rules: dict) -> TrainState:
    """Shardings for a TrainState: params and router biases by their logical axes, optimizer moments like their
    parameters, counters and the RNG replicated."""
    rep = NamedSharding(mesh, P())
    params = M.param_shardings(state.params, mesh, rules)
    return state._replace(
        step=rep, params=params, router_bias=M.param_shardings(state.router_bias, mesh, rules),
        opt_state=S.shardings_like_params(state.opt_state, state.params, params, mesh), rng=rep,
        nonfinite_streak=rep, nonfinite_total=rep)


def state_is_finite(state: TrainState) -> bool:
    """True when params, biases and optimizer state hold only finite values: the check `Checkpointer.save` makes
    before every save (one jitted reduction, deepjax/train/checkpoint.py)."""
    return all_finite((state.params, state.router_bias, state.opt_state))


def matmul_flops_per_token(cfg: ModelConfig, seq_len: int, active_params: int) -> float:
    """Training FLOPs per token, PaLM convention (as bench/anchors/hf_deepseek_v3.py): 6 x matmul-active parameters
    (active minus the embedding lookup) + 6 x layers x heads x T x (qk_nope + qk_rope + v), non-causal."""
    matmul = active_params - cfg.vocab_size * cfg.hidden_size
    attn = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * seq_len * (
        cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)
    return 6.0 * matmul + attn

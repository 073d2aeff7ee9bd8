"""The GRPO policy update: rollouts as training arrays, the policy's token log-probs, and the jitted step.

    batch = rollouts_from_samples(prompts_BP, prompt_lengths_B, out.tokens, out.logprobs, out.lengths, adv_B, T)
    batch = batch._replace(ref_logp=jit_token_logprobs(graphdef, ref_params, batch, temperature))  # when beta > 0
    step = jax.jit(make_grpo_step(graphdef, cfg, optimizer, GRPOConfig(...), temperature), donate_argnums=0)
    for _ in range(grpo_cfg.mu):                       # mu updates on the same rollouts; old_logp stays fixed
        state, metrics = step(state, batch)

Shape key: B rows (outputs; the G outputs of a prompt on consecutive rows), T padded length (prompt +
completion), P padded prompt length, N max new tokens, V vocab.

Which distribution. The sampler (`deepjax/infer/sampling.py`) reports log softmax(logits / temperature) of each sampled
token, taken before top-k / top-p truncation, and under temperature 1 when greedy (temperature 0). `token_logprobs`
computes the same quantity from the training forward: the log-prob of token t under the logits at position t-1
divided by the temperature. So pi_theta_old (the sampler's `old_logp`) and pi_theta (this module's log-probs) are
the same distribution at the first of the mu updates, where their gap (`sampler_trainer_logp_gap`) is only the
numerical difference between the cached decode and the full forward (~1e-6 in float32). The entropy reported is
that of the same tempered, untruncated distribution at each completion token's position.

The step (`make_grpo_step`): the loss is `loss.grpo_loss`(pi_theta log-probs, old_logp, ref_logp, advantages,
completion_mask); the gradient is taken w.r.t. the trainable params only (router biases enter the forward but are
not differentiated); the optimizer update, the non-finite guard and its counters are the train step's
(`step.guarded_update`): a step whose loss or gradient is not finite is not applied and is counted.
With bias_update_speed > 0 the aux-loss-free router-bias rule runs on the policy forward's expert loads (prompt and
completion tokens, padding excluded). The sequence-wise balance loss and the MTP heads are not part of the GRPO
loss (the MTP modules still run in the forward, so their routers' loads exist; they receive no gradient).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from deepjax.held_jit import held_jit
from deepjax.rl import loss as G
from deepjax import model as M
from deepjax.train import step as TS
from deepjax.model.config import ModelConfig
from deepjax.model.layers import dtype_of


class Rollouts(NamedTuple):
    tokens: jax.Array  # [B, T] int32: prompt then completion, right-padded with pad_id
    positions: jax.Array  # [B, T] int32: 0.. on real tokens, 0 on padding
    segment_ids: jax.Array  # [B, T] int32: 1 on real tokens (prompt and completion), 0 on padding
    completion_mask: jax.Array  # [B, T] int32: 1 on completion (sampled) tokens
    old_logp: jax.Array  # [B, T] float32: the sampler's log-prob of each completion token, 0 elsewhere
    ref_logp: Optional[jax.Array]  # [B, T] float32 or None: the reference policy's log-probs (for beta > 0)
    advantages: jax.Array  # [B] float32: A_i, one per row
    # [B, T] float32 or None: the sampler's log-probs when old_logp was recomputed by the trainer (a TIS / MIS
    # correction is on, GRPOConfig.uses_sampler: the loop's `batch`); None when old_logp is the sampler's own
    sampler_logp: Optional[jax.Array] = None
    # [B, T, L_moe, K] int32 or None: the experts the sampler used for each token in each MoE layer (-1: none
    # recorded), for routing replay and the share of routes that differ (`grpo_objective`)
    routes: Optional[jax.Array] = None
    # [B, T, k] int32 or None: at each completion token, the ids of the truncated set the sampler drew it from (-1
    # past its top-p cut and elsewhere): sampling-mask replay, the policy's log-probs over that set
    support: Optional[jax.Array] = None


def _is_traced(*xs) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in xs)


LENGTH_BUCKET = 32  # rollouts' padded completion width: the longest completion rounded up to this (few compiles)


def padded_length(prompt_width: int, sample_lengths_B, max_new_tokens: int, bucket: int = LENGTH_BUCKET) -> int:
    """T for `rollouts_from_samples`: the prompt width plus the longest completion of the batch rounded up to a
    multiple of `bucket` (at most max_new_tokens), rather than plus max_new_tokens. Padding never changes the loss or
    its gradient (tests/test_rl_update.py), so the update, the reference's and the old policy's log-probs only pay
    for the rows' real width: a GRPO step whose completions stop at half the budget updates on about half the
    tokens. Every process holds the whole batch's lengths, so every process gets the same T."""
    longest = int(np.max(np.asarray(sample_lengths_B), initial=0))
    return int(prompt_width) + min(int(max_new_tokens), max(bucket, -(-longest // bucket) * bucket))


def rollouts_from_samples(prompts_BP, prompt_lengths_B, sample_tokens_BN, sample_logprobs_BN, sample_lengths_B,
                          advantages_B, T: int, *, pad_id: int = 0, ref_logp=None, routes=None,
                          support=None) -> Rollouts:
    """Rollouts with each row's completion right after its prompt: row b holds prompts[b, :prompt_lengths[b]] then
    sample_tokens[b, :sample_lengths[b]] (whose log-probs go to old_logp at the same positions), then pad_id.
    Numpy in, numpy out (the host-side path after scoring); jax arrays in, jax arrays out (jittable, T static).
    `sampling.generate`'s Output gives sample_tokens / sample_logprobs / sample_lengths directly, and with
    record_routes the `routes` [B, S, L_moe, K] (indexed by position as the rows here are: cut or padded with -1
    to T; int16 kept, any other dtype as int32), and with record_support the `support` [B, N, k] (placed with the
    completion tokens)."""
    arrays = (prompts_BP, prompt_lengths_B, sample_tokens_BN, sample_logprobs_BN, sample_lengths_B, advantages_B)
    xp = jnp if any(isinstance(x, jax.Array) for x in arrays) else np
    prompts = xp.asarray(prompts_BP).astype(xp.int32)
    plen = xp.asarray(prompt_lengths_B).astype(xp.int32)
    toks = xp.asarray(sample_tokens_BN).astype(xp.int32)
    lps = xp.asarray(sample_logprobs_BN).astype(xp.float32)
    slen = xp.asarray(sample_lengths_B).astype(xp.int32)
    adv = xp.asarray(advantages_B).astype(xp.float32)
    B, P = prompts.shape
    N = toks.shape[1]
    if toks.shape != (B, N) or lps.shape != (B, N) or plen.shape != (B,) or slen.shape != (B,) or adv.shape != (B,):
        raise ValueError(f"rollouts_from_samples: shapes prompts {prompts.shape}, prompt_lengths {plen.shape}, "
                         f"sample_tokens {toks.shape}, sample_logprobs {lps.shape}, sample_lengths {slen.shape}, "
                         f"advantages {adv.shape} do not agree on B = {B}")
    if not _is_traced(plen, slen):
        p, n = np.asarray(plen), np.asarray(slen)
        if (p < 1).any() or (p > P).any():
            raise ValueError(f"prompt_lengths must be in [1, {P}], got {p.tolist()}")
        if (n < 0).any() or (n > N).any():
            raise ValueError(f"sample_lengths must be in [0, {N}], got {n.tolist()}")
        if int((p + n).max()) > T:
            raise ValueError(f"T = {T} is shorter than the longest prompt + completion ({int((p + n).max())})")
    t = xp.arange(T, dtype=xp.int32)[None]  # [1, T]
    in_prompt = t < plen[:, None]
    in_completion = (t >= plen[:, None]) & (t < (plen + slen)[:, None])
    real = in_prompt | in_completion
    take = lambda a, i: xp.take_along_axis(a, xp.clip(i, 0, a.shape[1] - 1), axis=1)  # noqa: E731
    j = t - plen[:, None]  # index into the completion
    tokens = xp.where(in_prompt, take(prompts, xp.broadcast_to(t, (B, T))), xp.where(in_completion, take(toks, j),
                                                                                        pad_id)).astype(xp.int32)
    old_logp = xp.where(in_completion, take(lps, j), 0.0).astype(xp.float32)
    if routes is not None:
        routes = _place_routes(xp, xp.asarray(routes), real)
    if support is not None:
        support = xp.asarray(support).astype(xp.int32)
        at = xp.broadcast_to(xp.clip(j, 0, N - 1)[:, :, None], (B, T, support.shape[-1]))
        support = xp.where(in_completion[:, :, None], xp.take_along_axis(support, at, axis=1), -1)
    return Rollouts(tokens=tokens, positions=xp.where(real, t, 0).astype(xp.int32),
                    segment_ids=real.astype(xp.int32), completion_mask=in_completion.astype(xp.int32),
                    old_logp=old_logp, ref_logp=ref_logp, advantages=adv, routes=routes, support=support)


def _place_routes(xp, routes_BSLK, real_BT):
    """The sampler's routes cut or padded with -1 to the rows' width T, -1 outside the real tokens. int16 stays
    int16 (the sampler's, `sampling.routes_out`: half the bytes to copy and move; the forward casts them), any other
    dtype becomes int32."""
    T = real_BT.shape[1]
    routes = routes_BSLK if routes_BSLK.dtype in (xp.int16, xp.int32) else routes_BSLK.astype(xp.int32)
    routes = routes[:, :T]
    if routes.shape[1] < T:
        routes = xp.pad(routes, ((0, 0), (0, T - routes.shape[1]), (0, 0), (0, 0)), constant_values=-1)
    return xp.where(real_BT[:, :, None, None], routes, xp.asarray(-1, routes.dtype))


@held_jit()
def routes_on_device(routes_BSLK, segment_ids_BT):
    """`rollouts_from_samples`' routes from the sampler's device array and the rollouts' segment ids [B, T] (real
    tokens: > 0), in one jitted program: GRPO's rollout leaves the routes on the device ([B, S, L_moe, K], 38 MB at
    the bench's 512 rows) instead of copying them to the host and back."""
    return _place_routes(jnp, routes_BSLK, segment_ids_BT > 0)


# --------------------------------------------------------------------------------------------------- log-probs


def _scale(temperature: float) -> float:
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy, whose log-probs are at temperature 1), "
                         f"got {temperature!r}")
    return float(temperature) or 1.0


def logprobs_from_logits(logits_BTV, tokens_BT, segment_ids_BT, temperature: float, support_BTk=None):
    """(logp [B, T], entropy [B, T]): log softmax(logits[t-1] / temperature)[token t] and the entropy of that
    distribution, at every t whose previous token is in the same (non-padding) document; 0 elsewhere (t = 0,
    padding, a document's first token). The entropy carries no gradient. support_BTk (sampling-mask replay): where
    it holds ids (>= 0) at t, token t's log-prob is over those ids only (the sampler's truncated set)."""
    tau = _scale(temperature)
    scaled = logits_BTV[:, :-1].astype(jnp.float32) / tau  # position t-1 predicts token t
    logp_BTV = jax.nn.log_softmax(scaled, axis=-1)
    lp = jnp.take_along_axis(logp_BTV, tokens_BT[:, 1:, None].astype(jnp.int32), axis=-1)[..., 0]
    if support_BTk is not None:
        ids = support_BTk[:, 1:]
        kept = jnp.where(ids >= 0, jnp.take_along_axis(logp_BTV, jnp.maximum(ids, 0), axis=-1), -jnp.inf)
        has = ids[..., 0] >= 0
        lp = jnp.where(has, lp - jax.nn.logsumexp(jnp.where(has[..., None], kept, 0.0), axis=-1), lp)
    lpv = jax.lax.stop_gradient(logp_BTV)
    ent = -jnp.sum(jnp.exp(lpv) * lpv, axis=-1)
    pad = lambda x: jnp.pad(x, ((0, 0), (1, 0)))  # noqa: E731
    return _in_documents(pad(lp), pad(ent), segment_ids_BT)


def _in_documents(lp_BT, ent_BT, segment_ids_BT):
    """lp and ent zeroed at t = 0, on padding and at a document's first token."""
    seg = segment_ids_BT
    valid = jnp.pad((seg[:, 1:] > 0) & (seg[:, 1:] == seg[:, :-1]), ((0, 0), (1, 0)))
    return jnp.where(valid, lp_BT, 0.0), jnp.where(valid, ent_BT, 0.0)


def policy_logprobs(graphdef, params, out, tokens_BT, segment_ids_BT, temperature: float, support_BTk=None):
    """`logprobs_from_logits` of a forward's output `out` (of the model `params`): from its logits with a support,
    else by chunks from its hidden state (`Transformer.token_logprobs`), never holding [B, T, V] float32 logits
    (under jit the forward's unused logits are not computed). The same numbers up to float rounding
    (tests/test_rl_update.py)."""
    if support_BTk is not None:
        return logprobs_from_logits(out.logits, tokens_BT, segment_ids_BT, temperature, support_BTk)
    lp, ent = nnx.merge(graphdef, params).token_logprobs(out.hidden, tokens_BT, _scale(temperature))
    return _in_documents(lp, ent, segment_ids_BT)


def _forward(graphdef, params, tokens, positions, segment_ids, experts_fn, routes=None, replay: bool = True):
    """The model's forward; routes [B, T, L_moe, K] (the sampler's, -1 where none): replayed, or with replay=False
    only compared with the trainer's own (Output.route_diff)."""
    if routes is not None:
        routes = jnp.moveaxis(routes, 2, 0).astype(jnp.int32)
    return M.forward(graphdef, params, tokens, positions, segment_ids, experts_fn, routes=routes,
                     replay_routes=replay)


def token_logprobs_and_entropy(graphdef, params, tokens, positions, segment_ids, temperature: float,
                               experts_fn=None, routes=None, support=None):
    """(logp [B, T], entropy [B, T]) of the model `params` (Param and RouterBias state) on `tokens`: see
    `logprobs_from_logits`. Pure; the same quantity the sampler reports for the tokens it drew. routes: the
    sampler's expert choices to replay (`Rollouts.routes`), or None; support: the sampler's kept sets
    (`Rollouts.support`), or None."""
    out = _forward(graphdef, params, tokens, positions, segment_ids, experts_fn, routes)
    return policy_logprobs(graphdef, params, out, tokens, segment_ids, temperature, support)


def token_logprobs(graphdef, params, tokens, positions, segment_ids, temperature: float, experts_fn=None,
                   routes=None, support=None):
    """logp [B, T]: log-prob of token t under softmax(logits at t-1 / temperature), 0 at t = 0 and on padding."""
    return token_logprobs_and_entropy(graphdef, params, tokens, positions, segment_ids, temperature, experts_fn,
                                      routes, support)[0]


def _jit_logp(graphdef, params, tokens, positions, segment_ids, mask, temperature, experts_fn, routes,
              micro_batches, support):
    def logp(rows):
        t, p, s, m, r, k = rows
        return jnp.where(m > 0, token_logprobs(graphdef, params, t, p, s, temperature, experts_fn, r, k), 0.0)

    rows = (tokens, positions, segment_ids, mask, routes, support)
    if micro_batches == 1:
        return logp(rows)
    split = jax.tree.map(lambda x: x.reshape(micro_batches, x.shape[0] // micro_batches, *x.shape[1:]), rows)
    return jax.lax.map(logp, split).reshape(tokens.shape)


_jit_logp_fn = held_jit(_jit_logp, static_argnums=(0, 6, 7, 9))


def jit_token_logprobs(graphdef, params, batch: Rollouts, temperature: float, experts_fn=None,
                       replay_routes: bool = False, replay_support: bool = False, micro_batches: int = 1) -> jax.Array:
    """Jitted `token_logprobs` of `params` on a Rollouts batch, zeroed outside the completion: e.g. the reference
    policy's `ref_logp` (batch._replace(ref_logp=...)) or a recomputed `old_logp` (replay_routes / replay_support:
    with the batch's routes / over its kept sets, as the policy's own log-probs are under routing / sampling-mask
    replay).
    micro_batches: the rows in that many sequential parts (one part's [rows, T, V] logits at a time)."""
    return _jit_logp_fn(graphdef, params, batch.tokens, batch.positions, batch.segment_ids, batch.completion_mask,
                        _scale(temperature), experts_fn, batch.routes if replay_routes else None, micro_batches,
                        batch.support if replay_support else None)


# --------------------------------------------------------------------------------------------------------- step


def grpo_objective(trainable, bias, graphdef, batch: Rollouts, grpo_cfg: G.GRPOConfig, temperature: float,
                   experts_fn=None, routing_replay: bool = True, denominator=None):
    """(loss, (metrics, loads, logp)) of the policy `trainable` + `bias` on `batch`; differentiate w.r.t. trainable.
    With batch.routes the forward replays them (routing_replay) or only compares its own routes with them; either
    way `routing_mismatch` is the share of (token, layer) pairs, over tokens with a recorded route, whose expert set
    differs between the sampler and the trainer's own router. denominator: the whole batch's aggregation denominator
    when `batch` is a micro-batch of it (`grpo_loss`)."""
    params = nnx.merge_state(trainable, bias)
    out = _forward(graphdef, params, batch.tokens, batch.positions, batch.segment_ids, experts_fn, batch.routes,
                   routing_replay)
    logp, ent = policy_logprobs(graphdef, params, out, batch.tokens, batch.segment_ids, temperature, batch.support)
    mask = batch.completion_mask
    loss, metrics = G.grpo_loss(logp, batch.old_logp, batch.ref_logp, batch.advantages, mask, grpo_cfg,
                                sampler_logp=batch.sampler_logp, denominator=denominator)
    m = mask > 0
    n = jnp.maximum(jnp.sum(m.astype(jnp.float32)), 1.0)
    # Masked tokens become zeros before the arithmetic (a padded old_logp may hold anything).
    gap = jnp.where(m, jnp.abs(jnp.where(m, batch.old_logp, 0.0) - jax.lax.stop_gradient(logp)), 0.0)
    metrics = dict(metrics, loss=loss, entropy=jnp.sum(jnp.where(m, ent, 0.0)) / n,
                   sampler_trainer_logp_gap=jnp.sum(gap) / n, sampler_trainer_logp_gap_max=jnp.max(gap))
    if batch.routes is not None and out.route_diff is not None:
        given = jnp.sum(((batch.routes[..., 0, 0] >= 0) & (batch.segment_ids > 0)).astype(jnp.float32))
        metrics["routing_mismatch"] = jnp.sum(out.route_diff) / jnp.maximum(given * out.route_diff.shape[0], 1.0)
    return loss, (metrics, (out.expert_load, out.mtp_expert_load))


def combine_micro_metrics(per_micro: dict) -> dict:
    """One batch's metrics from its micro-batches' (each [M], `make_grpo_step`)."""
    n = per_micro["n_tokens"]
    w = n / jnp.maximum(jnp.sum(n), 1.0)
    out = {}
    for k, v in per_micro.items():
        if k in ("loss", "n_tokens"):
            out[k] = jnp.sum(v)
        elif k == "agg_denominator":
            out[k] = v[0]
        elif k.endswith("_max"):
            out[k] = jnp.max(v)
        else:
            out[k] = jnp.sum(v * w)
    return out


# XLA:GPU compiler options for the update on one GPU: XLA's own dense products (attention projections, the head and
# its gradients) on cuBLAS instead of XLA's Triton GEMM fusions. Measured at the bench shape (512 rows, 8
# micro-batches, one H100) only as the global XLA_FLAGS switch: update 1.323 s against 1.340 (session 26, +1.6 GiB
# peak) and 1.316 against 1.330 (session 27); as this program's option it is not yet timed against its absence
# (an H200 with it: 1.120 s; docs/LOG.md). A mesh of several devices keeps XLA's defaults (untimed).
GPU_UPDATE_OPTIONS = {"xla_gpu_enable_triton_gemm": False}


def compiler_options(backend: str, one_device: bool) -> dict | None:
    """The GRPO update's XLA compiler options: GPU_UPDATE_OPTIONS on one GPU, None (XLA's defaults) elsewhere."""
    return dict(GPU_UPDATE_OPTIONS) if backend == "gpu" and one_device else None


def make_grpo_step(graphdef, model_cfg: ModelConfig, optimizer: optax.GradientTransformation,
                   grpo_cfg: G.GRPOConfig, temperature: float, *, bias_update_speed: float = 0.0, experts_fn=None,
                   lr_schedule: Optional[optax.Schedule] = None, routing_replay: bool = True,
                   micro_batches: int = 1) -> Callable[[TS.TrainState, Rollouts],
                                                                           tuple[TS.TrainState, dict]]:
    """step(state, batch) -> (state, metrics), pure; jit it with the state donated. Call it grpo_cfg.mu times per
    batch of rollouts with the same batch (old_logp fixed). `temperature`: the sampler's (0 = greedy: log-probs at 1).

    Metrics (float32 scalars unless noted): loss; clip_frac, clip_frac_high, clip_frac_low, ratio_mean, ratio_max,
    entropy_proxy (mean -logp), n_tokens, kl (only with ref_logp) from grpo_loss; entropy (mean entropy of the
    tempered policy over completion tokens); sampler_trainer_logp_gap / _max (mean / max |old_logp - logp| over
    completion tokens: on the first of the mu updates, where params equal the sampler's, the sampler/trainer
    mismatch; on later ones, how far the policy has moved); grad_norm; applied (int32 1/0); maxvio [L] (this
    batch's MoE load violation); lr when lr_schedule is given; routing_mismatch when the batch carries the
    sampler's routes (replayed when routing_replay, `grpo_objective`).

    micro_batches M: the rows are split M ways and the gradients summed in a `lax.scan` (gradient accumulation): each
    micro-batch's loss divides by the whole batch's aggregation denominator, so loss and gradient are the whole
    batch's up to float rounding. Metrics then combine as: loss summed, maxima the max, n_tokens summed, the rest
    the micro-batches' means weighted by their completion tokens (exact for token means).
    """
    if not isinstance(grpo_cfg, G.GRPOConfig):
        raise ValueError(f"grpo_cfg must be a GRPOConfig, got {type(grpo_cfg).__name__}")
    tau = _scale(temperature)
    del model_cfg  # the graphdef carries the config (the compute dtype too); kept for symmetry with make_train_step
    grad_fn = jax.value_and_grad(grpo_objective, has_aux=True)

    def grads_of(params, bias, b, denominator=None):
        (_, (metrics, loads)), grads = grad_fn(params, bias, graphdef, b, grpo_cfg, tau, experts_fn,
                                               routing_replay, denominator)
        return grads, metrics, loads

    def step(state: TS.TrainState, batch: Rollouts):
        if micro_batches == 1:
            grads, metrics, loads = grads_of(state.params, state.router_bias, batch)
        else:
            denominator = G.grpo_loss(batch.old_logp, batch.old_logp, batch.ref_logp, batch.advantages,
                                      batch.completion_mask, grpo_cfg,
                                      sampler_logp=batch.sampler_logp)[1]["agg_denominator"]
            split = jax.tree.map(lambda x: x.reshape(micro_batches, x.shape[0] // micro_batches, *x.shape[1:]),
                                 batch)
            # The routed expert stacks cast to the compute dtype once for all micro-batches (XLA cast and split
            # them in every iteration of the scan: 17.8 ms of an update in 8 micro-batches on an H100, docs/LOG.md
            # session 27); their gradients come in that dtype and are summed into float32.
            compute_dtype = dtype_of(nnx.merge(graphdef, nnx.merge_state(state.params, state.router_bias)).cfg.dtype)
            params = M.precast_experts(state.params, compute_dtype)

            def body(acc, b):
                grads, metrics, loads = grads_of(params, state.router_bias, b, denominator)
                return jax.tree.map(lambda a, g: a + g.astype(a.dtype), acc, (grads, loads)), metrics

            loads_shape = jax.eval_shape(
                lambda: grads_of(params, state.router_bias, jax.tree.map(lambda x: x[0], split), denominator)[2])
            zeros = jax.tree.map(jnp.zeros_like, (state.params, loads_shape))
            (grads, loads), per_micro = jax.lax.scan(body, zeros, split)
            metrics = combine_micro_metrics(per_micro)
        loss = metrics["loss"]
        bias = TS.update_router_bias(state.router_bias, loads, bias_update_speed) if bias_update_speed else \
            state.router_bias
        applied = state.step - state.nonfinite_total  # optimizer updates applied before this step
        new, grad_norm, finite = TS.guarded_update(state, grads, loss, optimizer, bias)
        metrics = dict(metrics, grad_norm=grad_norm, applied=finite.astype(jnp.int32),
                       maxvio=TS.max_violation(loads[0]))
        if lr_schedule is not None:
            metrics["lr"] = jnp.asarray(lr_schedule(applied), jnp.float32)
        return new, metrics

    return step


__all__ = ["Rollouts", "rollouts_from_samples", "routes_on_device", "logprobs_from_logits", "policy_logprobs",
           "token_logprobs",
           "token_logprobs_and_entropy", "jit_token_logprobs", "grpo_objective", "make_grpo_step", "compiler_options",
           "GPU_UPDATE_OPTIONS"]

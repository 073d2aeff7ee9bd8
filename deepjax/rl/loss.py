"""GRPO: the clipped policy-gradient loss of DeepSeekMath (used unchanged in DeepSeek-V3 and R1) and two later variants.

For each question q, sample G outputs o_1..o_G from pi_theta_old, score them (rewards r_1..r_G), give every token of o_i
the same advantage A_i, and maximize, for mu updates of pi_theta on that batch of rollouts,

    J(theta) = 1/G sum_i 1/|o_i| sum_t [ min(rho_it A_i, clip(rho_it, 1 - eps, 1 + eps) A_i) - beta D_KL ]
    rho_it   = pi_theta(o_it | q, o_i,<t) / pi_theta_old(o_it | q, o_i,<t)
    D_KL     = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1              (the "k3" estimator, per token, always >= 0)
    A_i      = (r_i - mean(r_1..r_G)) / std(r_1..r_G)                   (outcome supervision)

`grpo_loss` returns -J (a loss to minimize). Paper symbol -> code:

    q              the prompt; not an argument: it enters only through the grouping (the G outputs of one q)
    o_i, o_it      row i of the [B, T] arrays (B = number of outputs, the G outputs of a prompt on consecutive rows),
                   token t of it; |o_i| = mask[i].sum() (mask is 1 on completion tokens, 0 on prompt and padding)
    pi_theta       logp[i, t] = log pi_theta(o_it | q, o_i,<t): the current policy, the only input differentiated
    pi_theta_old   old_logp: the policy that sampled the rollouts (constant; no gradient flows into it)
    pi_ref         ref_logp: the frozen reference policy of the KL penalty (None allowed when beta == 0)
    epsilon        GRPOConfig.eps_low (lower clip 1 - eps_low) and GRPOConfig.eps_high (upper clip 1 + eps_high)
    beta           GRPOConfig.beta
    D_KL           GRPOConfig.kl_estimator == "k3" (`k3_kl`)
    A_i            advantages[i], from `group_advantages(r, G, GRPOConfig.advantage_norm)`
    r_i            the rewards given to `group_advantages`
    G              GRPOConfig.group_size
    mu             GRPOConfig.mu: optimizer updates per batch of rollouts (the training loop's business, not the loss's)

Settings: DeepSeekMath G = 64, beta = 0.04; R1-Zero (secondary summaries) G = 16, beta = 0.001, hence the defaults.

Where each variant departs from the paper (GRPOConfig fields in brackets):

    GRPO (DeepSeekMath) [aggregation="grpo", advantage_norm="std", eps_high=eps_low, beta>0]
        KL by the k3 estimator added to the per-token objective (not folded into the reward as in PPO), symmetric clip,
        per-output mean over its tokens, then mean over the outputs of the batch (all its prompts; a fully masked row
        is not an output and is left out of that mean). Unlike the paper's "std(r)", the std here is the
        population std (ddof = 0) of the G rewards, plus eps = 1e-6 in the denominator; a group whose rewards are all
        equal gets A_i = 0 (no signal), not 0/0. (TRL uses the sample std, ddof = 1: a factor sqrt((G-1)/G) apart.)
    DAPO [aggregation="dapo", eps_high > eps_low (0.2 / 0.28), beta=0]
        removes the KL term, clips higher (asymmetric eps_low / eps_high), and averages over all completion tokens of
        the batch (token-level mean), so long outputs weigh by their length instead of being down-weighted by 1/|o_i|.
        (DAPO's dynamic sampling, overlong filtering/shaping are data-side and not in this module.)
    Dr. GRPO [aggregation="dr_grpo", advantage_norm="mean", beta=0]
        removes the std division from A_i (only the group mean is subtracted) and the 1/|o_i| length normalization:
        the token sum over the batch is divided by a constant, (number of outputs B) x (max completion length L),
        where L = GRPOConfig.max_completion_length, or the padded length T of the arrays when that is None.

The mu = 1 question (often asked): with mu = 1 the policy at the (single) update IS the old policy, so logp == old_logp,
rho = 1 on every token, no clip is active, and the per-token surrogate is just A_i. With beta = 0 and the
per-output-mean aggregation ("grpo") the per-output mean is A_i and the loss VALUE is -mean_i A_i = 0, because the
advantages of each group sum to zero (r_i - mean(r) sums to zero; so do its std-normalized versions). The GRADIENT
is not zero: since d rho / d theta = rho * d log pi_theta / d theta = d log pi_theta / d theta at rho = 1, it is the
plain policy gradient

    -1/B sum_i A_i 1/|o_i| sum_t d log pi_theta(o_it | q, o_i,<t) / d theta,

so training proceeds normally; a zero loss curve is expected and not a bug. (With "dapo" or "dr_grpo" aggregation
the value at rho = 1 is -sum_i A_i |o_i| / const, generally non-zero when outputs differ in length; with beta > 0 the
KL term adds beta * mean KL, zero only when pi_theta == pi_ref.)

Numerics: the log-ratios log rho = logp - old_logp and log(pi_ref / pi_theta) = ref_logp - logp are clamped to
[-max_log_ratio, max_log_ratio] before exp(), so the loss and its gradient stay finite even for log-ratios of 1e4 (the
gradient of a clamped token is zero). Everything is computed in float32. Masked tokens (mask == 0) are replaced by
zeros before any arithmetic, so their values (even inf / nan) change neither the loss, nor the metrics, nor the
gradient of the other tokens, and their own gradient is exactly zero.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

AGGREGATIONS = ("grpo", "dapo", "dr_grpo")
ADVANTAGE_NORMS = ("std", "mean")
KL_ESTIMATORS = ("k3",)
MAX_LOG_RATIO_LIMIT = 80.0  # exp(80) = 5.5e34: well inside float32 (max 3.4e38) even when multiplied by an advantage


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < float("inf")  # False for nan and +-inf


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """The GRPO loss and its variants; see the module docstring for the paper's symbols.

    eps_low          epsilon: the ratio is clipped below at 1 - eps_low            (GRPO / PPO 0.2)
    eps_high         the ratio is clipped above at 1 + eps_high; None -> eps_low    (DAPO clip-higher: 0.28)
    beta             KL coefficient; 0 drops the KL term and the need for pi_ref    (R1-Zero 0.001, DeepSeekMath 0.04)
    kl_estimator     "k3": pi_ref/pi_theta - log(pi_ref/pi_theta) - 1
    aggregation      "grpo"    per-output mean over its completion tokens, then mean over outputs
                     "dapo"    mean over all completion tokens of the batch
                     "dr_grpo" sum over all completion tokens / (number of outputs x max completion length)
    advantage_norm   "std" (r - mean) / (std + eps) per group (GRPO); "mean" r - mean (Dr. GRPO)
    group_size       G outputs per prompt                                            (R1-Zero 16, DeepSeekMath 64)
    mu               updates per batch of rollouts (read by the training loop)       (1: pi_theta_old == pi_theta)
    max_log_ratio    clamp of the log-ratios before exp()
    max_completion_length  "dr_grpo" constant's length: the sampler's max new tokens (the arrays may be longer, with
                     the prompt masked out); None: the padded length T of the batch
    """

    eps_low: float = 0.2
    eps_high: Optional[float] = None
    beta: float = 0.001
    kl_estimator: str = "k3"
    aggregation: str = "grpo"
    advantage_norm: str = "std"
    group_size: int = 16
    mu: int = 1
    max_log_ratio: float = 20.0
    max_completion_length: Optional[int] = None

    def __post_init__(self):
        if self.eps_high is None:
            object.__setattr__(self, "eps_high", self.eps_low)
        self.validate()

    def validate(self) -> None:
        def bad(field, want):
            raise ValueError(f"GRPOConfig.{field} must be {want}, got {getattr(self, field)!r}")

        if not _is_real(self.eps_low) or not 0.0 < self.eps_low < 1.0:
            bad("eps_low", "a number in (0, 1)")
        if not _is_real(self.eps_high) or not self.eps_high > 0.0:
            bad("eps_high", "a positive number (or None for eps_low)")
        if not _is_real(self.beta) or self.beta < 0.0:
            bad("beta", "a finite number >= 0")
        if self.kl_estimator not in KL_ESTIMATORS:
            bad("kl_estimator", f"one of {KL_ESTIMATORS}")
        if self.aggregation not in AGGREGATIONS:
            bad("aggregation", f"one of {AGGREGATIONS}")
        if self.advantage_norm not in ADVANTAGE_NORMS:
            bad("advantage_norm", f"one of {ADVANTAGE_NORMS}")
        if not _is_int(self.group_size) or self.group_size < 2:
            bad("group_size", "an int >= 2")
        if not _is_int(self.mu) or self.mu < 1:
            bad("mu", "an int >= 1")
        if not _is_real(self.max_log_ratio) or not 0.0 < self.max_log_ratio <= MAX_LOG_RATIO_LIMIT:
            bad("max_log_ratio", f"a number in (0, {MAX_LOG_RATIO_LIMIT:g}]")
        if self.max_completion_length is not None and (
                not _is_int(self.max_completion_length) or self.max_completion_length < 1):
            bad("max_completion_length", "None or an int >= 1")


def group_advantages(rewards, group_size: int, mode: str = "std", eps: float = 1e-6) -> jax.Array:
    """A_i per output from the rewards r_i: [N] (N = P x G, each group of G on consecutive entries) or [P, G] -> [N].

    mode "std": (r_i - mean(group)) / (std(group) + eps), population std (ddof = 0)   (GRPO)
    mode "mean": r_i - mean(group)                                                     (Dr. GRPO)
    """
    if not _is_int(group_size) or group_size < 1:
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
    if mode not in ADVANTAGE_NORMS:
        raise ValueError(f"mode must be one of {ADVANTAGE_NORMS}, got {mode!r}")
    r = jnp.asarray(rewards, jnp.float32)
    if r.ndim == 1:
        if r.shape[0] % group_size:
            raise ValueError(f"rewards: {r.shape[0]} entries are not a whole number of groups of {group_size}")
        r = r.reshape(-1, group_size)
    elif r.ndim != 2 or r.shape[1] != group_size:
        raise ValueError(f"rewards must be [N] or [P, group_size={group_size}], got shape {r.shape}")
    centred = r - jnp.mean(r, axis=1, keepdims=True)
    if mode == "std":
        centred = centred / (jnp.std(r, axis=1, keepdims=True) + eps)
    return centred.reshape(-1)


def k3_kl(logp, ref_logp, max_log_ratio: float = 20.0) -> jax.Array:
    """Per-token k3 estimate of KL(pi_theta || pi_ref): exp(d) - d - 1 with d = clamp(ref_logp - logp); >= 0, and 0
    exactly where logp == ref_logp."""
    d = jnp.clip(ref_logp - logp, -max_log_ratio, max_log_ratio)
    # expm1(d) - d, not exp(d) - d - 1: near d = 0 the latter cancels to rounding error of either sign (float32:
    # negative for ~2% of |d| < 1e-3). e^d - 1 > d for every d != 0, and rounding is monotone, so fl(expm1(d)) >= d
    # and the difference is >= 0; the maximum guards an expm1 less exact than that.
    return jnp.maximum(jnp.expm1(d) - d, 0.0)


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, cfg: GRPOConfig):
    """(loss, metrics): -J(theta) of the module docstring, aggregated by cfg.aggregation.

    logp [B, T]        log pi_theta of the sampled tokens (differentiated)
    old_logp [B, T]    log pi_theta_old of the same tokens (treated as a constant)
    ref_logp [B, T]    log pi_ref of the same tokens, or None (allowed only when cfg.beta == 0)
    advantages [B]     A_i, one per output (row)
    mask [B, T]        1 / True on completion tokens, 0 / False on prompt and padding

    metrics (all float32 scalars, no gradient, over the completion tokens):
        clip_frac       share of tokens whose clip is active (the min picks the clipped term, so the token has no
                        policy gradient): A > 0 and rho > 1 + eps_high, or A < 0 and rho < 1 - eps_low
        clip_frac_low   the A < 0, rho < 1 - eps_low part;  clip_frac_high the A > 0, rho > 1 + eps_high part
        ratio_mean      mean rho (rho clamped as in the loss);  ratio_max  max rho
        kl              mean k3 KL(pi_theta || pi_ref); only when ref_logp is given
        entropy_proxy   mean -logp (entropy estimate of pi_theta on the sampled tokens)
        n_tokens        number of completion tokens
    """
    if not isinstance(cfg, GRPOConfig):
        raise ValueError(f"cfg must be a GRPOConfig, got {type(cfg).__name__}")
    logp = jnp.asarray(logp)
    if logp.ndim != 2:
        raise ValueError(f"logp must be [B, T], got shape {logp.shape}")
    shape = logp.shape
    others = {"old_logp": old_logp, "mask": mask, "ref_logp": ref_logp}
    for name, x in others.items():
        if x is not None and jnp.shape(x) != shape:
            raise ValueError(f"{name} must have logp's shape {shape}, got {jnp.shape(x)}")
    if jnp.shape(advantages) != shape[:1]:
        raise ValueError(f"advantages must be [B] = {shape[:1]}, got {jnp.shape(advantages)}")
    if cfg.beta > 0 and ref_logp is None:
        raise ValueError(f"ref_logp is None, but GRPOConfig.beta = {cfg.beta} > 0 needs the reference log-probs")
    n_out, length = shape  # T may exceed max_completion_length: the rows hold prompt + completion, mask the latter

    m = jnp.asarray(mask) != 0
    mf = m.astype(jnp.float32)
    zero = jnp.zeros((), jnp.float32)
    # Masked tokens become zeros before any arithmetic: whatever they hold (inf, nan) cannot leak into value or grad.
    logp = jnp.where(m, logp.astype(jnp.float32), zero)
    old_logp = jnp.where(m, jax.lax.stop_gradient(jnp.asarray(old_logp, jnp.float32)), zero)
    adv = jax.lax.stop_gradient(jnp.asarray(advantages, jnp.float32))[:, None]  # [B, 1]

    lim = float(cfg.max_log_ratio)
    ratio = jnp.exp(jnp.clip(logp - old_logp, -lim, lim))
    clipped_ratio = jnp.clip(ratio, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
    objective = jnp.minimum(ratio * adv, clipped_ratio * adv)  # [B, T]

    kl = None
    if ref_logp is not None:
        ref_logp = jnp.where(m, jax.lax.stop_gradient(jnp.asarray(ref_logp, jnp.float32)), zero)
        kl = jnp.where(m, k3_kl(logp, ref_logp, lim), zero)
        if cfg.beta > 0:
            objective = objective - cfg.beta * kl
    objective = jnp.where(m, objective, zero)

    n_tokens = jnp.sum(mf)
    if cfg.aggregation == "grpo":
        per_output_len = jnp.sum(mf, axis=1)
        per_output = jnp.sum(objective, axis=1) / jnp.maximum(per_output_len, 1.0)
        n_nonempty = jnp.sum((per_output_len > 0).astype(jnp.float32))  # fully padded rows are not outputs
        value = jnp.sum(per_output) / jnp.maximum(n_nonempty, 1.0)
    elif cfg.aggregation == "dapo":
        value = jnp.sum(objective) / jnp.maximum(n_tokens, 1.0)
    else:  # dr_grpo
        max_len = cfg.max_completion_length if cfg.max_completion_length is not None else length
        value = jnp.sum(objective) / float(n_out * max_len)
    loss = -value

    sg = jax.lax.stop_gradient
    denom = jnp.maximum(n_tokens, 1.0)

    def token_mean(x):
        return jnp.sum(jnp.where(m, sg(x), zero)) / denom

    high = (adv > 0) & (ratio > 1.0 + cfg.eps_high)
    low = (adv < 0) & (ratio < 1.0 - cfg.eps_low)
    metrics = {
        "clip_frac": token_mean((high | low).astype(jnp.float32)),
        "clip_frac_high": token_mean(high.astype(jnp.float32)),
        "clip_frac_low": token_mean(low.astype(jnp.float32)),
        "ratio_mean": token_mean(ratio),
        "ratio_max": jnp.max(jnp.where(m, sg(ratio), zero)),
        "entropy_proxy": token_mean(-logp),
        "n_tokens": n_tokens,
    }
    if kl is not None:
        metrics["kl"] = token_mean(kl)
    return loss, metrics

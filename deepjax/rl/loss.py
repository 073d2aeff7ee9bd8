"""GRPO: the clipped policy-gradient loss of DeepSeekMath (used unchanged in DeepSeek-V3 and R1) and later variants.

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
    pi_sampler     sampler_logp (optional): the same policy as computed by the rollout engine for its own tokens; it
                   can differ from old_logp (kernels, numerics, MoE routing); see "Sampler / trainer mismatch" below.
                   With it, old_logp must be the trainer's recomputation under the sampling weights (a loop that
                   passes the sampler's log-probs as old_logp, as deepjax's does today, has no mismatch to correct)
    pi_ref         ref_logp: the frozen reference policy of the KL penalty (None allowed when beta == 0)
    epsilon        GRPOConfig.eps_low (lower clip 1 - eps_low) and GRPOConfig.eps_high (upper clip 1 + eps_high)
    beta           GRPOConfig.beta
    D_KL           GRPOConfig.kl_estimator: "k3" (`k3_kl`), or "k3_is" (DeepSeek-V3.2, below)
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
    GSPO (Qwen, arXiv 2507.18071) [ratio="sequence", gspo_eps_low=3e-4, gspo_eps_high=4e-4, beta=0]
        replaces the token ratio rho_it by the output's length-normalized sequence ratio
            s_i = (pi_theta(o_i | q) / pi_theta_old(o_i | q))^(1/|o_i|) = exp(1/|o_i| sum_t (logp_it - old_logp_it)),
        clipped at [1 - gspo_eps_low, 1 + gspo_eps_high]: an output is clipped as a whole or not at all, never some of
        its tokens. Implemented in the paper's GSPO-token form, s_it = sg(s_i) pi_theta(o_it) / sg(pi_theta(o_it))
        (sg = stop-gradient): the value is s_i on every token and d s_it / d logp_it = s_i, so with one A_i per output
        the gradient is exactly sequence-level GSPO's (per token s_i A_i / |o_i| under "grpo" aggregation, which is
        the paper's 1/G sum_i). The clip range has its own two fields, not eps_low / eps_high (those are not read in
        this mode): a geometric mean of token ratios sits orders of magnitude closer to 1 than the token ratios, and
        0.2 would never clip; the defaults are the paper's 3e-4 / 4e-4 (section 5.1). |o_i| counts the tokens the
        loss keeps (masked importance sampling below may drop some). The paper's per-output mean is "grpo".
    CISPO (MiniMax-M1, arXiv 2506.13585) [ratio="cispo", cispo_eps_low=1 (no lower bound), aggregation="dapo",
                                          beta=0]
        no min of a clipped and an unclipped surrogate; the clipped ratio is a stop-gradient weight on each token's
        log-prob:  J = sum_t sg(clip(rho_it, 1 - cispo_eps_low, 1 + cispo_eps_high)) A_i log pi_theta(o_it), then
        aggregated. A token's gradient is clip(rho_it) A_i d logp_it: bounded, never zeroed by the clip, so the
        tokens that PPO / GRPO clip out of the gradient after the first update (low-probability "fork" tokens such
        as "However" / "Recheck", whose ratios change most) keep contributing; that is the method's point. The paper
        puts no lower bound on the weight (cispo_eps_low = 1: clip below at 0, inactive since rho > 0), tunes only
        the upper one, and averages over all tokens of the batch ("dapo"); cispo_eps_high = 3 (weight <= 4) is
        Tinker's CISPO default. The loss VALUE is -sum sg(w) A logp: its gradient is CISPO's, but the number is not
        comparable with the ratio losses (at mu = 1 it is not 0 but -mean A_i logp_it, with the aggregation's mean).
    Unbiased KL (DeepSeek-V3.2, arXiv 2512.02556, section 3.1, eq. 7) [kl_estimator="k3_is"]
        the k3 term weighted by the token ratio,
            D_KL = pi_theta/pi_theta_old (pi_ref/pi_theta - log(pi_ref/pi_theta) - 1).
        The tokens are sampled from pi_old, not pi_theta, and the ratio corrects for it: its gradient is
        rho (logp - ref_logp) d logp, the unbiased gradient of KL(pi_theta || pi_ref) (plain k3 gives
        (1 - pi_ref/pi_theta) d logp, which grows without bound where pi_theta << pi_ref). rho is the token ratio (the
        one clamped as below) whatever `ratio` is; at mu = 1 (rho = 1) the value equals k3's.

Sampler / trainer mismatch (off by default; needs `sampler_logp`). The rollouts come from an inference engine whose
log-probs pi_sampler differ from the trainer's pi_theta_old for the same weights (other kernels and precision; on MoE
models, tokens routed to other experts), so the batch is off-policy even at mu = 1. With the per-token ratio
    w_it = pi_theta_old(o_it) / pi_sampler(o_it) = exp(old_logp - sampler_logp)     (a constant: no gradient)
    TIS [tis_cap=C] truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly brings you
        off-policy RL training"): the policy term of every token (the part multiplied by A_i, not the KL term) is
        multiplied by min(w_it, C). C = 2 is a common choice; C < 1 is refused (it would scale down matched tokens).
    MIS [mis_low, mis_high, mis_level] masked importance sampling / rejection ("When speed kills stability", Liu, Li
        et al. 2025; IcePop of Ring-1T): tokens whose ratio leaves [mis_low, mis_high] are dropped, at mis_level
        "token" (w_it) or "sequence" (the geometric mean exp(mean_t (old_logp - sampler_logp)) over the row's
        completion tokens; an outlying row is dropped whole). Either bound may be None (one-sided). A dropped token is
        treated as not sampled: it leaves the policy term, the KL term and the token counts of the aggregation (|o_i|
        of "grpo", the token count of "dapo"; a row with no token left is not an output; the "dr_grpo" constant is a
        constant and stays), as verl's and slime's rejection masks do, so the kept tokens are not diluted. Only the
        mask acts: MIS alone applies no weight; with tis_cap >= mis_high the kept tokens carry w_it as well (the
        blog's MIS, weight times mask).
    Metrics: tis_frac (share of completion tokens kept and truncated), mis_drop_frac (share dropped), is_weight_mean
    (mean weight on the kept tokens: min(w, C), or 1 without TIS). Both corrections apply to every `ratio` mode.

The mu = 1 question (often asked): with mu = 1 the policy at the (single) update IS the old policy, so logp == old_logp,
rho = 1 on every token, no clip is active, and the per-token surrogate is just A_i. With beta = 0 and the
per-output-mean aggregation ("grpo") the per-output mean is A_i and the loss VALUE is -mean_i A_i = 0, because the
advantages of each group sum to zero (r_i - mean(r) sums to zero; so do its std-normalized versions). The GRADIENT
is not zero: since d rho / d theta = rho * d log pi_theta / d theta = d log pi_theta / d theta at rho = 1, it is the
plain policy gradient

    -1/B sum_i A_i 1/|o_i| sum_t d log pi_theta(o_it | q, o_i,<t) / d theta,

so training proceeds normally; a zero loss curve is expected and not a bug. (With "dapo" or "dr_grpo" aggregation
the value at rho = 1 is -sum_i A_i |o_i| / const, generally non-zero when outputs differ in length; with beta > 0 the
KL term adds beta * mean KL, zero only when pi_theta == pi_ref. GSPO gives the same value and gradient as GRPO at
mu = 1; CISPO the same gradient, not the same value; TIS / MIS change both when the sampler differs.)

Numerics: the log-ratios log rho = logp - old_logp and log(pi_ref / pi_theta) = ref_logp - logp are clamped to
[-max_log_ratio, max_log_ratio] before exp(), so the loss and its gradient stay finite even for log-ratios of 1e4 (the
gradient of a clamped token is zero; under CISPO the clamp only bounds the token's constant weight). So are the
sequence log-ratio of GSPO (the gradient of a clamped row is zero) and the sampler log-ratios (token and sequence).
Everything is computed in float32. Masked tokens (mask == 0) are replaced by zeros before any arithmetic, so their
values (even inf / nan) change neither the loss, nor the metrics, nor the gradient of the other tokens, and their own
gradient is exactly zero.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

AGGREGATIONS = ("grpo", "dapo", "dr_grpo")
ADVANTAGE_NORMS = ("std", "mean")
KL_ESTIMATORS = ("k3", "k3_is")
RATIOS = ("token", "sequence", "cispo")
MIS_LEVELS = ("token", "sequence")
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
                     "k3_is": k3 x pi_theta/pi_theta_old, the unbiased estimate of DeepSeek-V3.2
    aggregation      "grpo"    per-output mean over its completion tokens, then mean over outputs
                     "dapo"    mean over all completion tokens of the batch
                     "dr_grpo" sum over all completion tokens / (number of outputs x max completion length)
    advantage_norm   "std" (r - mean) / (std + eps) per group (GRPO); "mean" r - mean (Dr. GRPO)
    group_size       G outputs per prompt                                            (R1-Zero 16, DeepSeekMath 64)
    mu               updates per batch of rollouts (read by the training loop)       (1: pi_theta_old == pi_theta)
    max_log_ratio    clamp of the log-ratios before exp()
    max_completion_length  "dr_grpo" constant's length: the sampler's max new tokens (the arrays may be longer, with
                     the prompt masked out); None: the padded length T of the batch
    ratio            "token"    per-token ratio, min / clip surrogate (GRPO, DAPO, Dr. GRPO)
                     "sequence" GSPO: the output's geometric-mean ratio s_i, clipped by gspo_eps_low / gspo_eps_high
                     "cispo"    CISPO: sg(clip(rho, 1 - cispo_eps_low, 1 + cispo_eps_high)) A logp, no token dropped
    gspo_eps_low     GSPO's lower clip 1 - gspo_eps_low (only ratio="sequence")      (GSPO paper 3e-4)
    gspo_eps_high    GSPO's upper clip 1 + gspo_eps_high (only ratio="sequence")     (GSPO paper 4e-4)
    cispo_eps_low    CISPO's weight clipped below at 1 - cispo_eps_low, in (0, 1]    (1: no lower bound, MiniMax-M1)
    cispo_eps_high   CISPO's weight clipped above at 1 + cispo_eps_high              (3: weight <= 4)
    tis_cap          C of truncated IS: policy term x min(pi_old/pi_sampler, C); None: off (needs sampler_logp)
    mis_low, mis_high  masked IS: drop tokens (or rows) whose pi_old/pi_sampler ratio is below mis_low / above
                     mis_high; None: that side off (needs sampler_logp)
    mis_level        "token": each token's ratio; "sequence": the row's geometric mean, the row dropped whole
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
    ratio: str = "token"
    gspo_eps_low: float = 3e-4
    gspo_eps_high: float = 4e-4
    cispo_eps_low: float = 1.0
    cispo_eps_high: float = 3.0
    tis_cap: Optional[float] = None
    mis_low: Optional[float] = None
    mis_high: Optional[float] = None
    mis_level: str = "token"

    def __post_init__(self):
        self.validate()

    @property
    def clip_high(self) -> float:
        """The upper clip epsilon: eps_high, or eps_low when eps_high is None (kept None, so a config nested in the
        run config follows an eps_low override)."""
        return self.eps_low if self.eps_high is None else self.eps_high

    @property
    def uses_sampler(self) -> bool:
        """Whether a sampler correction (TIS or MIS) is on: grpo_loss then needs sampler_logp."""
        return self.tis_cap is not None or self.mis_low is not None or self.mis_high is not None

    def validate(self) -> None:
        def bad(field, want):
            raise ValueError(f"GRPOConfig.{field} must be {want}, got {getattr(self, field)!r}")

        if not _is_real(self.eps_low) or not 0.0 < self.eps_low < 1.0:
            bad("eps_low", "a number in (0, 1)")
        if self.eps_high is not None and (not _is_real(self.eps_high) or not self.eps_high > 0.0):
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
        if self.ratio not in RATIOS:
            bad("ratio", f"one of {RATIOS}")
        if not _is_real(self.gspo_eps_low) or not 0.0 < self.gspo_eps_low < 1.0:
            bad("gspo_eps_low", "a number in (0, 1) (GSPO paper: 3e-4)")
        if not _is_real(self.gspo_eps_high) or not self.gspo_eps_high > 0.0:
            bad("gspo_eps_high", "a positive number (GSPO paper: 4e-4)")
        if not _is_real(self.cispo_eps_low) or not 0.0 < self.cispo_eps_low <= 1.0:
            bad("cispo_eps_low", "a number in (0, 1] (1: no lower bound)")
        if not _is_real(self.cispo_eps_high) or not self.cispo_eps_high > 0.0:
            bad("cispo_eps_high", "a positive number")
        if self.tis_cap is not None and (not _is_real(self.tis_cap) or not self.tis_cap >= 1.0):
            bad("tis_cap", "None (off) or a number >= 1")
        if self.mis_low is not None and (not _is_real(self.mis_low) or not 0.0 < self.mis_low < 1.0):
            bad("mis_low", "None (off) or a number in (0, 1)")
        if self.mis_high is not None and (not _is_real(self.mis_high) or not self.mis_high > 1.0):
            bad("mis_high", "None (off) or a finite number > 1")
        if self.mis_level not in MIS_LEVELS:
            bad("mis_level", f"one of {MIS_LEVELS}")


def group_advantages(rewards, group_size: int, mode: str = "std", eps: float = 1e-6):
    """A_i per output from the rewards r_i: [N] (N = P x G, each group of G on consecutive entries) or [P, G] -> [N].

    mode "std": (r_i - mean(group)) / (std(group) + eps), population std (ddof = 0)   (GRPO)
    mode "mean": r_i - mean(group)                                                     (Dr. GRPO)

    Rewards that hold a jax array (traced included) give a jax array (jittable); host values (numpy, numbers) a
    float32 numpy array, computed on the host in float64: the GRPO loop's rewards and advantages never leave it
    (`rollouts_from_samples` takes numpy). A group whose rewards are all equal gets advantages of exactly 0.
    """
    if not _is_int(group_size) or group_size < 1:
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
    if mode not in ADVANTAGE_NORMS:
        raise ValueError(f"mode must be one of {ADVANTAGE_NORMS}, got {mode!r}")
    xp = jnp if any(isinstance(x, jax.Array) for x in jax.tree.leaves(rewards)) else np
    r = xp.asarray(rewards, jnp.float32 if xp is jnp else np.float64)
    if r.ndim == 1:
        if r.shape[0] % group_size:
            raise ValueError(f"rewards: {r.shape[0]} entries are not a whole number of groups of {group_size}")
        r = r.reshape(-1, group_size)
    elif r.ndim != 2 or r.shape[1] != group_size:
        raise ValueError(f"rewards must be [N] or [P, group_size={group_size}], got shape {r.shape}")
    # an all-equal group is no signal: exactly 0 (float32's mean of [0.1] * 3 is not 0.1, and / (std + eps) would
    # blow the rounding up)
    same = xp.max(r, axis=1, keepdims=True) == xp.min(r, axis=1, keepdims=True)
    centred = xp.where(same, 0.0, r - xp.mean(r, axis=1, keepdims=True))
    if mode == "std":
        centred = centred / (xp.std(r, axis=1, keepdims=True) + eps)
    return centred.reshape(-1).astype(xp.float32)


def k3_kl(logp, ref_logp, max_log_ratio: float = 20.0) -> jax.Array:
    """Per-token k3 estimate of KL(pi_theta || pi_ref): exp(d) - d - 1 with d = clamp(ref_logp - logp); >= 0, and 0
    exactly where logp == ref_logp."""
    d = jnp.clip(ref_logp - logp, -max_log_ratio, max_log_ratio)
    # expm1(d) - d, not exp(d) - d - 1: near d = 0 the latter cancels to rounding error of either sign (float32:
    # negative for ~2% of |d| < 1e-3). e^d - 1 > d for every d != 0, and rounding is monotone, so fl(expm1(d)) >= d
    # and the difference is >= 0; the maximum guards an expm1 less exact than that.
    return jnp.maximum(jnp.expm1(d) - d, 0.0)


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, cfg: GRPOConfig, *, sampler_logp=None, denominator=None):
    """(loss, metrics): -J(theta) of the module docstring, aggregated by cfg.aggregation.

    logp [B, T]        log pi_theta of the sampled tokens (differentiated)
    old_logp [B, T]    log pi_theta_old of the same tokens (treated as a constant)
    ref_logp [B, T]    log pi_ref of the same tokens, or None (allowed only when cfg.beta == 0)
    advantages [B]     A_i, one per output (row)
    mask [B, T]        1 / True on completion tokens, 0 / False on prompt and padding
    sampler_logp [B, T]  (keyword) log-probs the rollout sampler computed for its own tokens (a constant), or None;
                       needed when cfg.tis_cap / mis_low / mis_high is set, otherwise only reported on

    metrics (all float32 scalars, no gradient, over the completion tokens, MIS-dropped ones included):
        clip_frac       share of tokens whose clip is active. ratio "token" / "sequence": the min picks the clipped
                        term, so the token has no policy gradient: A > 0 and ratio > 1 + eps_high, or A < 0 and
                        ratio < 1 - eps_low (ratio = rho_it, or the row's s_i with the gspo_eps_*); "cispo": the
                        weight is clipped (either side, any A; the gradient is kept, with the clipped weight)
        clip_frac_low   the lower-clip part;  clip_frac_high the upper-clip part
        ratio_mean      mean rho (rho clamped as in the loss);  ratio_max  max rho  (the token ratio in every mode)
        seq_ratio_mean, seq_ratio_max   mean / max of GSPO's s_i over the outputs; only with ratio "sequence"
        kl              mean KL estimate (k3, or k3_is with kl_estimator "k3_is"); only when ref_logp is given
        entropy_proxy   mean -logp (entropy estimate of pi_theta on the sampled tokens)
        n_tokens        number of completion tokens
        agg_denominator what the aggregation divides by (outputs, kept tokens, or B x max_completion_length); it does
                        not depend on logp, so micro-batches of a batch pass the whole batch's as `denominator`
        tis_frac, mis_drop_frac, is_weight_mean   only when sampler_logp is given: share of completion tokens whose
                        TIS weight is truncated (kept ones), share MIS drops, mean weight on the kept tokens
    """
    if not isinstance(cfg, GRPOConfig):
        raise ValueError(f"cfg must be a GRPOConfig, got {type(cfg).__name__}")
    logp = jnp.asarray(logp)
    if logp.ndim != 2:
        raise ValueError(f"logp must be [B, T], got shape {logp.shape}")
    shape = logp.shape
    others = {"old_logp": old_logp, "mask": mask, "ref_logp": ref_logp, "sampler_logp": sampler_logp}
    for name, x in others.items():
        if x is not None and jnp.shape(x) != shape:
            raise ValueError(f"{name} must have logp's shape {shape}, got {jnp.shape(x)}")
    if jnp.shape(advantages) != shape[:1]:
        raise ValueError(f"advantages must be [B] = {shape[:1]}, got {jnp.shape(advantages)}")
    if cfg.beta > 0 and ref_logp is None:
        raise ValueError(f"ref_logp is None, but GRPOConfig.beta = {cfg.beta} > 0 needs the reference log-probs")
    if cfg.uses_sampler and sampler_logp is None:
        raise ValueError(f"sampler_logp is None, but GRPOConfig.tis_cap = {cfg.tis_cap}, mis_low = {cfg.mis_low}, "
                         f"mis_high = {cfg.mis_high} need the sampler's log-probs")
    n_out, length = shape  # T may exceed max_completion_length: the rows hold prompt + completion, mask the latter

    sg = jax.lax.stop_gradient
    m = jnp.asarray(mask) != 0
    mf = m.astype(jnp.float32)
    zero = jnp.zeros((), jnp.float32)
    # Masked tokens become zeros before any arithmetic: whatever they hold (inf, nan) cannot leak into value or grad.
    logp = jnp.where(m, logp.astype(jnp.float32), zero)
    old_logp = jnp.where(m, sg(jnp.asarray(old_logp, jnp.float32)), zero)
    adv = sg(jnp.asarray(advantages, jnp.float32))[:, None]  # [B, 1]
    lim = float(cfg.max_log_ratio)

    def row_mean(x, keep, keep_f):  # [B, T] -> [B]: mean over the kept tokens of each row (0 for an empty row)
        return jnp.sum(jnp.where(keep, x, zero), axis=1) / jnp.maximum(jnp.sum(keep_f, axis=1), 1.0)

    # ---- sampler / trainer mismatch: which tokens the loss keeps (lm), the TIS weight of the policy term
    lm, lmf, is_weight, sampler_metrics = m, mf, None, None
    if sampler_logp is not None:
        sampler_logp = jnp.where(m, sg(jnp.asarray(sampler_logp, jnp.float32)), zero)
        w = jnp.exp(jnp.clip(old_logp - sampler_logp, -lim, lim))  # pi_old / pi_sampler per token
        dropped = jnp.zeros(shape, bool)
        if cfg.mis_low is not None or cfg.mis_high is not None:
            if cfg.mis_level == "sequence":  # geometric mean of the row's token ratios
                w_mis = jnp.exp(jnp.clip(row_mean(old_logp - sampler_logp, m, mf), -lim, lim))[:, None]
            else:
                w_mis = w
            if cfg.mis_low is not None:
                dropped = dropped | (w_mis < cfg.mis_low)
            if cfg.mis_high is not None:
                dropped = dropped | (w_mis > cfg.mis_high)
            dropped = dropped & m
            lm = m & ~dropped
            lmf = lm.astype(jnp.float32)
        truncated = jnp.zeros(shape, bool)
        if cfg.tis_cap is not None:
            is_weight = jnp.minimum(w, cfg.tis_cap)
            truncated = lm & (w > cfg.tis_cap)
        n_kept = jnp.sum(lmf)
        sampler_metrics = {
            "tis_frac": jnp.sum(truncated.astype(jnp.float32)),
            "mis_drop_frac": jnp.sum(dropped.astype(jnp.float32)),
            "is_weight_mean": (jnp.sum(jnp.where(lm, is_weight, zero)) if is_weight is not None else n_kept) /
                              jnp.maximum(n_kept, 1.0),
        }

    ratio = jnp.exp(jnp.clip(logp - old_logp, -lim, lim))
    seq_ratio = None
    if cfg.ratio == "token":
        lo, hi = 1.0 - cfg.eps_low, 1.0 + cfg.clip_high
        clipped_ratio = jnp.clip(ratio, lo, hi)
        objective = jnp.minimum(ratio * adv, clipped_ratio * adv)  # [B, T]
        high = (adv > 0) & (ratio > hi)
        low = (adv < 0) & (ratio < lo)
    elif cfg.ratio == "sequence":  # GSPO-token: value s_i, d s_it / d logp_it = s_i (0 for a clamped row)
        lo, hi = 1.0 - cfg.gspo_eps_low, 1.0 + cfg.gspo_eps_high
        seq_log = sg(row_mean(logp - old_logp, lm, lmf))  # [B]
        seq_ratio = jnp.exp(jnp.clip(seq_log, -lim, lim))
        live = (jnp.abs(seq_log) < lim)[:, None]
        s_tok = seq_ratio[:, None] * jnp.exp(jnp.where(live, logp - sg(logp), zero))
        objective = jnp.minimum(s_tok * adv, jnp.clip(s_tok, lo, hi) * adv)
        high = (adv > 0) & (seq_ratio[:, None] > hi)
        low = (adv < 0) & (seq_ratio[:, None] < lo)
    else:  # cispo: a stop-gradient clipped weight on every token's log-prob gradient
        lo, hi = 1.0 - cfg.cispo_eps_low, 1.0 + cfg.cispo_eps_high
        objective = sg(jnp.clip(ratio, lo, hi)) * adv * logp
        high = ratio > hi
        low = ratio < lo
    if is_weight is not None:
        objective = objective * is_weight  # the policy term only: the KL term below is not reweighted

    kl = None
    if ref_logp is not None:
        ref_logp = jnp.where(m, sg(jnp.asarray(ref_logp, jnp.float32)), zero)
        kl = k3_kl(logp, ref_logp, lim)
        if cfg.kl_estimator == "k3_is":
            kl = ratio * kl  # rho carries gradient: d(rho k3)/d logp = rho (logp - ref_logp)
        kl = jnp.where(m, kl, zero)
        if cfg.beta > 0:
            objective = objective - cfg.beta * kl
    objective = jnp.where(lm, objective, zero)

    n_tokens = jnp.sum(mf)
    if cfg.aggregation == "grpo":
        per_output_len = jnp.sum(lmf, axis=1)
        numerator = jnp.sum(jnp.sum(objective, axis=1) / jnp.maximum(per_output_len, 1.0))
        agg = jnp.maximum(jnp.sum((per_output_len > 0).astype(jnp.float32)), 1.0)  # padded rows are not outputs
    elif cfg.aggregation == "dapo":
        numerator, agg = jnp.sum(objective), jnp.maximum(jnp.sum(lmf), 1.0)
    else:  # dr_grpo
        max_len = cfg.max_completion_length if cfg.max_completion_length is not None else length
        numerator, agg = jnp.sum(objective), jnp.asarray(float(n_out * max_len), jnp.float32)
    # The aggregation's denominator does not depend on the policy: a caller that splits the batch into micro-batches
    # passes the whole batch's (`metrics["agg_denominator"]` of a call on the whole batch), and the summed
    # micro-batch losses and gradients are the whole batch's.
    value = numerator / (agg if denominator is None else denominator)
    loss = -value

    denom = jnp.maximum(n_tokens, 1.0)

    def token_mean(x):
        return jnp.sum(jnp.where(m, sg(x), zero)) / denom

    metrics = {
        "clip_frac": token_mean((high | low).astype(jnp.float32)),
        "clip_frac_high": token_mean(high.astype(jnp.float32)),
        "clip_frac_low": token_mean(low.astype(jnp.float32)),
        "ratio_mean": token_mean(ratio),
        "ratio_max": jnp.max(jnp.where(m, sg(ratio), zero)),
        "entropy_proxy": token_mean(-logp),
        "n_tokens": n_tokens,
        "agg_denominator": sg(agg),
    }
    if seq_ratio is not None:
        rows = jnp.sum(lmf, axis=1) > 0
        metrics["seq_ratio_mean"] = jnp.sum(jnp.where(rows, seq_ratio, zero)) / jnp.maximum(
            jnp.sum(rows.astype(jnp.float32)), 1.0)
        metrics["seq_ratio_max"] = jnp.max(jnp.where(rows, seq_ratio, zero))
    if kl is not None:
        metrics["kl"] = token_mean(kl)
    if sampler_metrics is not None:
        metrics["tis_frac"] = sampler_metrics["tis_frac"] / denom
        metrics["mis_drop_frac"] = sampler_metrics["mis_drop_frac"] / denom
        metrics["is_weight_mean"] = sampler_metrics["is_weight_mean"]
    return loss, metrics

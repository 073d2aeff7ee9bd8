"""`RLConfig`: GRPO runs (`deepjax grpo`, `deepjax r1zero`). Its loss, reward and sampling fields are those of
`GRPOConfig` (deepjax/rl/loss.py), `RewardConfig` (deepjax/rl/rewards.py) and `SamplingConfig`
(deepjax/infer/sampling.py) under run-level names; `grpo()`, `rewards()` and the sampling methods build them, and
`validate` lets each of them check its own fields."""

from __future__ import annotations

import dataclasses
from typing import Optional

from deepjax.infer.sampling import SamplingConfig
from deepjax.rl.loss import GRPOConfig
from deepjax.rl.rewards import RewardConfig
from deepjax.schema import bad, check_types, checker, positive


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """GRPO (`deepjax grpo`, deepjax/rl/loop.py; docs/deepseek.md, GRPO and R1). Prompts come from data.source's train
    split; the optimizer is `optim` with rl.lr as its peak when set (its schedule over rl.steps x rl.mu updates);
    checkpoints, logging and the non-finite guard follow `train` (checkpoint_every counts GRPO steps)."""

    init_from: Optional[str] = None  # run directory (train or grpo) whose checkpoint is the initial policy; None: init
    init_step: Optional[int] = None  # its checkpoint step; None: the newest
    steps: int = 100  # GRPO steps, each one batch of rollouts and mu optimizer updates
    prompts_per_step: int = 16  # prompts per step over all hosts (R1-Zero: 32)
    group_size: int = 8  # G: outputs per prompt (R1-Zero: 16)
    mu: int = 1  # optimizer updates per batch of rollouts
    max_new_tokens: int = 32
    temperature: float = 1.0  # rollout temperature (R1-Zero: 1)
    top_p: float = 1.0
    top_k: int = 0
    eps_low: float = 0.2  # clip epsilon
    eps_high: Optional[float] = None  # clip-higher (DAPO 0.28); None: eps_low
    beta: float = 0.001  # KL coefficient (R1-Zero 0.001); 0: no reference model is held or run
    aggregation: str = "grpo"  # grpo | dapo | dr_grpo
    advantage_norm: str = "std"  # std (GRPO) | mean (Dr. GRPO)
    max_log_ratio: float = 20.0
    ref_refresh_every: int = 0  # copy the policy into the reference every N steps; 0: never
    reward_accuracy: float = 1.0  # reward weights (deepjax/rl/rewards.py RewardConfig)
    reward_format: float = 0.1
    reward_language: float = 0.0
    eval_every: int = 0  # held-out evaluation every N steps (and at the last); 0: only at the last step
    eval_problems: int = 64
    eval_k: int = 4
    eval_temperature: float = 0.6  # as R1's evaluation
    eval_top_p: float = 0.95
    bias_update_speed: float = 0.0  # gamma of the aux-loss-free bias rule on rollout loads; 0: biases frozen
    lr: Optional[float] = None  # GRPO's peak learning rate; None: optim.lr (the rest of `optim` applies as is)

    # ---- the library configs these fields map onto (each validates its own fields) ------------------------------
    def grpo(self) -> GRPOConfig:
        return GRPOConfig(eps_low=self.eps_low, eps_high=self.eps_high, beta=self.beta, aggregation=self.aggregation,
                          advantage_norm=self.advantage_norm, group_size=self.group_size, mu=self.mu,
                          max_log_ratio=self.max_log_ratio, max_completion_length=self.max_new_tokens)

    def rewards(self) -> RewardConfig:
        return RewardConfig(accuracy=self.reward_accuracy, format=self.reward_format, language=self.reward_language)

    def rollout_sampling(self, eos_ids: tuple[int, ...] = (), pad_id: int = 0) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, eos_ids=eos_ids, pad_id=pad_id)

    def eval_sampling(self) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.eval_temperature,
                              top_p=self.eval_top_p)

    def validate(self) -> None:
        """The fields of OWNED are checked by the config that owns them (the error names both); the rest here."""
        check_types(self, "rl.")
        for name, (cls, field) in OWNED.items():
            value = getattr(self, name)
            try:
                cls(**{field: value})
            except ValueError as e:
                raise bad(f"rl.{name}", value, str(e)) from None
        positive(self, "rl", ("steps", "prompts_per_step", "eval_problems", "eval_k"))
        positive(self, "rl", ("ref_refresh_every", "eval_every", "bias_update_speed"), strict=False)
        if self.lr is not None and not self.lr > 0:
            checker(self, "rl")("lr", "must be positive, or None (= optim.lr)")
        if self.init_step is not None and self.init_step < 0:
            checker(self, "rl")("init_step", "must be >= 0, or None (the newest)")


# rl field -> (the config that owns its meaning, the field there)
OWNED = {
    **{f: (GRPOConfig, f) for f in ("eps_low", "eps_high", "beta", "aggregation", "advantage_norm", "group_size", "mu",
                                     "max_log_ratio")},
    "reward_accuracy": (RewardConfig, "accuracy"), "reward_format": (RewardConfig, "format"),
    "reward_language": (RewardConfig, "language"),
    **{f: (SamplingConfig, f) for f in ("max_new_tokens", "temperature", "top_p", "top_k")},
    "eval_temperature": (SamplingConfig, "temperature"), "eval_top_p": (SamplingConfig, "top_p"),
}

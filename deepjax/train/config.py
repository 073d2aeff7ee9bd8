"""The training configs: `OptimConfig` (AdamW and the learning-rate schedule, deepjax/train/optim.py) and
`TrainConfig` (losses, balancing, checkpoints, logging: deepjax/train/step.py and loop.py). Standard library only."""

from __future__ import annotations

import dataclasses
from typing import Optional

from deepjax.schema import check_types, checker, positive, within

SCHEDULES = ("constant", "warmup_cosine", "deepseek_v3")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW and the learning-rate schedule (docs/deepseek.md, Training)."""

    lr: float = 1e-3  # peak learning rate
    schedule: str = "warmup_cosine"  # constant | warmup_cosine | deepseek_v3
    warmup_steps: int = 20
    # deepseek_v3: warmup -> constant until constant_steps -> cosine to lr*final_ratio over decay_steps
    # -> lr*final_ratio, then lr*tail_ratio for the last tail_steps (V3: 2.2e-4 -> 2.2e-5 -> 7.3e-6)
    constant_steps: int = 0
    decay_steps: int = 0
    final_ratio: float = 0.1  # warmup_cosine decays to lr*final_ratio at the last step
    tail_ratio: float = 0.0331  # deepseek_v3 only: 7.3e-6 / 2.2e-4
    tail_steps: int = 0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # matrices only
    clip_norm: float = 1.0  # global-norm clipping
    micro_batches: int = 1  # gradient accumulation: the global batch is split this many ways

    def validate(self) -> None:
        check_types(self, "optim.")
        fail = checker(self, "optim")
        if self.schedule not in SCHEDULES:
            fail("schedule", f"unknown; choose from {SCHEDULES}")
        positive(self, "optim", ("lr", "eps", "clip_norm", "micro_batches"))
        positive(self, "optim", ("warmup_steps", "constant_steps", "decay_steps", "tail_steps", "weight_decay",
                                 "final_ratio", "tail_ratio"), strict=False)
        within(self, "optim", ("b1", "b2"), 0, 1, high_open=True)  # Adam's moment decays: 1 never forgets


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The training loop: losses, balancing, checkpoints, logging."""

    steps: int = 200
    mtp_lambda: float = 0.3  # lambda: weight of the MTP loss (V3: 0.3, then 0.1)
    balance_alpha: float = 1e-4  # alpha: sequence-wise balance loss weight (V3: 1e-4)
    bias_update_speed: float = 1e-3  # gamma: aux-loss-free bias update speed (V3: 0.001; 0 = off)
    max_nonfinite: int = 3  # stop after this many non-finite steps in a row
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    fallback_on_damage: bool = False  # on a damaged latest checkpoint: restore the previous good one
    peak_tflops: Optional[float] = None  # per-device peak for MFU; None: guessed from the device kind
    plot: bool = True  # write loss / MaxVio PNG at the end

    def validate(self) -> None:
        check_types(self, "train.")
        positive(self, "train", ("steps", "log_every", "checkpoint_every", "keep_checkpoints", "max_nonfinite"))
        positive(self, "train", ("mtp_lambda", "balance_alpha", "bias_update_speed"), strict=False)
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            checker(self, "train")("peak_tflops", "must be positive, or None")

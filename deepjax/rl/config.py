"""`RLConfig`: GRPO runs (`deepjax grpo`, `deepjax r1zero`). The library configs are nested in it as they are, each
validating its own fields, so a field exists once:

    rl.loss.*      `GRPOConfig` (deepjax/rl/loss.py): clip, KL, aggregation, advantages, group size G, mu
    rl.reward.*    `RewardConfig` (deepjax/rl/rewards.py): the reward weights and the verifiers' limits
    rl.rollout.*   `SamplingConfig` (deepjax/infer/sampling.py): how rollouts are sampled (max_new_tokens,
                   temperature, top-p / top-k, the decode path); EOS and pad come from the tokenizer
    rl.eval.*      `EvalConfig` (below): the held-out evaluation during the run

e.g. `--config.rl.loss.beta=0 --config.rl.rollout.temperature=0.9 --config.rl.eval.every=10`.

`DistillConfig` (the `distill` section, `deepjax distill`, deepjax/rl/distill.py) lives here too: it nests a
`SamplingConfig` for the teacher's traces, as rl.rollout does."""

from __future__ import annotations

import dataclasses
from typing import Optional

from deepjax.infer.sampling import SamplingConfig
from deepjax.rl.loss import GRPOConfig
from deepjax.rl.rewards import LANGUAGES, RewardConfig
from deepjax.schema import check_types, checker, positive


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Held-out pass@1 during a GRPO run: rl.eval.k samples of each of rl.eval.problems test-split problems, at R1's
    evaluation temperature / top-p, with the rollouts' max_new_tokens."""

    every: int = 0  # every N GRPO steps (and at the last); 0: only at the last step
    problems: int = 64
    k: int = 4
    temperature: float = 0.6  # as R1's evaluation
    top_p: float = 0.95

    def validate(self) -> None:
        check_types(self, "rl.eval.")
        positive(self, "rl.eval", ("problems", "k"))
        positive(self, "rl.eval", ("every",), strict=False)
        fail = checker(self, "rl.eval")
        if not self.temperature >= 0:
            fail("temperature", "must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            fail("top_p", "must be in (0, 1]")


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """GRPO (`deepjax grpo`, deepjax/rl/loop.py; docs/deepseek.md, GRPO and R1). Prompts come from data.source's train
    split; the optimizer is `optim` with rl.lr as its peak when set (its schedule over rl.steps x rl.loss.mu updates);
    checkpoints, logging and the non-finite guard follow `train` (checkpoint_every counts GRPO steps)."""

    init_from: Optional[str] = None  # run directory (train or grpo) whose checkpoint is the initial policy; None: init
    init_step: Optional[int] = None  # its checkpoint step; None: the newest
    steps: int = 100  # GRPO steps, each one batch of rollouts and rl.loss.mu optimizer updates
    prompts_per_step: int = 16  # prompts per step over all hosts (R1-Zero: 32); rl.loss.group_size outputs each
    ref_refresh_every: int = 0  # copy the policy into the reference every N steps; 0: never
    bias_update_speed: float = 0.0  # gamma of the aux-loss-free bias rule on rollout loads; 0: biases frozen
    # MoE models: the trainer's log-probs use the experts the sampler chose for each token (DeepSeek-V3.2's "Keep
    # Routing"); False: its own routing. Either way the share of (token, layer) routes that differ is reported.
    routing_replay: bool = True
    # rollouts with top-k (and top-p) truncation: pi_theta and pi_old over the truncated set each token was drawn from
    # (DeepSeek-V3.2's "Keep Sampling Mask"); needs rl.rollout.top_k > 0. Off, or without truncation: full softmax.
    mask_replay: bool = True
    micro_batches: int = 1  # the rollout rows in this many sequential parts for the update's gradient and log-probs
    lr: Optional[float] = None  # GRPO's peak learning rate; None: optim.lr (the rest of `optim` applies as is)
    loss: GRPOConfig = GRPOConfig(beta=0.001, group_size=8)  # R1-Zero: beta 0.001, G 16
    reward: RewardConfig = RewardConfig()  # R1-Zero: accuracy 1 + format 0.1
    rollout: SamplingConfig = SamplingConfig(max_new_tokens=32, temperature=1.0)  # R1-Zero: temperature 1
    eval: EvalConfig = EvalConfig()

    def grpo(self) -> GRPOConfig:
        """The loss config, with Dr. GRPO's constant length the rollouts' max_new_tokens unless set."""
        if self.loss.max_completion_length is not None:
            return self.loss
        return dataclasses.replace(self.loss, max_completion_length=self.rollout.max_new_tokens)

    def rollout_sampling(self, eos_ids: tuple[int, ...] = (), pad_id: int = 0) -> SamplingConfig:
        return dataclasses.replace(self.rollout, eos_ids=eos_ids, pad_id=pad_id)

    def eval_sampling(self) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=self.rollout.max_new_tokens, temperature=self.eval.temperature,
                              top_p=self.eval.top_p)

    def validate(self) -> None:
        """Each nested config validated itself when it was built; the run-level fields here."""
        check_types(self, "rl.")
        self.eval.validate()
        positive(self, "rl", ("steps", "prompts_per_step", "micro_batches"))
        if self.mask_replay and self.rollout.top_p < 1 and self.rollout.top_k == 0:
            checker(self, "rl")("mask_replay", "the sampler's truncated sets are stored as top-k ids: set "
                                               "rl.rollout.top_k > 0 with top_p, or rl.mask_replay=false")
        if (self.prompts_per_step * self.loss.group_size) % self.micro_batches:
            checker(self, "rl")("micro_batches", f"must divide the rollout rows, rl.prompts_per_step x "
                                                 f"rl.loss.group_size = {self.prompts_per_step * self.loss.group_size}")
        positive(self, "rl", ("ref_refresh_every", "bias_update_speed"), strict=False)
        if self.lr is not None and not self.lr > 0:
            checker(self, "rl")("lr", "must be positive, or None (= optim.lr)")
        if self.init_step is not None and self.init_step < 0:
            checker(self, "rl")("init_step", "must be >= 0, or None (the newest)")


DISTILL_MODES = ("traces", "logits")
KD_DIRECTIONS = ("forward", "reverse")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Distillation (`deepjax distill`, deepjax/rl/distill.py; docs/distill.md). The student is the run config's model
    (model, data, optim, train, mesh); the teacher is another run directory.

    mode=traces (R1-Distill): the teacher samples distill.k completions of each of distill.prompts train-split
    prompts of data.source (a generated task); a rejection filter keeps the finished, well-formatted, correct,
    language-consistent ones (each check switchable); the kept traces are SFT data for the student.
    mode=logits: the student trains on data.source's batches with kd_alpha x T^2 x KL(teacher_T || student_T) on the
    completion tokens + (1 - kd_alpha) x the hard-label cross-entropy; teacher and student share the tokenizer. With
    distill.on_policy > 0 that share of the steps is on-policy (GKD): the student's own completions of the batch's
    prompts (sampled with distill.on_policy_sampling) replace the batch, and the step's objective is the KD term alone
    on the sampled tokens."""

    teacher: Optional[str] = None  # the teacher's run directory (`deepjax train` / `grpo`); required
    teacher_step: Optional[int] = None  # its checkpoint step; None: the newest
    mode: str = "traces"  # traces | logits
    student_init: Optional[str] = None  # run directory whose checkpoint initializes the student; None: random init
    student_init_step: Optional[int] = None
    # traces
    prompts: int = 0  # train-split prompts the teacher answers; 0: data.num_train
    k: int = 4  # completions sampled per prompt
    sampling: SamplingConfig = SamplingConfig(max_new_tokens=64, temperature=0.6, top_p=0.95)  # as R1's sampling
    batch: int = 64  # rows per generate call
    require_correct: bool = True  # keep only traces whose answer the task's verifier accepts (rewards.accuracy_reward)
    require_format: bool = True  # keep only <think>...</think> <answer>...</answer> traces (rewards.format_reward)
    require_language: bool = True  # keep only traces whose words are all in distill.language
    language: str = "en"  # a key of rewards.LANGUAGES
    max_per_prompt: int = 0  # keep at most this many traces of one prompt (the first ones); 0: all
    # logits
    kd_temperature: float = 2.0  # T: both distributions at temperature T; the KL term is scaled by T^2
    kd_alpha: float = 0.5  # weight of the KL term; 1 - kd_alpha weights the hard-label cross-entropy
    kd_direction: str = "forward"  # forward: KL(teacher || student); reverse: KL(student || teacher)
    # the share of steps (evenly spread) on the student's own samples of the batch's prompts (GKD's lambda); 0: none
    on_policy: float = 0.0
    # how the student samples on those steps (temperature 1: its own distribution); EOS and pad from the tokenizer
    on_policy_sampling: SamplingConfig = SamplingConfig(max_new_tokens=64, temperature=1.0)
    # held-out evaluation of teacher and student at the end (0 problems: none)
    eval_problems: int = 64
    eval_k: int = 4

    def validate(self) -> None:
        check_types(self, "distill.")
        fail = checker(self, "distill")
        if self.mode not in DISTILL_MODES:
            fail("mode", f"unknown; choose from {DISTILL_MODES}")
        if self.kd_direction not in KD_DIRECTIONS:
            fail("kd_direction", f"unknown; choose from {KD_DIRECTIONS}")
        if self.language not in LANGUAGES:
            fail("language", f"unknown; choose from {tuple(LANGUAGES)}")
        positive(self, "distill", ("k", "batch", "kd_temperature", "eval_k"))
        positive(self, "distill", ("prompts", "max_per_prompt", "eval_problems"), strict=False)
        if not 0 <= self.kd_alpha <= 1:
            fail("kd_alpha", "must be in [0, 1]")
        if not 0 <= self.on_policy <= 1:
            fail("on_policy", "must be in [0, 1] (the share of steps on the student's own samples; 0: none)")
        for name in ("teacher_step", "student_init_step"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                fail(name, "must be >= 0, or None (the newest)")

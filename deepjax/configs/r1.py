"""deepjax r1 configs/r1.py  (the built-in default of `deepjax r1`: deepjax/rl/r1.py, docs/r1.md)

DeepSeek-R1's pipeline at CPU scale, each stage its own run directory under runs/r1: the tiny MoE-MLA pretrained to
the earlier `deepjax r1zero` job's weak base (one-digit + and -, half its answers free-form), then 1 cold-start SFT on
96 problems with long, re-checked, tagged chains of thought, 2 reasoning GRPO (accuracy + format + language consistency; Dr.
GRPO's aggregation at lr 1e-4, rollouts at T 0.8, which kept long chains stable in docs/LOG.md's R1-Zero
experiments), 3 rejection sampling from stage 2 (correct, tagged, English samples) plus 64 generated
non-reasoning examples and SFT of the base on them, 4 GRPO again. Each stage is evaluated on 24 held-out problems x
8 samples (temperature 0.6, top-p 0.95).

Measured (docs/r1.md, Results; 7.4 minutes on a loaded 2-core machine): held-out pass@1 27.6% for the base, 61.5%
after the cold start (98% of samples checkable, 99% re-checking), then 53.6% / 49.0% / 46.4% after reasoning RL,
rejection SFT and the last RL stage: at this RL budget the RL stages do not add to the cold start.
"""

from deepjax.rl.r1 import R1Config, default_config


def get_config():
    return default_config()


def get_r1_config():
    return R1Config()

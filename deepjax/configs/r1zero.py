"""deepjax r1zero configs/r1zero.py  (the built-in default of `deepjax r1zero`: deepjax/rl/r1zero.py)

The R1-Zero story at CPU scale: the tiny MoE-MLA pretrained to a weak base on one-digit arithmetic, then GRPO with
rule-based rewards only. See deepjax/rl/r1zero.py for the stages and docs/LOG.md for the measured before/after.
"""

from deepjax.rl.r1zero import default_config


def get_config():
    return default_config()

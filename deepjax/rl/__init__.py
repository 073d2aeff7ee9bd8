"""RL for R1: rewards as pure functions (`rewards`), the GRPO loss (`loss`), the jitted policy update (`update`),
the GRPO loop (`loop`), R1's evaluation metrics (`metrics`) and `deepjax eval` (`evaluate`), the R1-Zero job
(`r1zero`)."""

"""The training loop behind `deepjax train`: data, sharded state, the jitted step, checkpoints, logs, plots.

    deepjax train configs/tiny.py --workdir runs/tiny [--config.train.steps=400 ...]

What a run directory holds:

    config.json           the resolved config (every field, after overrides)
    checkpoints/<step>/   Orbax checkpoints (deepjax/train/checkpoint.py): state, Grain iterator state, config
    metrics.jsonl         one JSON line per step: loss, mtp_loss, balance_loss, grad_norm, lr, applied, maxvio
                          (per MoE layer), tokens_per_s, mfu, and `data` (a hash of the step's batch)
    tb/                   TensorBoard event files (tensorboardX: no TensorFlow needed), every train.log_every steps
    train_curves.png      loss, MTP loss, MaxVio and learning rate against the step, written at the end

The work directory may be a gs:// URI (docs/storage.md). Restarting with the same work directory resumes from the
newest checkpoint: the same state, the same RNG stream and the same next batch, so a run interrupted at any point
and resumed ends bitwise equal to one that never stopped (tests/test_train.py kills a run with SIGKILL to check
this). The model part of the config must match the checkpoint's; the rest (steps, logging, ...) may change between
restarts.
"""

from __future__ import annotations

import os
import time
from typing import Optional

import jax
import numpy as np
from matplotlib.figure import Figure

from deepjax import model as M
from deepjax import paths
from deepjax.config import Config
from deepjax.parallel import distributed as D
from deepjax.train import step as TS
from deepjax.train.run import KILL_ENV, Run, check_streak, kill_if_asked, running, scalars

# Dense bf16 peak TFLOP/s per device, for MFU when train.peak_tflops is not set (substring of device_kind).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "v6": 918.0, "v5p": 459.0, "v5 lite": 197.0,
               "v5e": 197.0, "v4": 275.0}

def peak_tflops(cfg: Config) -> Optional[float]:
    if cfg.train.peak_tflops:
        return cfg.train.peak_tflops
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_TFLOPS.items() if k.lower() in kind.lower()), None)



class TrainRun(Run):
    """A training run: the run directory (`Run`), the packed-batch iterator and the jitted train step."""

    def __init__(self, cfg: Config, workdir: str):
        from deepjax.data import pipeline  # lazy on purpose: grain, absent where only models run (the GPU machine)

        super().__init__(cfg, workdir)
        self.fingerprint = pipeline.fingerprint
        rows = D.process_rows(cfg.data.global_batch, self.mesh, self.rules)
        self.local_batch = rows.stop - rows.start
        self.iterator = pipeline.make_iterator(cfg.data, self.tokenizer, self.sources[cfg.data.split],
                                               self.local_batch, jax.process_index(), jax.process_count(),
                                               self.data_state)
        t = cfg.train
        with self.on_mesh():
            step_fn = TS.make_train_step(self.graphdef, cfg.model, self.optimizer, self.schedule,
                                         micro_batches=cfg.optim.micro_batches, mtp_lambda=t.mtp_lambda,
                                         balance_alpha=t.balance_alpha, bias_update_speed=t.bias_update_speed)
        self._step = self.jit_update(step_fn)
        n_active = M.count_active_params(cfg.model, self.abstract_params)
        self.flops_per_token = TS.matmul_flops_per_token(cfg.model, cfg.data.seq_len, n_active)
        self.peak = peak_tflops(cfg)

    def next_batch(self) -> tuple[TS.Batch, str]:
        local = next(self.iterator)
        arrays = {k: D.global_batch(np.asarray(v, np.int32), self.cfg.data.global_batch, self.mesh, self.rules)
                  for k, v in local.items()}
        return TS.Batch(**arrays), self.fingerprint(local)

    def step(self, batch: TS.Batch):
        with self.on_mesh():
            self.state, metrics = self._step(self.state, batch)
        return metrics


def plot_curves(history: dict[int, dict], path) -> None:
    steps = sorted(history)
    if not steps:
        return
    get = lambda k: np.array([history[s].get(k, np.nan) for s in steps], dtype=float)  # noqa: E731
    vio = [history[s].get("maxvio") or [np.nan] for s in steps]
    fig = Figure(figsize=(15, 4))
    ax = fig.subplots(1, 3)
    ax[0].plot(steps, get("loss"), label="next-token CE")
    if np.nanmax(np.abs(get("mtp_loss"))) > 0:
        ax[0].plot(steps, get("mtp_loss"), label="MTP loss (x lambda)")
    ax[0].set_xlabel("step"), ax[0].set_ylabel("loss"), ax[0].legend(), ax[0].set_title("loss")
    ax[1].plot(steps, [float(np.mean(v)) for v in vio], label="mean over MoE layers")
    ax[1].plot(steps, [float(np.max(v)) for v in vio], label="worst layer")
    ax[1].set_xlabel("step"), ax[1].set_ylabel("MaxVio"), ax[1].legend(), ax[1].set_title("expert load MaxVio")
    ax[2].plot(steps, get("lr"))
    ax[2].set_xlabel("step"), ax[2].set_title("learning rate")
    fig.tight_layout()
    paths.save_figure(fig, path, dpi=100)


def train(cfg: Config, workdir, progress: bool = True) -> dict:
    """Runs (or resumes) training to `cfg.train.steps`; returns a summary of the last logged metrics."""
    run = TrainRun(cfg, workdir)
    t = cfg.train
    start = int(jax.device_get(run.state.step))
    streak = int(jax.device_get(run.state.nonfinite_streak))
    if run.resumed_from is not None and run.is_main:
        print(f"resumed from {run.checkpointer.step_dir(run.resumed_from)} (step {start})", flush=True)
    kill_after = int(os.environ.get(KILL_ENV, "-1"))
    tokens_per_step = cfg.data.global_batch * cfg.data.seq_len
    n_dev = jax.device_count()
    last = {}
    with running(run, t.steps, start, "train", progress) as log:
        pending = None  # (step, metrics on device, data hash): fetched one step late, so the host
        t_prev = time.perf_counter()  # prepares batch s+1 while the device runs step s

        def finish(p):
            nonlocal streak, last, t_prev
            s, m, data_hash = p
            rec = scalars(jax.device_get(m))
            now = time.perf_counter()
            dt, t_prev = now - t_prev, now
            rec.update(step=s + 1, data=data_hash, step_time_s=dt, tokens_per_s=tokens_per_step / dt)
            if run.peak:
                rec["mfu"] = run.flops_per_token * tokens_per_step / dt / (run.peak * 1e12 * n_dev)
            streak = 0 if rec["applied"] else streak + 1
            log.step(rec, s + 1, "train", loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}",
                     maxvio=f"{float(np.mean(rec['maxvio'])):.2f}")
            last = rec
            check_streak(streak, s + 1, t.max_nonfinite, run.checkpointer)

        for s in range(start, t.steps):
            batch, data_hash = run.next_batch()
            metrics = run.step(batch)
            if pending is not None:
                finish(pending)
            pending = (s, metrics, data_hash)
            done = s + 1
            if done % t.checkpoint_every == 0 or done == t.steps:
                finish(pending)  # a step's checkpoint follows its metrics (and its non-finite check)
                pending = None
                run.save(done, run.iterator.get_state(), force=done == t.steps)
            if done == kill_after:
                if pending is not None:
                    finish(pending)
                    pending = None
                kill_if_asked(done, run.checkpointer)
        if pending is not None:
            finish(pending)
    if run.is_main and t.plot:
        plot_curves(log.history(), run.workdir / "train_curves.png")
    return last


__all__ = ["train", "TrainRun", "plot_curves", "peak_tflops", "PEAK_TFLOPS"]

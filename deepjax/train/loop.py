"""The training loop behind `deepjax train`: data, sharded state, the jitted step, checkpoints, logs, plots.

    deepjax train configs/tiny.py --workdir runs/tiny [--config.train.steps=400 ...]

What a run directory holds:

    config.json           the resolved config (every field, after overrides)
    checkpoints/<step>/   Orbax checkpoints (deepjax/train/checkpoint.py): state, Grain iterator state, config
    metrics.jsonl         one JSON line per step: loss, mtp_loss, balance_loss, grad_norm, lr, applied, maxvio
                          (per MoE layer), tokens_per_s, mfu, and `data` (a hash of the step's batch)
    tb/                   TensorBoard event files (tensorboardX: no TensorFlow needed), every train.log_every steps
    train_curves.png      loss, MTP loss, MaxVio and learning rate against the step, written at the end

Restarting with the same work directory resumes from the newest checkpoint: the same state, the same RNG stream
and the same next batch, so a run interrupted at any point and resumed ends bitwise equal to one that never
stopped (tests/test_train.py kills a run with SIGKILL to check this). The model part of the config must match the
checkpoint's; the rest (steps, logging, ...) may change between restarts.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Optional

import jax
import numpy as np

from deepjax.parallel import distributed as D
from deepjax import model as M
from deepjax.train import optim
from deepjax.parallel import sharding as S
from deepjax.train import step as TS
from deepjax.config import Config, to_dict
from deepjax.schema import ConfigError

# Dense bf16 peak TFLOP/s per device, for MFU when train.peak_tflops is not set (substring of device_kind).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "v6": 918.0, "v5p": 459.0, "v5 lite": 197.0,
               "v5e": 197.0, "v4": 275.0}

# Test hook: SIGKILL this process right after this step (once every checkpoint started so far is committed), to
# check that a killed run resumes exactly. Not a clean stop: nothing is flushed or closed.
KILL_ENV = "DEEPJAX_TEST_SIGKILL_AFTER_STEP"


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row; the message names the step."""


def peak_tflops(cfg: Config) -> Optional[float]:
    if cfg.train.peak_tflops:
        return cfg.train.peak_tflops
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_TFLOPS.items() if k.lower() in kind.lower()), None)


def check_vocab(cfg: Config, tokenizer) -> None:
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size}: smaller than the tokenizer's vocabulary "
                          f"({tokenizer.vocab_size} ids, data.tokenizer={cfg.data.tokenizer!r})")


def check_same_model(saved: dict, cfg: Config, where: str) -> None:
    now = to_dict(cfg)["model"]
    old = saved.get("model", {})
    diff = [k for k in sorted(set(now) | set(old)) if now.get(k) != old.get(k)]
    if diff:
        k = diff[0]
        raise ConfigError(f"model.{k}={now.get(k)!r} but the checkpoint in {where} was trained with "
                          f"model.{k}={old.get(k)!r} ({len(diff)} model field(s) differ: {diff}); use a new --workdir")


def abstract_train_state(cfg: Config, mesh, rules, total_steps: Optional[int] = None):
    """(graphdef, abstract params, optimizer, lr schedule, state shardings, abstract TrainState with shardings):
    what restoring a checkpoint of `cfg` onto `mesh` needs, with nothing allocated. The schedule spans
    `total_steps` optimizer updates (default train.steps); the state's structure does not depend on it."""
    graphdef, abstract_params = M.abstract_init(cfg.model)
    optimizer, schedule = optim.make_optimizer(cfg.optim, TS.split_params(abstract_params)[0],
                                               total_steps or cfg.train.steps)
    state = jax.eval_shape(lambda p: TS.init_state(p, optimizer, cfg.seed), abstract_params)
    shardings = TS.state_shardings(state, mesh, rules)
    return graphdef, abstract_params, optimizer, schedule, shardings, S.abstract_with_shardings(state, shardings)


def build_sources(cfg: Config, workdir: str) -> dict:
    """{split: TFDS data source} of cfg.data, built under data.data_dir (default <workdir>/tfds) on first use:
    process 0 builds while the others wait, then every process reads."""
    from deepjax.data import datasets

    data_dir = cfg.data.data_dir or os.path.join(workdir, "tfds")
    multi = jax.process_count() > 1
    if multi:
        from jax.experimental import multihost_utils
    if multi and jax.process_index() != 0:
        multihost_utils.sync_global_devices("deepjax: dataset built")
    sources = datasets.build(cfg.data, data_dir)
    if multi and jax.process_index() == 0:
        multihost_utils.sync_global_devices("deepjax: dataset built")
    if cfg.data.split not in sources:
        raise ConfigError(f"data.split={cfg.data.split!r}: the dataset has splits {sorted(sources)}")
    return sources


class MetricsLog:
    """metrics.jsonl (one line per step, flushed) and TensorBoard events (tensorboardX) of a run, on process 0."""

    def __init__(self, workdir: str, log_every: int, enabled: bool = True):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.log_every = log_every
        self.file = self.writer = None
        if enabled:
            from tensorboardX import SummaryWriter
            self.file = open(self.path, "a")
            self.writer = SummaryWriter(os.path.join(workdir, "tb"))

    def write(self, rec: dict, step: int, last: bool = False, prefix: str = "train") -> None:
        if self.file:
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()
        if self.writer and (step % self.log_every == 0 or last):
            self.scalars(rec, step, prefix)

    def scalars(self, rec: dict, step: int, prefix: str) -> None:
        if not self.writer:
            return
        for k, v in rec.items():
            if isinstance(v, (int, float)) and k != "step":
                self.writer.add_scalar(f"{prefix}/{k}", v, step)
            elif isinstance(v, list) and k.startswith("maxvio"):
                for i, x in enumerate(v):
                    self.writer.add_scalar(f"{k}/layer_{i}", x, step)
        self.writer.flush()

    def history(self) -> dict[int, dict]:
        return read_history(self.path)

    def close(self) -> None:
        if self.writer:
            self.writer.close()
        if self.file:
            self.file.close()


class Run:
    """Everything a training run holds: mesh, data iterator, jitted step, checkpointer and the current state."""

    def __init__(self, cfg: Config, workdir: str):
        # The data stack (grain, tfds, tokenizers) is imported here, not at module level: the model, sampling and RL
        # code must import on machines without it.
        from deepjax.data import pipeline
        from deepjax.train.checkpoint import Checkpointer
        from deepjax.data.tokenizer import load_tokenizer

        self.cfg, self.workdir = cfg, os.path.abspath(workdir)
        D.initialize()
        self.is_main = jax.process_index() == 0
        os.makedirs(self.workdir, exist_ok=True)

        # ---- mesh, tokenizer, data
        self.mesh = S.make_mesh(cfg.mesh)
        self.rules = S.rules_for(cfg.mesh.rules)
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        check_vocab(cfg, self.tokenizer)
        sources = build_sources(cfg, self.workdir)
        G = cfg.data.global_batch
        rows = D.process_rows(G, self.mesh, self.rules)
        self.local_batch = rows.stop - rows.start
        self._make_iterator = lambda state=None: pipeline.make_iterator(
            cfg.data, self.tokenizer, sources[cfg.data.split], self.local_batch, jax.process_index(),
            jax.process_count(), state)
        self.fingerprint = pipeline.fingerprint

        # ---- state: abstract first, so a resumed run never allocates a fresh init it would throw away
        (graphdef, abstract_params, self.optimizer, self.schedule, self.state_shardings,
         self.abstract_state) = abstract_train_state(cfg, self.mesh, self.rules)
        self.graphdef = graphdef
        self.batch_sharding = S.batch_spec(self.mesh, self.rules)

        self.checkpointer = Checkpointer(os.path.join(self.workdir, "checkpoints"), keep=cfg.train.keep_checkpoints,
                                         async_save=cfg.train.async_checkpoint)
        self.resumed_from = self.checkpointer.latest_step()
        if self.resumed_from is None:
            _, params, _ = M.init_sharded(cfg.model, jax.random.key(cfg.seed), self.mesh, self.rules)
            self.state = jax.jit(lambda p: TS.init_state(p, self.optimizer, cfg.seed),
                                 out_shardings=self.state_shardings)(params)
            del params
            self.iterator = self._make_iterator()
        else:
            try:
                step, state, data_state, saved_cfg = self.checkpointer.restore(
                    self.abstract_state, fallback=cfg.train.fallback_on_damage)
                check_same_model(saved_cfg, cfg, self.checkpointer.step_dir(step))
            except Exception:
                self.checkpointer.close()  # no Orbax threads left behind to fail at exit
                raise
            self.resumed_from = step
            self.state = state
            self.iterator = self._make_iterator(data_state)
        if self.is_main:
            with open(os.path.join(self.workdir, "config.json"), "w") as f:
                json.dump(to_dict(cfg), f, indent=1)

        # ---- the step
        t = cfg.train
        with S.use_mesh(self.mesh, self.rules):
            step_fn = TS.make_train_step(graphdef, cfg.model, self.optimizer, self.schedule,
                                         micro_batches=cfg.optim.micro_batches, mtp_lambda=t.mtp_lambda,
                                         balance_alpha=t.balance_alpha, bias_update_speed=t.bias_update_speed)
            self._step = jax.jit(step_fn, donate_argnums=0, out_shardings=(self.state_shardings, None))
        n_active = M.count_active_params(cfg.model, abstract_params)
        self.flops_per_token = TS.matmul_flops_per_token(cfg.model, cfg.data.seq_len, n_active)
        self.peak = peak_tflops(cfg)

    # ---------------------------------------------------------------------------------------------------- stepping
    def next_batch(self) -> tuple[TS.Batch, str]:
        local = next(self.iterator)
        arrays = {k: D.global_batch(np.asarray(v, np.int32), self.cfg.data.global_batch, self.mesh, self.rules)
                  for k, v in local.items()}
        return TS.Batch(**arrays), self.fingerprint(local)

    def step(self, batch: TS.Batch):
        with S.use_mesh(self.mesh, self.rules):
            self.state, metrics = self._step(self.state, batch)
        return metrics

    def save(self, step: int, force: bool = False) -> bool:
        return self.checkpointer.save(step, self.state, self.iterator.get_state(), to_dict(self.cfg), force=force)


def scalars(m: dict) -> dict:
    out = {}
    for k, v in m.items():
        v = np.asarray(v)
        out[k] = v.item() if v.ndim == 0 else v.tolist()
    return out


def read_jsonl(path: str) -> list[dict]:
    """The records of a JSON-lines log (none if it does not exist), skipping a last line cut by a kill."""
    out = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return out


def read_history(path: str) -> dict[int, dict]:
    """step -> record from metrics.jsonl (a step redone after a resume keeps its last record)."""
    return {r["step"]: r for r in read_jsonl(path)}


def check_streak(streak: int, step: int, max_nonfinite: int, checkpointer) -> None:
    """Raises NonFiniteError once `streak` non-finite steps in a row reach train.max_nonfinite."""
    if streak >= max_nonfinite:
        raise NonFiniteError(
            f"step {step}: the loss or gradient was not finite for {streak} steps in a row "
            f"(train.max_nonfinite={max_nonfinite}); those steps were not applied. Last good checkpoint: "
            f"{checkpointer.latest_step()}. Lower optim.lr or check the data.")


def kill_if_asked(step: int, checkpointer) -> None:
    """The KILL_ENV test hook: after `step`, wait for the checkpoints started so far, then SIGKILL this process."""
    if step == int(os.environ.get(KILL_ENV, "-1")):
        checkpointer.wait()  # metrics.jsonl is flushed line by line
        os.kill(os.getpid(), signal.SIGKILL)


def plot_curves(history: dict[int, dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(history)
    if not steps:
        return
    get = lambda k: np.array([history[s].get(k, np.nan) for s in steps], dtype=float)  # noqa: E731
    vio = [history[s].get("maxvio") or [np.nan] for s in steps]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
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
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(cfg: Config, workdir: str, progress: bool = True) -> dict:
    """Runs (or resumes) training to `cfg.train.steps`; returns a summary of the last logged metrics."""
    from tqdm import tqdm

    run = Run(cfg, workdir)
    t = cfg.train
    start = int(jax.device_get(run.state.step))
    streak = int(jax.device_get(run.state.nonfinite_streak))
    if run.resumed_from is not None and run.is_main:
        print(f"resumed from {run.checkpointer.step_dir(run.resumed_from)} (step {start})", flush=True)
    log = MetricsLog(run.workdir, t.log_every, enabled=run.is_main)
    kill_after = int(os.environ.get(KILL_ENV, "-1"))
    tokens_per_step = cfg.data.global_batch * cfg.data.seq_len
    n_dev = jax.device_count()
    bar = tqdm(total=t.steps, initial=start, disable=not (progress and run.is_main), dynamic_ncols=True,
               desc="train", unit="step")
    last = {}
    try:
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
            log.write(rec, s + 1, last=s + 1 == t.steps)
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}",
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
                run.save(done, force=done == t.steps)
            if done == kill_after:
                if pending is not None:
                    finish(pending)
                    pending = None
                kill_if_asked(done, run.checkpointer)
        if pending is not None:
            finish(pending)
    finally:
        bar.close()
        run.checkpointer.close()
        log.close()
    if run.is_main and t.plot:
        plot_curves(log.history(), os.path.join(run.workdir, "train_curves.png"))
    return last


__all__ = ["train", "Run", "read_jsonl", "read_history", "check_same_model", "check_vocab", "scalars", "abstract_train_state", "build_sources", "MetricsLog", "NonFiniteError", "check_streak",
           "kill_if_asked", "plot_curves", "peak_tflops", "KILL_ENV"]

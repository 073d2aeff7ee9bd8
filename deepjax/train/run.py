"""The run directory every job shares (`deepjax train`, `deepjax grpo`, `deepjax eval`), written once.

`Run` builds what a run holds: the mesh and rules, the tokenizer, the data sources, the abstract train state
(nothing allocated), the Orbax checkpointer, then restores the newest checkpoint or initializes, and writes
config.json. `Run.jit_update` jits a `(TrainState, batch) -> (TrainState, metrics)` update under the mesh with the
state's shardings, donated. `Progress` is the loops' shared logging: a tqdm bar, metrics.jsonl, TensorBoard.
`load_params` reads a run directory's parameters back (eval, GRPO's initial policy).

What a run directory holds:

    config.json           the resolved config (every field, after overrides)
    checkpoints/<step>/   Orbax checkpoints (deepjax/train/checkpoint.py): state, data iterator state, config, extras
    damaged/<step>/       steps found damaged and moved aside by train.fallback_on_damage (never read again)
    metrics.jsonl         one JSON line per step (the loop's metrics); a resumed run drops the lines past its step
    tb/                   TensorBoard event files (tensorboardX: no TensorFlow needed), one file per launch

A run directory is a local path or a gs:// URI (deepjax/paths.py, docs/storage.md): every file goes through
`etils.epath`, the checkpoints through Orbax.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import signal
from typing import Callable, Optional

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from deepjax.held_jit import held_jit
from deepjax import model as M
from deepjax import paths
from deepjax.config import Config, from_dict, to_dict
from deepjax.data.tokenizer import load_tokenizer
from deepjax.parallel import distributed as D
from deepjax.parallel import sharding as S
from deepjax.schema import ConfigError
from deepjax.train import optim
from deepjax.train import step as TS
from deepjax.train.checkpoint import Checkpointer

# Test hook: SIGKILL this process right after this step (once every checkpoint started so far is committed), to
# check that a killed run resumes exactly. Not a clean stop: nothing is flushed or closed.
KILL_ENV = "DEEPJAX_TEST_SIGKILL_AFTER_STEP"


from deepjax.errors import NonFiniteError  # noqa: E402,F401  (re-exported)


def check_vocab(cfg: Config, tokenizer) -> None:
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size}: smaller than the tokenizer's vocabulary "
                          f"({tokenizer.vocab_size} ids, data.tokenizer={cfg.data.tokenizer!r})")


# Model fields that say how the step runs, not what it computes (the same parameters, the same math): a run may
# resume or start from a checkpoint with another value.
EXECUTION_ONLY_FIELDS = ("layer_loop", "attention")


def check_same_model(saved: dict, cfg: Config, where: str) -> None:
    """The checkpoint's model is this config's model. A field the saved config lacks (written before the field
    existed) counts as its default."""
    now = to_dict(cfg)["model"]
    default = to_dict(Config())["model"]
    old = {**default, **saved.get("model", {})}
    diff = [k for k in sorted(set(now) | set(old)) if now.get(k) != old.get(k) and k not in EXECUTION_ONLY_FIELDS]
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


def default_data_dir(workdir) -> str:
    """data.data_dir when unset: <workdir>/tfds for a local run directory; for a remote one a directory on this
    machine's disk (`paths.local_cache("tfds")`): TFDS's ArrayRecord files are written and read with local file
    I/O only. Dataset directories are named by their content (deepjax/data/datasets.py), so runs share it safely."""
    if paths.is_remote(workdir):
        return paths.local_cache("tfds")
    return os.path.join(os.fspath(workdir), "tfds")


def check_data_dir(data_dir: Optional[str]) -> None:
    if data_dir is not None and paths.is_remote(data_dir):
        raise paths.StorageError(
            f"data.data_dir={data_dir}: TFDS's ArrayRecord files are written and read with local file I/O only "
            f"(array_record has no {paths.scheme(data_dir)}:// support); use a local or mounted (e.g. gcsfuse) "
            f"directory, or leave it unset (a gs:// --workdir then builds the data under {paths.local_cache('tfds')})")


def build_sources(cfg: Config, workdir) -> dict:
    """{split: TFDS data source} of cfg.data, built under data.data_dir (default `default_data_dir(workdir)`) on
    first use: process 0 builds while the others wait, then every process reads (and builds its own copy first
    where the directory is not shared: a local cache under a remote run directory on several hosts)."""
    from deepjax.data import datasets  # lazy on purpose: tensorflow-datasets, absent where only models run

    check_data_dir(cfg.data.data_dir)
    data_dir = cfg.data.data_dir or default_data_dir(workdir)
    multi = jax.process_count() > 1
    if multi and jax.process_index() != 0:
        multihost_utils.sync_global_devices("deepjax: dataset built")
    sources = datasets.build(cfg.data, data_dir)
    if multi and jax.process_index() == 0:
        multihost_utils.sync_global_devices("deepjax: dataset built")
    if cfg.data.split not in sources:
        raise ConfigError(f"data.split={cfg.data.split!r}: the dataset has splits {sorted(sources)}")
    return sources


_WRITERS = itertools.count()


class MetricsLog:
    """metrics.jsonl (one line per step, flushed) and TensorBoard events (tensorboardX) of a run, on process 0.

    `resume_step`: the step the run continues from (0 for a fresh start). The lines of metrics.jsonl past it (a run
    that went further before it was killed, or whose newer checkpoints were damaged) are dropped, so every step
    appears once; TensorBoard gets a new event file whose start marker (tensorboardX `purge_step`) tells
    TensorBoard to hide the older files' events from that step on (they stay on disk).

    In a remote run directory (gs://) both are written through `paths.AppendLog` / `paths.TensorBoardMirror`:
    rewritten at most every paths.REMOTE_SYNC_S seconds, at every `sync` (each checkpoint save) and on close."""

    def __init__(self, workdir, log_every: int, enabled: bool = True, resume_step: Optional[int] = None):
        workdir = paths.run_path(workdir)
        self.path = workdir / "metrics.jsonl"
        self.log_every = log_every
        self.file = self.writer = self.tb = None
        if enabled:
            if resume_step is not None:
                truncate_jsonl(self.path, resume_step)
            self.file = paths.AppendLog(self.path)
            tb = workdir / "tb"
            purge = resume_step + 1 if resume_step is not None and tb.is_dir() else None
            self.tb = paths.TensorBoardMirror(tb)
            # tensorboardX imports torch when it is installed (~2 s of every `deepjax` process, `info` included)
            from tensorboardX import SummaryWriter  # lazy on purpose: only a run that writes metrics needs it
            # a name of its own: tensorboardX names files by the second and opens them with "wb"
            self.writer = SummaryWriter(self.tb.local_dir, purge_step=purge,
                                        filename_suffix=f".{os.getpid()}.{next(_WRITERS)}")

    def write(self, rec: dict, step: int, last: bool = False, prefix: str = "train") -> None:
        if self.file:
            self.file.write(json.dumps(rec) + "\n")
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
        self.tb.sync(force=False)

    def sync(self) -> None:
        """Everything written so far made durable in the run directory (a no-op locally: lines are flushed)."""
        if self.file:
            self.file.sync()
        if self.writer:
            self.writer.flush()
            self.tb.sync()

    def history(self) -> dict[int, dict]:
        return read_history(self.path)

    def close(self) -> None:
        try:
            if self.writer:
                self.writer.close()
                self.tb.close()
        finally:
            if self.file:
                self.file.close()


class Run:
    """Mesh, tokenizer, data sources, train state (restored or initialized), checkpointer of one run directory.

    optim_cfg / total_steps: the optimizer's config and the schedule's length (default cfg.optim, train.steps).
    extra_items: names of parameter trees saved beside the state (GRPO's reference policy), restored into `extras`.
    init_params: () -> params (router biases included) for a fresh run; default a sharded random init."""

    def __init__(self, cfg: Config, workdir, optim_cfg=None, total_steps: Optional[int] = None,
                 extra_items: tuple[str, ...] = (), init_params: Optional[Callable] = None):
        self.cfg, self.workdir = cfg, paths.run_path(workdir)  # an epath.Path: local (absolute) or gs://
        check_data_dir(cfg.data.data_dir)
        self.logs: list = []  # the MetricsLogs open on this run (`Progress`): synced before each checkpoint
        D.initialize()
        self.is_main = jax.process_index() == 0
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.mesh, self.rules = S.make_mesh(cfg.mesh), S.rules_for(cfg.mesh.rules)
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        check_vocab(cfg, self.tokenizer)
        # abstract first, so a resumed run never allocates a fresh init it would throw away; and before the data, so a
        # mesh that cannot split the parameters is refused before any dataset is built
        opt_run = cfg if optim_cfg is None else dataclasses.replace(cfg, optim=optim_cfg)
        (self.graphdef, self.abstract_params, self.optimizer, self.schedule, self.state_shardings,
         self.abstract_state) = abstract_train_state(opt_run, self.mesh, self.rules, total_steps)
        self.sources = build_sources(cfg, self.workdir)
        self.checkpointer = Checkpointer(self.workdir / "checkpoints", keep=cfg.train.keep_checkpoints,
                                         async_save=cfg.train.async_checkpoint, extra_items=extra_items)
        self.resumed_from = self.checkpointer.latest_step()
        self.extras: dict = {}
        self.data_state = None
        if self.resumed_from is None:
            if init_params is None:
                params = M.init_sharded(cfg.model, jax.random.key(cfg.seed), self.mesh, self.rules)[1]
            else:
                params = init_params()
            self.state = jax.jit(lambda p: TS.init_state(p, self.optimizer, cfg.seed),
                                 out_shardings=self.state_shardings)(params)
            del params
        else:
            want = {k: nnx.merge_state(self.abstract_state.params, self.abstract_state.router_bias)
                    for k in extra_items}
            try:
                step, self.state, self.data_state, saved_cfg, self.extras = self.checkpointer.restore(
                    self.abstract_state, fallback=cfg.train.fallback_on_damage, extra=want)
                check_same_model(saved_cfg, cfg, self.checkpointer.step_dir(step))
            except Exception:
                self.checkpointer.close()  # no Orbax threads left behind to fail at exit
                raise
            self.resumed_from = step
        if self.is_main:
            paths.write_text_atomic(self.workdir / "config.json", json.dumps(to_dict(cfg), indent=1))

    def on_mesh(self):
        """The `sharding.use_mesh` context of this run (MoE dispatch, activation constraints)."""
        return S.use_mesh(self.mesh, self.rules)

    def jit_update(self, fn, compiler_options: Optional[dict] = None):
        """`fn(state, batch) -> (state, metrics)` jitted under the mesh: the state donated, kept in its shardings;
        compiler_options: XLA's, for this program (None: the defaults)."""
        with self.on_mesh():
            return held_jit(fn, donate_argnums=0, out_shardings=(self.state_shardings, None),
                            compiler_options=compiler_options)

    def to_global(self, x: np.ndarray) -> jax.Array:
        """A [rows, ...] host array (the same on every process) as a global array split over the batch axes."""
        return D.from_host(x, self.mesh, self.rules)

    def policy_params(self):
        """The state's params with the router biases: what forward / generate take."""
        return nnx.merge_state(self.state.params, self.state.router_bias)

    def save(self, step: int, data_state, force: bool = False, extra: Optional[dict] = None) -> bool:
        for log in self.logs:  # a checkpoint never gets ahead of the logs (remote ones are rewritten, not appended)
            log.sync()
        return self.checkpointer.save(step, self.state, data_state, to_dict(self.cfg), force=force, extra=extra)


class Progress:
    """A loop's logging on process 0: a tqdm bar, metrics.jsonl and TensorBoard (`MetricsLog`)."""

    def __init__(self, run: Run, total: int, start: int, desc: str, progress: bool = True):
        self.log = MetricsLog(run.workdir, run.cfg.train.log_every, enabled=run.is_main, resume_step=start)
        self.run = run
        run.logs.append(self.log)
        self.bar = tqdm(total=total, initial=start, disable=not (progress and run.is_main), dynamic_ncols=True,
                        desc=desc, unit="step")
        self.total = total

    def step(self, rec: dict, step: int, prefix: str, **postfix) -> None:
        self.log.write(rec, step, last=step == self.total, prefix=prefix)
        self.bar.update(1)
        self.bar.set_postfix(**postfix)

    def history(self) -> dict[int, dict]:
        """step -> record of this run's metrics.jsonl (readable after `close`)."""
        return self.log.history()

    def scalars(self, rec: dict, step: int, prefix: str) -> None:
        """TensorBoard scalars outside the per-step record (GRPO's periodic evaluations)."""
        self.log.scalars(rec, step, prefix)

    def close(self) -> None:
        self.bar.close()
        if self.log in self.run.logs:
            self.run.logs.remove(self.log)
        self.log.close()


@contextlib.contextmanager
def running(run: Run, total: int, start: int, desc: str, progress: bool = True):
    """`Progress` for a loop over steps start..total; on the way out (also on errors) the bar, the logs and the
    checkpointer (waiting for its last writes) are closed."""
    p = Progress(run, total, start, desc, progress)
    try:
        yield p
    finally:
        p.close()
        run.checkpointer.close()


def load_params(workdir: str, step: Optional[int] = None, mesh=None, rules=None):
    """(config, step, graphdef, params (router biases included), mesh, rules) of a `deepjax train` or `grpo` run,
    placed on the run's own mesh, or on `mesh` / `rules` when given."""
    workdir = paths.run_path(workdir, "run directory")
    path = workdir / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: not a deepjax run directory (no config.json)")
    cfg = from_dict(json.loads(path.read_text()))
    if mesh is None:
        mesh, rules = S.make_mesh(cfg.mesh), S.rules_for(cfg.mesh.rules)
    graphdef, *_, abstract = abstract_train_state(cfg, mesh, rules)
    ck = Checkpointer(workdir / "checkpoints")
    try:
        step, state, _, _ = ck.restore(abstract, step=step)
    finally:
        ck.close()
    return cfg, step, graphdef, nnx.merge_state(state.params, state.router_bias), mesh, rules


def scalars(m: dict) -> dict:
    out = {}
    for k, v in m.items():
        v = np.asarray(v)
        out[k] = v.item() if v.ndim == 0 else v.tolist()
    return out


def read_jsonl(path) -> list[dict]:
    """The records of a JSON-lines log (local or remote; none if it does not exist), skipping a last line cut by a
    kill."""
    out = []
    path = paths.Path(path)
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def truncate_jsonl(path, step: int, write: bool = True) -> list[dict]:
    """The records of a JSON-lines log with "step" <= `step`; with `write`, the file is rewritten to hold only those
    (atomically: a kill leaves the old file or the new one). What a resumed run keeps of metrics.jsonl / eval.jsonl."""
    path = paths.Path(path)
    recs = read_jsonl(path)
    keep = [r for r in recs if isinstance(r, dict) and isinstance(r.get("step"), int) and r["step"] <= step]
    if write and path.exists() and (len(keep) != len(recs) or _cut_tail(path)):
        paths.write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in keep))
    return keep


def _cut_tail(path) -> bool:
    """Whether a file ends without a newline (its last line cut by a kill)."""
    with paths.Path(path).open("rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def read_history(path) -> dict[int, dict]:
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


__all__ = ["Run", "Progress", "running", "load_params", "MetricsLog", "NonFiniteError", "KILL_ENV", "check_vocab",
           "check_same_model", "abstract_train_state", "build_sources", "default_data_dir", "check_data_dir",
           "scalars", "read_jsonl", "read_history",
           "truncate_jsonl",
           "check_streak", "kill_if_asked"]

"""Checkpoints: Orbax `CheckpointManager`, asynchronous, one directory per step.

A step directory holds three Orbax items:

    state    step.TrainState: params, optimizer state, step, router biases, RNG, non-finite counters
    data     the Grain iterator state (JSON), so the data order continues exactly
    config   the resolved run config (JSON)

and, once Orbax has committed the step, `deepjax_manifest.json`: the size of every file in it.

Guarantees:
- A checkpoint interrupted mid-write is never picked up: Orbax writes into a temporary directory and
  renames it only when every host has finished (`all_steps()` never lists a temporary one).
- A non-finite state is never saved (`save` raises instead).
- A damaged checkpoint (a file missing, truncated or unreadable) raises `CheckpointError` naming the step
  and the file; with `fallback=True` the restore walks back to the newest step that loads, and says so.
- Restoring onto a different mesh works: the target's shardings come from the abstract state passed in,
  and Orbax reshards.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

MANIFEST = "deepjax_manifest.json"
log = logging.getLogger(__name__)


from deepjax.errors import CheckpointError  # noqa: E402,F401  (re-exported)


def _files(step_dir: str) -> dict[str, int]:
    out = {}
    for root, _, names in os.walk(step_dir):
        for n in names:
            if n.startswith(MANIFEST):  # the manifest itself, and its temporary while written
                continue
            p = os.path.join(root, n)
            out[os.path.relpath(p, step_dir)] = os.path.getsize(p)
    return out


@jax.jit
def _all_finite(leaves):
    return jax.numpy.stack([jax.numpy.isfinite(x).all() for x in leaves]).all()


def all_finite(tree) -> bool:
    """Whether every float in `tree` is finite: one jitted reduction (not one eager collective per leaf)."""
    leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, "dtype") and np.issubdtype(x.dtype, np.inexact)]
    return bool(_all_finite(leaves)) if leaves else True


class Checkpointer:
    """save(step, state, data_state, config) / restore(abstract_state) over one run directory.

    `extra_items` names further array trees saved beside the state (GRPO: "ref", the reference policy): pass them
    as save(..., extra={name: tree}) and restore(..., extra={name: abstract tree}). A reader that does not ask for
    them (e.g. `deepjax eval` on a GRPO run) restores the state alone."""

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True, extra_items: tuple[str, ...] = ()):
        self.directory = os.path.abspath(directory)
        self._pending: list[int] = []
        self._async = async_save
        self.extra_items = tuple(extra_items)
        self._manager = ocp.CheckpointManager(
            self.directory,
            item_names=("state", "data", "config") + self.extra_items,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
                async_options=ocp.AsyncOptions(post_finalization_callback=self._write_manifests)
                if async_save else None),
        )

    # ---- saving --------------------------------------------------------------------------------
    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _write_manifests(self) -> None:
        """Records the file sizes of committed steps. Orbax calls this after finalizing an async save, but before
        the temporary directory is renamed, so steps not yet committed stay pending until the next call (each
        save, wait and close)."""
        if jax.process_index() != 0:
            self._pending.clear()
            return
        still = []
        for step in self._pending:
            d = self.step_dir(step)
            if not os.path.isdir(d):
                still.append(step)
                continue
            tmp = os.path.join(d, MANIFEST + ".tmp")
            with open(tmp, "w") as f:
                json.dump({"step": step, "files": _files(d)}, f)
            os.replace(tmp, os.path.join(d, MANIFEST))
        self._pending = still

    def save(self, step: int, state, data_state: Any, config: dict, force: bool = False,
             extra: Optional[dict] = None) -> bool:
        """Starts an asynchronous save; returns whether a save started. Raises on a non-finite state."""
        extra = extra or {}
        if sorted(extra) != sorted(self.extra_items):
            raise ValueError(f"save: extra items {sorted(extra)} but this checkpointer has {list(self.extra_items)}")
        if not all_finite((state, extra)):
            raise CheckpointError(f"step {step}: the state holds non-finite values; refusing to save it")
        saved = self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave({"iterator": data_state}),
            config=ocp.args.JsonSave(config),
            **{k: ocp.args.StandardSave(v) for k, v in extra.items()}), force=force)
        if saved:  # the manager waited for the previous save to commit: its manifest can be written now
            self._pending.append(step)
        self._write_manifests()
        return saved

    def wait(self) -> None:
        self._manager.wait_until_finished()
        self._write_manifests()

    def close(self) -> None:
        self.wait()
        self._manager.close()

    # ---- restoring -----------------------------------------------------------------------------
    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> Optional[int]:
        s = self.steps()
        return s[-1] if s else None

    def verify(self, step: int) -> None:
        """Checks a committed step against its manifest: every file present with its recorded size."""
        d = self.step_dir(step)
        path = os.path.join(d, MANIFEST)
        if not os.path.exists(path):
            return  # committed but the process died before the manifest: Orbax's own checks still apply
        try:
            with open(path) as f:
                recorded = json.load(f)["files"]
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint step {step}: manifest {path} is unreadable ({e})") from e
        now = _files(d)
        for rel, size in recorded.items():
            if rel not in now:
                raise CheckpointError(f"checkpoint step {step} is damaged: file {os.path.join(d, rel)} is missing")
            if now[rel] != size:
                raise CheckpointError(f"checkpoint step {step} is damaged: file {os.path.join(d, rel)} has "
                                      f"{now[rel]} bytes, {size} were written")

    def _restore_one(self, step: int, abstract_state, extra: Optional[dict]):
        self.verify(step)
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                config=ocp.args.JsonRestore(), **{k: ocp.args.StandardRestore(v) for k, v in (extra or {}).items()}))
        except Exception as e:  # Orbax / tensorstore raise many types; all mean "this step is unusable"
            why = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            raise CheckpointError(f"checkpoint step {step} in {self.step_dir(step)} is damaged or does not "
                                  f"match this model: {type(e).__name__}: {why}") from e
        if extra is not None:
            return out["state"], out["data"]["iterator"], out["config"], {k: out[k] for k in extra}
        return out["state"], out["data"]["iterator"], out["config"]

    def restore(self, abstract_state, step: Optional[int] = None, fallback: bool = False,
                extra: Optional[dict] = None):
        """(step, state, data_state, config) from `step` (default: the latest). `abstract_state` carries
        the shapes, dtypes and target shardings. With fallback=True a damaged step is skipped (logged) in
        favour of the newest older one that loads. With `extra` ({name: abstract tree}) the restored extra items
        come fifth: (step, state, data_state, config, {name: tree})."""
        steps = self.steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        if step is None:
            step = steps[-1]
        if step not in steps:
            raise CheckpointError(f"no checkpoint step {step} in {self.directory} (have {steps})")
        candidates = [s for s in reversed(steps) if s <= step]
        errors = []
        for s in candidates:
            try:
                restored = self._restore_one(s, abstract_state, extra)
            except CheckpointError as e:
                if not fallback:
                    raise CheckpointError(f"{e}\n(set --config.train.fallback_on_damage=true to fall back to "
                                          f"the previous good checkpoint)") from e
                log.warning("%s; falling back to an older checkpoint", e)
                errors.append(str(e))
                continue
            return (s, *restored)
        raise CheckpointError("no checkpoint could be restored:\n" + "\n".join(errors))

"""Checkpoints: Orbax `CheckpointManager`, asynchronous, one directory per step.

A step directory holds three Orbax items:

    state    step.TrainState: params, optimizer state, step, router biases, RNG, non-finite counters
    data     the Grain iterator state (JSON), so the data order continues exactly
    config   the resolved run config (JSON)

and `deepjax_manifest.json`: {"format": 2, "step": s, "files": {path: [bytes, crc32]}, "crc": its own CRC} for
every file of the step but Orbax's `_CHECKPOINT_METADATA` (checked to parse as JSON) and `commit_success.txt`, both
rewritten by the commit itself. The manifest is written into Orbax's temporary directory before the rename that
commits the step, so every committed step has one: a step without it was not written by a complete save (or lost
it) and is damaged. The checksum is zlib's CRC-32 over 8 MiB chunks: 0.10 s for a 266 MiB checkpoint here (2.7
GB/s, page cache warm), in the background thread of an asynchronous save and again on restore; it catches every
burst of up to 32 flipped bits and any truncation.

Guarantees:
- A checkpoint interrupted mid-write is never picked up: Orbax writes into a temporary directory and renames it
  only when every host has finished and the manifest is written (temporary directories are never listed). On GCS
  (`gs://`, where a rename is a copy) Orbax writes the step directory in place and commits it by writing
  `commit_success.txt` last, after the manifest: a step directory without that file is never listed either.
- A non-finite state is never saved (`save` raises instead).
- A damaged step (no or unreadable manifest, a file missing, of another size or checksum, unparseable metadata)
  raises `CheckpointError` naming the step and the file, before Orbax reads any of it. With `fallback=True` the
  restore moves every damaged step newer than the newest good one aside, to `<parent of the checkpoint root>/damaged/
  <step>` (a run's `damaged/` beside `checkpoints/`; `.1`, `.2`, ... when taken), restores the good one and says so,
  so the steps it retrains are saved again. Without a good step nothing is moved and the restore raises.
- Only canonical step numbers (`60`, not `060` or `abc`) are steps; other entries are named in a warning and
  ignored. An empty step directory holds no work: it is moved aside when the checkpointer opens.
- Retention keeps the newest `keep` good steps: a damaged step is never counted, steps older than `keep` good
  ones are deleted (good or not). A step counts as good once fully verified in this process (each one it wrote, or
  restored, or checked before a deletion would depend on it).
- Restoring onto a different mesh works: the target's shardings come from the abstract state passed in,
  and Orbax reshards.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import signal
import threading
import zlib
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from deepjax import paths
from deepjax.errors import CheckpointError  # noqa: F401  (re-exported)

MANIFEST = "deepjax_manifest.json"
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax's temporary step directories: <step>.orbax-checkpoint-tmp[...]
DAMAGED = "damaged"  # fallback moves damaged steps to <parent of the checkpoint root>/damaged/<step>
UNHASHED = ("_CHECKPOINT_METADATA", "commit_success.txt")  # top-level files Orbax rewrites after the manifest
COMMIT_FILE = UNHASHED[1]  # on GCS Orbax writes the step in place and commits it with this file (no rename)
JSON_FILES = ("_CHECKPOINT_METADATA", "_METADATA", "metadata")  # Orbax's JSON files: checked to parse on verify
CHUNK = 8 << 20
# Test hook (bench/faults.py): "save:S[:N]" / "restore:S" SIGKILLs this process S seconds after the (N-th) save /
# the restore starts.
KILL_IN_ENV = "DEEPJAX_TEST_SIGKILL_IN"
_phase_count: dict[str, int] = {}
log = logging.getLogger(__name__)



def crc32(path) -> int:
    """CRC-32 of a file (local or remote), read in CHUNK-sized pieces."""
    c = 0
    with paths.Path(path).open("rb") as f:
        while b := f.read(CHUNK):
            c = zlib.crc32(b, c)
    return c


def _files(step_dir) -> list[str]:
    """Relative paths (with /) of the files under a step directory, the manifest (and its temporary) excluded."""
    return [rel for rel in paths.walk_files(step_dir) if not posixpath.basename(rel).startswith(MANIFEST)]


def _size(path) -> int:
    return os.path.getsize(path) if not paths.is_remote(path) else paths.Path(path).stat().length


def _commits_with_file(directory) -> bool:
    """Whether Orbax commits steps under `directory` by writing COMMIT_FILE last instead of renaming a temporary
    directory (it does on GCS, where a rename is a copy): such a step without the file is an unfinished save."""
    return paths.scheme(directory) == "gs"


def write_manifest(step_dir, step: int) -> None:
    """Records size and CRC-32 of every file of a step directory (Orbax's rewritten ones excepted)."""
    d = paths.Path(step_dir)
    files = {rel: [_size(d / rel), crc32(d / rel)] for rel in _files(d) if rel not in UNHASHED}
    paths.write_text_atomic(d / MANIFEST, json.dumps({"format": 2, "step": step, "files": files,
                                                      "crc": _files_crc(files)}), fsync=True)


def _files_crc(files: dict) -> int:
    """The manifest's own checksum: CRC-32 of its file table as canonical JSON."""
    return zlib.crc32(json.dumps(files, sort_keys=True).encode())


def step_number(name: str) -> Optional[int]:
    """The step of a checkpoint directory name: canonical decimal digits only."""
    return int(name) if name.isdigit() and str(int(name)) == name else None


@jax.jit
def _all_finite(leaves):
    return jax.numpy.stack([jax.numpy.isfinite(x).all() for x in leaves]).all()


def all_finite(tree) -> bool:
    """Whether every float in `tree` is finite: one jitted reduction (not one eager collective per leaf)."""
    leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, "dtype") and np.issubdtype(x.dtype, np.inexact)]
    return bool(_all_finite(leaves)) if leaves else True


def _kill_if_asked(phase: str) -> None:
    parts = os.environ.get(KILL_IN_ENV, "").split(":")
    what, seconds, nth = parts[0], (parts[1:2] or ["0"])[0], (parts[2:3] or ["1"])[0]
    _phase_count[phase] = _phase_count.get(phase, 0) + 1
    if what == phase and _phase_count[phase] == int(nth):
        t = threading.Timer(float(seconds), os.kill, (os.getpid(), signal.SIGKILL))
        t.daemon = True
        t.start()


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return f"{type(e).__name__}: {s.splitlines()[0][:300]}" if s else type(e).__name__


def list_steps(directory) -> list[int]:
    """The committed step directories (canonical numbers, good or damaged) of a checkpoint root, oldest first. On
    GCS a step directory without Orbax's commit file is a save still running or cut off: not listed (as the
    temporary directories of a local save are not)."""
    root = paths.Path(directory)
    paths.refresh(root)
    if not root.is_dir():
        return []
    steps = sorted(s for c in root.iterdir() if (s := step_number(c.name)) is not None and c.is_dir())
    if _commits_with_file(root):
        steps = [s for s in steps if (root / str(s) / COMMIT_FILE).exists()]
    return steps


def verify_step(d, step: int, checksums: bool = True) -> None:
    """Checks a committed step directory against its manifest (every file present, its size, its CRC-32 unless
    checksums=False) and that Orbax's JSON metadata parses; raises CheckpointError naming the step and the file."""
    bad = lambda what: CheckpointError(f"checkpoint step {step} is damaged: {what}")  # noqa: E731
    d = paths.Path(d)
    paths.refresh(d)
    path = d / MANIFEST
    if not path.exists():
        raise bad(f"{path} is missing (every complete save writes it; the step was not written by one, or the "
                  f"manifest was deleted)")
    try:
        m = json.loads(path.read_bytes())
        v2 = m.get("format") == 2
        if v2 and m.get("crc") != _files_crc(m["files"]):
            raise ValueError("it does not match its own checksum")
        recorded = {rel: (tuple(map(int, w)) if v2 else (int(w), None)) for rel, w in m["files"].items()}
        if m.get("step", step) != step:
            raise ValueError(f"it records step {m.get('step')}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise bad(f"manifest {path} is unreadable ({_first_line(e)})") from e
    present = set(_files(d))
    for rel, (size, crc) in recorded.items():
        p = d / rel
        if rel not in present:
            raise bad(f"file {p} is missing")
        got = _size(p)
        if got != size:
            raise bad(f"file {p} has {got} bytes, {size} were written")
        if checksums and crc is not None and crc32(p) != crc:
            raise bad(f"file {p} does not match its checksum (its content changed after it was written)")
    for rel in sorted(present):
        if posixpath.basename(rel) in JSON_FILES and (rel not in recorded or not checksums or not v2):
            try:
                json.loads((d / rel).read_bytes())
            except (OSError, ValueError) as e:
                raise bad(f"file {d / rel} is not valid JSON ({_first_line(e)})") from e
    if UNHASHED[0] not in present:
        raise bad(f"file {d / UNHASHED[0]} is missing")


class Checkpointer:
    """save(step, state, data_state, config) / restore(abstract_state) over one run directory.

    `extra_items` names further array trees saved beside the state (GRPO: "ref", the reference policy): pass them
    as save(..., extra={name: tree}) and restore(..., extra={name: abstract tree}). A reader that does not ask for
    them (e.g. `deepjax eval` on a GRPO run) restores the state alone. `damaged_dir`: where fallback moves damaged
    steps (default <parent of directory>/damaged)."""

    def __init__(self, directory, keep: int = 3, async_save: bool = True, extra_items: tuple[str, ...] = (),
                 damaged_dir=None):
        self.directory = paths.run_path(directory, "checkpoint directory")  # local (made absolute) or gs://
        self.damaged_dir = (paths.run_path(damaged_dir, "damaged directory") if damaged_dir is not None
                            else self.directory.parent / DAMAGED)
        self.keep = keep
        self._async = async_save
        self._inflight: Optional[int] = None  # the step whose asynchronous save is running
        self._good: set[int] = set()  # steps fully verified (or written) by this process
        self.extra_items = tuple(extra_items)
        self.is_main = jax.process_index() == 0
        paths.refresh(self.directory)
        if self.is_main and self.directory.is_dir():
            for d in sorted(self.directory.iterdir(), key=lambda c: c.name):
                name = d.name
                if TMP_SUFFIX not in name and name != DAMAGED and d.is_dir():
                    if step_number(name) is None:
                        log.warning("checkpoint directory %s: %r is not a step number; ignored", self.directory, name)
                    elif not _files(d) and not (d / MANIFEST).exists():
                        log.warning("checkpoint step %s: %s is empty; moved to %s", name, d,
                                    self._move_aside(int(name)))
        self._sync("deepjax: checkpoint directory scanned")
        # always asynchronous underneath, so the manifest is written before the commit; async_save=False waits
        self._manager = ocp.CheckpointManager(
            self.directory, item_names=("state", "data", "config") + self.extra_items,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=None, enable_async_checkpointing=True, create=True,
                async_options=ocp.AsyncOptions(post_finalization_callback=self._write_manifest)))

    @staticmethod
    def _sync(name: str) -> None:
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(name)

    # ---- saving --------------------------------------------------------------------------------
    def step_dir(self, step: int) -> paths.Path:
        return self.directory / str(step)

    def _write_manifest(self) -> None:
        """Orbax's post-finalization callback (primary host, every host's files written, before the rename that
        commits the step): the manifest goes into the temporary directory, so it is part of the commit."""
        step = self._inflight
        tmp = self.directory / (str(step) + TMP_SUFFIX)  # local saves; on GCS Orbax writes the step in place
        write_manifest(os.fspath(tmp if not paths.is_remote(tmp) and tmp.is_dir() else self.step_dir(step)), step)
        self._good.add(step)

    def save(self, step: int, state, data_state: Any, config: dict, force: bool = False,
             extra: Optional[dict] = None) -> bool:
        """Starts an asynchronous save; returns whether a save started. Raises on a non-finite state, and with
        `CheckpointError` when the previous save failed (e.g. a full disk: that step is not committed)."""
        extra = extra or {}
        if sorted(extra) != sorted(self.extra_items):
            raise ValueError(f"save: extra items {sorted(extra)} but this checkpointer has {list(self.extra_items)}")
        if not all_finite((state, extra)):
            raise CheckpointError(f"step {step}: the state holds non-finite values; refusing to save it")
        self.wait()
        self._retain()
        self._inflight = step
        _kill_if_asked("save")
        try:
            saved = self._manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave({"iterator": data_state}),
                config=ocp.args.JsonSave(config),
                **{k: ocp.args.StandardSave(v) for k, v in extra.items()}), force=force)
        except (OSError, ValueError, RuntimeError) as e:
            raise self._save_failed(step, e) from e
        if not self._async:
            self.wait()
        return saved

    def wait(self) -> None:
        """Waits for the running save to commit; raises CheckpointError when it failed."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # Orbax re-raises its background thread's error, of any type
            raise self._save_failed(self._inflight, e) from e

    def _save_failed(self, step: int, e: BaseException) -> CheckpointError:
        full = str(e)
        why = "no space left on device" if "No space left" in full or "ENOSPC" in full else _first_line(e)
        return CheckpointError(f"checkpoint step {step}: saving to {self.step_dir(step)} failed ({why}); that step "
                               f"is not committed, the older ones are intact")

    def close(self) -> None:
        """Waits for the running save, applies retention (when this checkpointer saved anything), closes."""
        try:
            self.wait()
            if self._inflight is not None:
                self._retain()
        finally:
            self._manager.close()

    def _retain(self) -> None:
        """Deletes the steps older than the newest `keep` good ones (process 0; no save running)."""
        if not self.is_main or not self.keep:
            return
        good = 0
        for s in reversed(self.steps()):
            if good >= self.keep:
                log.info("checkpoint step %d: deleted (%d newer good steps kept)", s, good)
                paths.rmtree(self.step_dir(s))
            elif self._is_good(s):
                good += 1

    def _is_good(self, step: int) -> bool:
        if step not in self._good:
            try:
                self.verify(step)
            except CheckpointError as e:
                log.warning("%s; not counted as a kept checkpoint", e)
                return False
        return True

    # ---- checking --------------------------------------------------------------------------------
    def steps(self) -> list[int]:
        """The committed step directories (good or damaged), oldest first."""
        return list_steps(self.directory)

    def latest_step(self) -> Optional[int]:
        s = self.steps()
        return s[-1] if s else None

    def verify(self, step: int, checksums: bool = True) -> None:
        """`verify_step` of one of this directory's steps (remembered as good when checksums were checked)."""
        if not self.step_dir(step).is_dir():
            raise CheckpointError(f"no checkpoint step {step} in {self.directory}")
        verify_step(self.step_dir(step), step, checksums)
        if checksums:
            self._good.add(step)

    def _move_aside(self, step: int) -> str:
        """Moves a step directory to damaged_dir/<step>[.n]; returns where."""
        self.damaged_dir.mkdir(parents=True, exist_ok=True)
        dest, n = self.damaged_dir / str(step), 0
        while dest.exists():
            n += 1
            dest = self.damaged_dir / f"{step}.{n}"
        paths.move_tree(self.step_dir(step), dest)
        self._good.discard(step)
        return dest

    # ---- restoring -----------------------------------------------------------------------------
    def _choose(self, candidates: list[int], fallback: bool) -> int:
        """The newest candidate that verifies (process 0 checks, then tells the others). With fallback the
        damaged ones newer than it are moved aside; without, the first damaged one raises."""
        chosen, errors, fatal = -1, [], None
        if self.is_main:
            for s in candidates:
                try:
                    self.verify(s)
                except CheckpointError as e:
                    if not fallback:
                        fatal = CheckpointError(f"{e} (set --config.train.fallback_on_damage=true to move it aside "
                                                f"and restore the newest good checkpoint)")
                        break
                    errors.append((s, str(e)))
                    continue
                chosen = s
                break
            if chosen >= 0:
                for s, e in errors:
                    print(f"{e}; moved to {self._move_aside(s)}, restoring step {chosen}", flush=True)
            elif fatal is None:
                fatal = CheckpointError("no checkpoint could be restored (nothing was moved): " +
                                        "; ".join(e for _, e in errors))
        if jax.process_count() > 1:  # every process learns the choice (or that there is none) before raising
            chosen = int(multihost_utils.broadcast_one_to_all(np.int64(chosen)))
        if chosen < 0:
            raise fatal or CheckpointError(f"no checkpoint could be restored from {self.directory} (see process 0)")
        if errors or jax.process_count() > 1:
            self._sync("deepjax: damaged checkpoints moved")
            self._manager.reload()
        return chosen

    def _restore_one(self, step: int, abstract_state, extra: Optional[dict]):
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                config=ocp.args.JsonRestore(), **{k: ocp.args.StandardRestore(v) for k, v in (extra or {}).items()}))
        except Exception as e:  # Orbax / tensorstore raise many types; the files are intact (verified)
            raise CheckpointError(f"checkpoint step {step} in {self.step_dir(step)} does not match this model: "
                                  f"{_first_line(e)}") from e
        if extra is not None:
            return out["state"], out["data"]["iterator"], out["config"], {k: out[k] for k in extra}
        return out["state"], out["data"]["iterator"], out["config"]

    def restore(self, abstract_state, step: Optional[int] = None, fallback: bool = False,
                extra: Optional[dict] = None):
        """(step, state, data_state, config) from `step` (default: the latest). `abstract_state` carries
        the shapes, dtypes and target shardings. With fallback=True the damaged steps newer than the newest good
        one are moved aside (printed) and that one is restored. With `extra` ({name: abstract tree}) the restored
        extra items come fifth: (step, state, data_state, config, {name: tree})."""
        _kill_if_asked("restore")
        steps = self.steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        if step is None:
            step = steps[-1]
        if step not in steps:
            raise CheckpointError(f"no checkpoint step {step} in {self.directory} (have {steps})")
        s = self._choose([s for s in reversed(steps) if s <= step], fallback)
        return (s, *self._restore_one(s, abstract_state, extra))

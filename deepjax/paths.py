"""Run-directory paths: local paths and `gs://bucket/...` URIs through one type, `etils.epath.Path`.

Every file deepjax writes or reads in a run directory (config.json, metrics.jsonl, eval.jsonl, TensorBoard events,
plots, eval JSON, checkpoint manifests, the checkpoints themselves through Orbax) goes through `run_path` and the
helpers here, so `--workdir gs://bucket/run` works wherever a local directory does (docs/storage.md).

Supported: local paths (made absolute, as before) and `gs://` (etils.epath over gcsfs, or over tf.io.gfile where
TensorFlow is installed; Orbax writes the arrays with tensorstore's GCS driver). Other URI schemes are refused in
one line: Orbax's array storage knows only local files and GCS.

Object stores have no append and no rename: `AppendLog` keeps a remote JSON-lines log in memory and rewrites the
object on `sync`; TensorBoard events are written to a local temporary directory and copied (`TensorBoardMirror`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import shutil
import tempfile
import time
from typing import Iterator, Optional, Union

from etils import epath

from deepjax.errors import UserError

Path = epath.Path
PathLike = Union[str, os.PathLike]

SCHEMES = ("gs",)  # URI schemes deepjax supports (those Orbax's array storage supports)
REMOTE_SYNC_S = 30.0  # a remote log is rewritten at most this often between checkpoints (and at every save, close)


class StorageError(UserError, ValueError):
    """A run-directory path deepjax cannot use (an unsupported scheme, a missing filesystem package)."""


def scheme(p: PathLike) -> Optional[str]:
    """The URI scheme of a path ("gs" for gs://bucket/x), None for a local path."""
    s = os.fspath(p)
    return s.split("://", 1)[0] if "://" in s else None


def is_remote(p: PathLike) -> bool:
    return scheme(p) is not None


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check(p: PathLike, what: str = "--workdir") -> None:
    """Raises StorageError (one line naming `what`) when `p` is a URI deepjax cannot read or write here."""
    s = scheme(p)
    if s is None:
        return
    if s not in SCHEMES:
        raise StorageError(f"{what}={os.fspath(p)}: {s}:// is not supported (local paths and gs:// are: Orbax "
                           f"stores checkpoint arrays only on local disks and Google Cloud Storage)")
    if not (_has("gcsfs") or _has("tensorflow")):
        raise StorageError(f"{what}={os.fspath(p)}: gs:// paths need the gcsfs package (pip install gcsfs)")
    if not os.fspath(p)[len("gs://"):].split("/", 1)[0]:
        raise StorageError(f"{what}={os.fspath(p)}: no bucket name (gs://BUCKET/path)")


def run_path(p: PathLike, what: str = "--workdir") -> Path:
    """`p` as an epath.Path: a local path made absolute, a gs:// URI as it is (checked: `check`)."""
    if isinstance(p, Path) and not is_remote(p) and os.path.isabs(os.fspath(p)):
        return p
    check(p, what)
    return Path(os.fspath(p)) if is_remote(p) else Path(os.path.abspath(os.fspath(p)))


def shown(p: PathLike) -> str:
    """A path for messages: a URI as given, a local path made absolute (nothing checked)."""
    return os.fspath(p) if is_remote(p) else os.path.abspath(os.fspath(p))


def refresh(p: PathLike) -> None:
    """Drops gcsfs's cached listings before a listing that must see files written by others (tensorstore writes
    Orbax's arrays; other hosts and processes write too). Nothing to do for local paths or tf.io.gfile."""
    if is_remote(p) and _has("gcsfs"):
        from etils.epath import backend  # lazy on purpose: gcsfs-backed paths only

        try:
            backend.fsspec_backend.fs(os.fspath(p)).invalidate_cache()
        except Exception:  # noqa: BLE001  (a cache that cannot be dropped is no error)
            pass


def _strip_scheme(s: str) -> str:
    return s.split("://", 1)[1] if "://" in s else s


def walk_files(top: PathLike) -> list[str]:
    """The files under a directory as sorted relative paths with "/" (none if it does not exist)."""
    if not is_remote(top):
        out = []
        for root, _, names in os.walk(os.fspath(top)):
            out += [os.path.relpath(os.path.join(root, n), os.fspath(top)).replace(os.sep, "/") for n in names]
        return sorted(out)
    refresh(top)
    base = _strip_scheme(os.fspath(top)).rstrip("/")
    out = []
    for root, _, names in Path(top).walk():
        # fsspec yields roots without their scheme ("bucket/run/..."), tf.io.gfile with it: compare without
        rel = os.path.relpath(_strip_scheme(os.fspath(root)).rstrip("/"), base)
        out += [n if rel == "." else f"{rel}/{n}" for n in names]
    return sorted(out)


def rmtree(p: PathLike) -> None:
    """Deletes a directory tree, local or remote; what cannot be deleted is left (as shutil's ignore_errors)."""
    if not is_remote(p):
        shutil.rmtree(os.fspath(p), ignore_errors=True)
        return
    try:
        Path(p).rmtree(missing_ok=True)
    except OSError:
        pass
    refresh(p)


def move_tree(src: PathLike, dst: PathLike) -> None:
    """Moves a directory tree: a rename locally (a copy across file systems); on an object store, where a
    "directory" is a name prefix, every file is copied and the source deleted."""
    if not (is_remote(src) or is_remote(dst)):
        shutil.move(os.fspath(src), os.fspath(dst))
        return
    src, dst = Path(src), Path(dst)
    for rel in walk_files(src):
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        (dst / rel).write_bytes((src / rel).read_bytes())
    rmtree(src)


def write_text_atomic(path: PathLike, data: str, fsync: bool = False) -> None:
    """Writes a file so that a reader (or a kill) sees the old content or the new, never a part: locally through a
    temporary file and a rename; on GCS an object write is atomic by itself."""
    path = Path(path)
    if is_remote(path):
        path.write_text(data)
        return
    tmp = os.fspath(path) + ".tmp"
    with open(tmp, "w") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, os.fspath(path))


def append_text(path: PathLike, data: str) -> None:
    """Appends to a file: in place locally; on GCS (no append) the object is read and written again whole, which
    suits an occasional line (eval.jsonl), not a per-step log (`AppendLog`)."""
    path = Path(path)
    if not is_remote(path):
        with open(os.fspath(path), "a") as f:
            f.write(data)
        return
    old = path.read_text() if path.exists() else ""
    if old and not old.endswith("\n"):
        old += "\n"  # a line cut by a kill: ended, so the new one stays whole (the reader skips the cut one)
    path.write_text(old + data)


def save_figure(fig, path: PathLike, **kw) -> None:
    """A matplotlib Figure as a PNG at `path` (local or remote)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", **kw)
    Path(path).write_bytes(buf.getvalue())


@contextlib.contextmanager
def local_file(path: PathLike) -> Iterator[str]:
    """A local file name to write `path` through (for writers that take only local names): `path` itself when it
    is local, else a temporary file copied to `path` on exit."""
    if not is_remote(path):
        yield os.fspath(path)
        return
    d = tempfile.mkdtemp(prefix="deepjax-")
    try:
        tmp = os.path.join(d, Path(path).name)
        yield tmp
        if os.path.exists(tmp):
            Path(path).write_bytes(Path(tmp).read_bytes())
    finally:
        shutil.rmtree(d, ignore_errors=True)


def local_cache(*parts: str) -> str:
    """A directory on this machine's disk ($XDG_CACHE_HOME/deepjax/..., default ~/.cache/deepjax/...)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "deepjax", *parts)


class AppendLog:
    """A JSON-lines (or any text-lines) file appended line by line.

    Local: an open file in append mode, flushed after every line (a kill loses at most the line being written).
    Remote (GCS objects cannot be appended to): the content is kept in memory and the whole object rewritten by
    `sync`, at most every REMOTE_SYNC_S seconds unless forced; `Run.save` forces one before every checkpoint, so a
    killed run loses only lines past its last checkpoint, which a resumed run redoes anyway."""

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self.remote = is_remote(self.path)
        self._file = None
        self._lines: list[str] = []
        self._dirty = False
        self._last_sync = time.monotonic()
        if self.remote:
            if self.path.exists():
                self._lines = self.path.read_text().splitlines(keepends=True)
                if self._lines and not self._lines[-1].endswith("\n"):
                    self._lines[-1] += "\n"
        else:
            self._file = open(os.fspath(self.path), "a")

    def write(self, line: str) -> None:
        if self._file is not None:
            self._file.write(line)
            self._file.flush()
            return
        self._lines.append(line)
        self._dirty = True
        self.sync(force=False)

    def sync(self, force: bool = True) -> None:
        if self._file is not None or not self._dirty:
            return
        now = time.monotonic()
        if force or now - self._last_sync >= REMOTE_SYNC_S:
            self.path.write_text("".join(self._lines))
            self._dirty, self._last_sync = False, now

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        else:
            self.sync()


class TensorBoardMirror:
    """Where a TensorBoard writer writes: the run's tb/ directory itself when it is local; else a local temporary
    directory whose event files `sync` copies to the remote tb/ (rewriting each object: GCS has no append)."""

    def __init__(self, tb_dir: PathLike):
        self.remote_dir = Path(tb_dir) if is_remote(tb_dir) else None
        self.local_dir = tempfile.mkdtemp(prefix="deepjax-tb-") if self.remote_dir is not None else os.fspath(tb_dir)
        self._last_sync = time.monotonic()

    def sync(self, force: bool = True) -> None:
        if self.remote_dir is None:
            return
        now = time.monotonic()
        if not force and now - self._last_sync < REMOTE_SYNC_S:
            return
        self._last_sync = now
        for name in sorted(os.listdir(self.local_dir)):
            src = os.path.join(self.local_dir, name)
            if os.path.isfile(src):
                (self.remote_dir / name).write_bytes(Path(src).read_bytes())

    def close(self) -> None:
        if self.remote_dir is not None:
            try:
                self.sync()
            finally:
                shutil.rmtree(self.local_dir, ignore_errors=True)


__all__ = ["Path", "StorageError", "SCHEMES", "scheme", "is_remote", "check", "run_path", "shown", "refresh",
           "walk_files", "rmtree", "move_tree", "write_text_atomic", "append_text",
           "save_figure", "local_file", "local_cache", "AppendLog", "TensorBoardMirror", "REMOTE_SYNC_S"]

"""The training data as TFDS datasets in ArrayRecord files (random access, no TensorFlow), built on first use.

    sources = build(cfg.data, data_dir)   # {"train": source, "test": source}; each len() and [i] -> record dict
    sources["train"][0]                   # {"question": b"Compute 3 + 415", "answer": b"418", "task": b"...", ...}

Builders (one per `data.source`), and where their files go under `data_dir`:

    arithmetic, countdown  deepjax_tasks/<task>_train<N>_test<M>_seed<S>[_d<D>_<ops>]/1.0.0  by deepjax/data/tasks.py
    jsonl_math             deepjax_jsonl_math/h<hash of paths + contents>/1.0.0    GSM8K- or MATH-style JSONL files
    traces                 deepjax_traces/h<hash of paths + contents>/1.0.0        prompt / completion JSONL files
    text                   deepjax_text/h<hash of paths + contents>/1.0.0          plain-text corpora

so different settings, or edited files, never reuse each other's data. Records (TFDS gives strings as bytes):

    tasks       question, answer (the reference), task, meta (JSON; see deepjax/data/tasks.py)
    jsonl_math  question, answer (the final answer), solution (the full solution text), task ("math")
    traces      question, completion (trained verbatim), answer (the reference, or ""), task
    text        text

`data.path` is comma-separated; each part a file or a glob. JSONL formats: GSM8K `{"question", "answer": "... #### 72"}`
(an answer without `####` is taken as the final answer itself) or MATH `{"problem", "solution": "... \\boxed{3}"}`
(an `answer` field, when present, wins over the `\\boxed{}`). `traces`: `{"question", "completion"}` per line
(optional `answer`, `task`; other fields ignored), e.g. `deepjax distill`'s traces.jsonl. For `text`, a `.jsonl` file
holds one document per non-empty line (`{"text": ...}`); any other file is one document. A bad file is a `DataError`
naming the file and line, raised before TFDS sees the file.

Several hosts sharing one `data_dir` may build at once: TFDS writes into a temporary directory and renames it, so the
last writer wins with identical data; to avoid the duplicated work, build on process 0 first.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
from typing import Any, Iterator

import tensorflow_datasets as tfds
from tensorflow_datasets.core import utils as tfds_utils

from deepjax.data import tasks
from deepjax.errors import ConfigError, DataError, DataFileNotFoundError

QA_SOURCES = ("arithmetic", "countdown", "jsonl_math", "traces")
SOURCES = QA_SOURCES + ("text",)
VERSION = "1.0.0"


class _QuietTfds(logging.Filter):
    """Drops the two warnings TFDS logs for every builder here (each config is built on the fly, and is looked for
    before it is prepared): noise above a run's own output, and above the one line of a data error."""

    NOISE = ("Using custom data configuration", "Variant folder")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOISE)


logging.getLogger("absl").addFilter(_QuietTfds())


# ------------------------------------------------------------------------------------------------------------- files


def resolve_paths(spec: str | None) -> list[str]:
    """The files named by `data.path` (comma-separated files or globs), in order, as absolute paths."""
    if not spec:
        raise ConfigError("data.path is not set: this data.source reads local files")
    out = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        part = os.path.expanduser(part)
        matches = sorted(glob.glob(part)) if glob.has_magic(part) else [part]
        files = [m for m in matches if os.path.isfile(m)]
        if not files:
            raise DataFileNotFoundError(f"data.path: {part!r} names no file (data.path={spec!r})")
        out.extend(os.path.abspath(f) for f in files)
    if not out:
        raise DataFileNotFoundError(f"data.path={spec!r} names no file")
    return out


def files_hash(paths: list[str]) -> str:
    """A short hash of the files' paths and contents: the builder-config name, so edited files rebuild."""
    h = hashlib.sha256()
    for path in paths:
        h.update(path.encode("utf-8") + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _json_lines(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-empty line; a bad line is an error naming the file and line."""
    with open(path, "rb") as f:  # bytes, decoded line by line: a bad byte is reported with its line
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text ({e})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError) as e:  # JSONDecodeError, an int over 4300 digits, deep nesting
                raise DataError(f"{path}:{lineno}: not valid JSON ({getattr(e, 'msg', None) or e})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def math_record(obj: dict, where: str) -> dict:
    """One GSM8K- or MATH-style JSON object as {question, answer, solution, task}; `where` is "file:line"."""
    if isinstance(obj.get("question"), str) and isinstance(obj.get("answer"), str):
        question, solution = obj["question"], obj["answer"]
        answer = tasks.final_answer_from_solution(solution) or solution.strip()
    elif isinstance(obj.get("problem"), str) and isinstance(obj.get("solution"), str):
        question, solution = obj["problem"], obj["solution"]
        answer = obj.get("answer")
        if answer is not None and (isinstance(answer, bool) or not isinstance(answer, (str, int, float))):
            raise DataError(f"{where}: 'answer' must be a string or a number, got {type(answer).__name__}")
        answer = answer if answer not in (None, "") else tasks.final_answer_from_solution(solution)
        if answer is None:
            raise DataError(f"{where}: the solution has no \\boxed{{...}} final answer and there is no 'answer' field")
    else:
        got = ", ".join(f"{k!r}: {type(v).__name__}" for k, v in sorted(obj.items())[:8])
        raise DataError(f"{where}: expected string fields 'question' and 'answer' (GSM8K) or 'problem' and "
                        f"'solution' (MATH); got {{{got}{', ...' if len(obj) > 8 else ''}}}")
    if not question.strip() or not str(answer).strip():
        raise DataError(f"{where}: the {'question' if not question.strip() else 'final answer'} is empty")
    return {"question": question, "answer": str(answer), "solution": solution, "task": "math"}


def read_math(paths: list[str]) -> Iterator[tuple[str, dict]]:
    for i, path in enumerate(paths):
        for lineno, obj in _json_lines(path):
            yield f"{i}-{lineno}", math_record(obj, f"{path}:{lineno}")


def trace_record(obj: dict, where: str) -> dict:
    """One prompt / completion JSON object as {question, completion, answer, task}; `where` is "file:line"."""
    for key in ("question", "completion"):
        if not isinstance(obj.get(key), str):
            raise DataError(f"{where}: expected a string field {key!r} (traces: question, completion); got keys "
                            f"{sorted(obj)[:8]}")
    if not obj["question"].strip():
        raise DataError(f"{where}: the question is empty")
    for key in ("answer", "task"):
        if obj.get(key) is not None and not isinstance(obj[key], str):
            raise DataError(f"{where}: {key!r} must be a string, got {type(obj[key]).__name__}")
    return {"question": obj["question"], "completion": obj["completion"], "answer": obj.get("answer") or "",
            "task": obj.get("task") or "trace"}


def read_traces(paths: list[str]) -> Iterator[tuple[str, dict]]:
    for i, path in enumerate(paths):
        for lineno, obj in _json_lines(path):
            yield f"{i}-{lineno}", trace_record(obj, f"{path}:{lineno}")


def read_text(paths: list[str]) -> Iterator[tuple[str, dict]]:
    for i, path in enumerate(paths):
        if path.endswith(".jsonl"):
            for lineno, obj in _json_lines(path):
                if not isinstance(obj.get("text"), str):
                    raise DataError(f"{path}:{lineno}: expected a string field 'text'; got keys {sorted(obj)}")
                if obj["text"]:
                    yield f"{i}-{lineno}", {"text": obj["text"]}
        else:
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: not UTF-8 text ({e})") from None
            if text:
                yield f"{i}", {"text": text}


# ---------------------------------------------------------------------------------------------------------- builders


@dataclasses.dataclass
class TasksConfig(tfds.core.BuilderConfig):
    task: str = "arithmetic"
    num_train: int = 0
    num_test: int = 0
    task_seed: int = 0
    max_digits: int = 4
    ops: str = "+-*"
    terms: int = 2


@dataclasses.dataclass
class FilesConfig(tfds.core.BuilderConfig):
    paths: tuple[str, ...] = ()


def _text(*names: str) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({n: tfds.features.Text() for n in names})


class _LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the builders here: generated or local data, nothing to download."""

    VERSION = tfds.core.Version(VERSION)

    # TFDS looks for a download-checksums file next to a builder's module through `importlib_resources`, a package it
    # requires only on Python < 3.9: on 3.11 a builder inside a package fails with ModuleNotFoundError. We download
    # nothing, so there is no such file to find.
    @tfds_utils.classproperty
    @classmethod
    def code_path(cls) -> None:
        return None

    # TFDS prints "Downloading and preparing dataset Unknown size ..." and "Dataset ... downloaded and prepared to ..."
    # around every build: nothing is downloaded here, and the run prints its own lines (tests/test_quiet.py).
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass


class DeepjaxTasks(_LocalBuilder):
    """Generated verifiable tasks (deepjax/data/tasks.py): train and test splits."""

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=_text("question", "answer", "task", "meta"))

    def _split_generators(self, dl_manager):
        c = self.builder_config
        return {"train": self._generate_examples("train", c.num_train), "test": self._generate_examples("test", c.num_test)}

    def _generate_examples(self, split: str, n: int):
        c = self.builder_config
        for i, ex in enumerate(tasks.generate(c.task, n, c.task_seed, split, max_digits=c.max_digits, ops=c.ops,
                                              terms=c.terms)):
            yield i, ex


class DeepjaxJsonlMath(_LocalBuilder):
    """Question / final answer / solution from local GSM8K- or MATH-style JSONL files: one train split."""

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=_text("question", "answer", "solution", "task"))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(list(self.builder_config.paths))}

    def _generate_examples(self, paths: list[str]):
        return read_math(paths)


class DeepjaxTraces(_LocalBuilder):
    """Prompt / completion pairs from local JSONL files (`deepjax distill`'s traces): one train split."""

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=_text("question", "completion", "answer", "task"))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(list(self.builder_config.paths))}

    def _generate_examples(self, paths: list[str]):
        return read_traces(paths)


class DeepjaxText(_LocalBuilder):
    """Documents from local text files: one train split."""

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=_text("text"))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(list(self.builder_config.paths))}

    def _generate_examples(self, paths: list[str]):
        return read_text(paths)


# ------------------------------------------------------------------------------------------------------------- build


def builder(data_cfg: Any, data_dir: str) -> tfds.core.GeneratorBasedBuilder:
    """The TFDS builder for `data_cfg` (a DataConfig), not yet prepared. Local files are validated first."""
    src = data_cfg.source
    if src in ("arithmetic", "countdown"):
        name = f"{src}_train{data_cfg.num_train}_test{data_cfg.num_test}_seed{data_cfg.task_seed}"
        opts = tasks.options_of(data_cfg)
        if src == "arithmetic" and opts != tasks.DEFAULT_OPTIONS:  # default names stay as they were
            words = {"+": "add", "-": "sub", "*": "mul"}
            name += f"_d{opts['max_digits']}_" + "".join(words[c] for c in opts["ops"])
            name += f"_t{opts['terms']}" if opts["terms"] != 2 else ""
        config = TasksConfig(name=name, version=VERSION, task=src, num_train=data_cfg.num_train,
                             num_test=data_cfg.num_test, task_seed=data_cfg.task_seed, **opts)
        return DeepjaxTasks(data_dir=data_dir, config=config, file_format="array_record")
    if src in ("jsonl_math", "traces", "text"):
        paths = resolve_paths(data_cfg.path)
        reader, cls = {"jsonl_math": (read_math, DeepjaxJsonlMath), "traces": (read_traces, DeepjaxTraces),
                       "text": (read_text, DeepjaxText)}[src]
        config = FilesConfig(name=f"h{files_hash(paths)}", version=VERSION, paths=tuple(paths))
        b = cls(data_dir=data_dir, config=config, file_format="array_record")
        if not b.is_prepared():
            count = sum(1 for _ in reader(paths))  # errors name the file and line, before TFDS wraps them
            if count == 0:
                raise DataError(f"data.path={data_cfg.path!r}: the files hold no examples")
        return b
    raise ConfigError(f"data.source={src!r}: unknown; choose from {SOURCES}")


def build(data_cfg: Any, data_dir: str) -> dict[str, Any]:
    """Builds the dataset of `data_cfg` under `data_dir` unless already there; {split: random-access source}.

    Each source is TFDS's ArrayRecord data source (what `tfds.data_source` returns): `len(src)`, `src[i]` -> a record
    dict (strings as bytes), picklable, so Grain reads it from worker processes.
    """
    if not data_dir:
        raise ConfigError("data.data_dir is not set (and no data_dir was given)")
    b = builder(data_cfg, os.path.expanduser(data_dir))
    if not b.is_prepared():
        # TFDS's nested progress bars (splits, examples, shuffling) for a build of a second or less would fight the
        # run's own bar; they are off while it builds, then back as they were (a notebook's TFDS keeps its setting).
        shown = getattr(tfds_utils.tqdm_utils, "_active", True)
        tfds.display_progress_bar(False)
        try:
            b.download_and_prepare(download_config=tfds.download.DownloadConfig(
                try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP))
        finally:
            tfds.display_progress_bar(shown)
    return {split: b.as_data_source(split) for split in b.info.splits}


__all__ = ["build", "builder", "resolve_paths", "files_hash", "math_record", "read_math", "trace_record", "read_traces",
           "read_text", "SOURCES", "QA_SOURCES", "DeepjaxTasks", "DeepjaxJsonlMath", "DeepjaxTraces", "DeepjaxText"]

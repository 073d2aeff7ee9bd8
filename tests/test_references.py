"""References to modules and files in docstrings, comments, error messages, the README and docs/ name what exists,
under its current name (docs/LOG.md is dated history and keeps the old names).

Pure text and AST, nothing imported. Checked:
- file names x.py in prose (Markdown; docstrings, comments, error messages), and paths under the repository's own folders
  (deepjax/..., tests/..., bench/..., docs/...) anywhere: the file (or folder, or glob) exists;
- dotted paths deepjax.a.b[.attr]: the longest module prefix exists and its next part is a top-level name of it;
- `module.attr` in backticks, module a current or an old module stem: the attribute is a top-level name of a module
  of that stem (config section stems: or a field of the section's config class);
- the module names retired by the package layout (docs/LOG.md, session 8) appear in no prose and no import.
"""

import ast
import functools
import glob
import io
import os
import pathlib
import re
import tokenize

REPO = pathlib.Path(__file__).resolve().parent.parent
HERE = pathlib.Path(__file__).resolve()
SKIP_DIRS = {".git", ".venv", "__pycache__", "runs", ".pytest_cache"}

# Old flat module stems (docs/LOG.md's old -> new table, and the bench scripts folded into bench/tune.py,
# bench/profile.py and tests/test_gpu_*.py) that no current module or file has: found anywhere as a word, stale.
RETIRED = ("decode_fused", "kernels_grouped", "train_step", "grpo_run", "run_eval", "kernels_check", "grouped_check",
           "ep_gpu_check", "profile_decode", "profile_split", "dump_decode_hlo", "kernels_tune", "tune64",
           "moe64_check")
# Old stems that are ordinary words or current names too: checked only as `stem.attr` in backticks.
OLD_STEMS = set(RETIRED) | {"nn", "grpo", "evaluation", "model", "train", "rl"}
# Run config sections (`rl.loss.beta`, `model.q_lora_rank`): the config class whose fields `section.field` may name.
SECTIONS = {"model": ("deepjax/model/config.py", "ModelConfig"), "data": ("deepjax/data/config.py", "DataConfig"),
            "optim": ("deepjax/train/config.py", "OptimConfig"), "train": ("deepjax/train/config.py", "TrainConfig"),
            "rl": ("deepjax/rl/config.py", "RLConfig"), "mesh": ("deepjax/parallel/sharding.py", "MeshConfig"),
            "sampling": ("deepjax/infer/sampling.py", "SamplingConfig"),
            "distill": ("deepjax/rl/config.py", "DistillConfig")}
# Placeholders in usage lines and error formats: configs/NAME.py, `sampling.FIELD=value`, deepjax.a.b.
PLACEHOLDERS = {"NAME", "FIELD", "VALUE", "a", "b", "c"}
# Files of other projects, cited by their own paths.
EXTERNAL = {"inference/model.py",  # DeepSeek-V3's inference code
            # on a TPU VM worker: launch/tpu_vm.sh's checkout in ~/deepjax and its venv
            "deepjax/.venv", "deepjax/.venv/bin/python", "deepjax/pyproject.toml"}
FILE_EXT = r"(?:py|md|sh|ipynb|png|toml|json|jsonl|txt|cfg|yaml|yml|safetensors)"
ROOTS = ("deepjax", "tests", "bench", "docs", "configs", "launch", "colab")


def _walk():
    for d, subdirs, files in os.walk(REPO):
        subdirs[:] = [s for s in subdirs if s not in SKIP_DIRS and not s.endswith(".egg-info")]
        yield from (pathlib.Path(d, f) for f in files)


@functools.lru_cache(None)
def _tree():
    files = sorted(str(p.relative_to(REPO)) for p in _walk())
    dirs = {str(pathlib.PurePath(f).parents[i]) for f in files for i in range(len(pathlib.PurePath(f).parents) - 1)}
    modules = {}  # dotted name -> path of the .py file (package: its __init__.py)
    for f in files:
        if f.startswith("deepjax/") and f.endswith(".py"):
            parts = f[:-3].split("/")
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = REPO / f
    return files, dirs, modules


def _sources():
    """The files checked: deepjax/**/*.py, bench/**/*.py, tests/*.py, README.md, docs/*.md but LOG.md."""
    out = sorted((REPO / "deepjax").rglob("*.py")) + sorted((REPO / "bench").rglob("*.py"))
    out += [p for p in sorted((REPO / "tests").glob("*.py")) if p.resolve() != HERE]
    out += [REPO / "README.md"] + [p for p in sorted((REPO / "docs").glob("*.md")) if p.name != "LOG.md"]
    return [p for p in out if not SKIP_DIRS & set(p.relative_to(REPO).parts)]


@functools.lru_cache(None)
def _top_names(path: pathlib.Path) -> frozenset:
    """Names bound at module level (defs, classes, assignments, imports, also under if / try), and for a package
    its submodules."""
    names = set()

    def visit(body):
        for n in body:
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(n.name)
            elif isinstance(n, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                for t in n.targets if isinstance(n, ast.Assign) else [n.target]:
                    names.update(x.id for x in ast.walk(t) if isinstance(x, ast.Name))
            elif isinstance(n, (ast.Import, ast.ImportFrom)):
                names.update((a.asname or a.name).split(".")[0] for a in n.names)
            elif isinstance(n, (ast.If, ast.Try, ast.With)):
                visit(n.body + getattr(n, "orelse", []) + getattr(n, "finalbody", []) +
                      [s for h in getattr(n, "handlers", []) for s in h.body])

    visit(ast.parse(path.read_text()).body)
    if path.name == "__init__.py":
        names.update(p.stem for p in path.parent.glob("*.py"))
        names.update(p.name for p in path.parent.iterdir() if (p / "__init__.py").exists())
    return frozenset(names)


@functools.lru_cache(None)
def _fields(path: str, cls: str) -> frozenset:
    node = next(n for n in ast.parse((REPO / path).read_text()).body if isinstance(n, ast.ClassDef) and n.name == cls)
    return frozenset(n.target.id for n in node.body if isinstance(n, ast.AnnAssign))


def _stems():
    """stem -> modules of that stem (packages included)."""
    out = {}
    for name, path in _tree()[2].items():
        out.setdefault(name.rsplit(".", 1)[-1], []).append(path)
    return out


def _file_exists(ref: str, src: pathlib.Path) -> bool:
    files, dirs, _ = _tree()
    ref = ref.rstrip("/.")
    if ref in EXTERNAL:
        return True
    if "*" in ref:
        return bool(glob.glob(str(REPO / ref)) or glob.glob(str(src.parent / ref)))
    if ref in dirs or (REPO / ref).exists() or (src.parent / ref).exists():
        return True
    return any(f == ref or f.endswith("/" + ref) for f in files)


def _dotted_ok(ref: str) -> bool:
    modules = _tree()[2]
    parts = ref.split(".")
    for i in range(len(parts), 0, -1):
        mod = ".".join(parts[:i])
        if mod in modules:
            return i == len(parts) or parts[i] in _top_names(modules[mod])
    return False


def _attr_ok(stem: str, attr: str) -> bool:
    if stem in SECTIONS and attr in _fields(*SECTIONS[stem]):
        return True
    return any(attr in _top_names(p) for p in _stems().get(stem, ()))


FILE_RE = re.compile(rf"(?<![\w/.-])([\w-]+\.{FILE_EXT})\b")
PATH_RE = re.compile(rf"(?<![\w/.-])((?:{'|'.join(ROOTS)})/[\w./*-]*)")
DOTTED_RE = re.compile(r"(?<![\w/.-])(deepjax(?:\.[A-Za-z_]\w*)+)")
TICKS_RE = re.compile(r"`([^`\n]+)`")
ATTR_RE = re.compile(rf"(?<![\w./-])([a-z_][a-z0-9_]*)\.([A-Za-z_]\w*)\b(?!\.{FILE_EXT}\b)")
RETIRED_RE = re.compile(rf"\b({'|'.join(RETIRED)})\b")


def _prose(path: pathlib.Path, text: str) -> dict:
    """{line number: prose on it}: all of a Markdown file; a Python file's docstrings, comments, raise statements
    (error messages) and import lines, not its other string literals (`tmp_path / "worker.py"` is a file a test
    writes, `what="train_step"` a record's name)."""
    lines = text.splitlines()
    if path.suffix != ".py":
        return dict(enumerate(lines, 1))
    if not (FILE_RE.search(text) or RETIRED_RE.search(text)):
        return {}  # nothing for the caller to look at: skip the parse
    out = {n: line for n, line in enumerate(lines, 1) if re.match(r"\s*(from|import)\s", line)}

    def visit(body):  # statement lists only: docstrings open a module, class or function body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(
                body[0].value.value, str):
            out.update((n, lines[n - 1]) for n in range(body[0].lineno, body[0].end_lineno + 1))
        for node in body:
            if isinstance(node, ast.Raise):
                out.update((n, lines[n - 1]) for n in range(node.lineno, node.end_lineno + 1))
            for field in ("body", "orelse", "finalbody"):
                if isinstance(getattr(node, field, None), list):
                    visit(getattr(node, field))
            for h in getattr(node, "handlers", ()):
                visit(h.body)

    visit(ast.parse(text).body)
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string
    return out


def _placeholder(ref: str) -> bool:
    return bool(PLACEHOLDERS & set(re.split(r"[./]", ref)))


def stale_references(path: pathlib.Path, text: str) -> list[str]:
    out = []
    prose = _prose(path, text)
    name = path.relative_to(REPO)
    for n, line in enumerate(text.splitlines(), 1):
        where = f"{name}:{n}"
        for m in FILE_RE.finditer(prose.get(n, "")):
            if m.group(1).endswith(".py") and not _file_exists(m.group(1), path):
                out.append(f"{where}: file {m.group(1)}")
        for m in PATH_RE.finditer(line):
            ref = m.group(1).rstrip(".,;:)")
            if ref.count("/") and not _placeholder(ref) and not _file_exists(ref, path):
                out.append(f"{where}: path {ref}")
        for m in DOTTED_RE.finditer(line):
            if not _placeholder(m.group(1)) and not _dotted_ok(m.group(1)):
                out.append(f"{where}: {m.group(1)}")
        for span in TICKS_RE.findall(line):
            for m in ATTR_RE.finditer(span):
                stem, attr = m.groups()
                if re.fullmatch(FILE_EXT, attr) or attr in PLACEHOLDERS:
                    continue
                if (stem in _stems() or stem in OLD_STEMS) and not _attr_ok(stem, attr):
                    out.append(f"{where}: `{stem}.{attr}`")
        for m in RETIRED_RE.finditer(prose.get(n, "")):
            out.append(f"{where}: retired module name {m.group(1)}")
    return out


def test_references_name_what_exists():
    stale = [s for p in _sources() for s in stale_references(p, p.read_text())]
    assert not stale, "\n".join(stale)


def test_the_check_finds_stale_names():
    src = REPO / "README.md"
    for bad in ("weights as `decode_fused.fuse_block` makes them", "the `fused.fuse_blocks` dict",
                "see `deepjax/infer/fused.py`", "(deepjax.infer.fast.fused.no_such_name)", "deepjax.infer.fused",
                "tests/test_grpo_run.py", "model.py", "`rl.no_such_field`", "`nn.rms_norm`"):
        assert stale_references(src, bad), bad
    for good in ("`fused.fuse_block`", "deepjax.infer.fast.fused.fuse_block", "`deepjax/infer/fast/fused.py`",
                 "`rl.loss.beta`", "`model.init`", "tests/test_gpu_*.py", "`config.json`", "`jax.nn.softmax`",
                 "DeepSeek's `inference/model.py`", "make_train_step"):
        assert not stale_references(src, good), good
    py = REPO / "deepjax" / "infer" / "sampling.py"
    assert stale_references(py, 'f = tmp_path / "worker.py"  # the worker.py it writes\n') == [
        "deepjax/infer/sampling.py:1: file worker.py"]  # the comment is prose, the string literal is not
    assert stale_references(py, 'from deepjax.rl import evaluate as run_eval\n')  # retired names: imports,
    assert stale_references(py, 'def f(mode):\n    raise ValueError(f"kernels_grouped: {mode}")\n')  # errors,
    assert not stale_references(py, 'rec = dict(what="train_step")\n')  # not any string


OUTSIDE_RE = re.compile(r"DEEPSEEK\.md|(?<![\w-])shared/(?:anchors|device|DEEPSEEK)|\.\./shared\b|/work/")


def test_nothing_points_outside_the_repository():
    """The numbers' sources live in docs/deepseek.md and the anchors in bench/anchors/; docs/LOG.md (dated history)
    may name where a figure was measured."""
    hits = [f"{p.relative_to(REPO)}:{i}: {line.strip()[:100]}" for p in _sources()
            for i, line in enumerate(p.read_text().splitlines(), 1) if OUTSIDE_RE.search(line)]
    assert not hits, "\n".join(hits)
    assert OUTSIDE_RE.search("see ../shared/anchors/README.md") and OUTSIDE_RE.search("(DEEPSEEK.md section 1)")

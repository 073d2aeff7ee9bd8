"""The package layout: no import cycles, no function-level imports but the lazy ones on purpose, the layers
(parallel below the model, the model below train / infer / rl), and every module importable in a fresh interpreter.

The graph is read from each module's explicit imports (AST): `from deepjax.a.b import x` depends on deepjax.a.b when
that is a module, else on the package deepjax.a.b (its __init__).
"""

import ast
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent / "deepjax"
LAZY_MARK = "lazy on purpose"


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = p.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


MODULES = _modules()


def _imports(path: pathlib.Path):
    """[(target module, lineno, at module level)] of the deepjax imports in a file."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                     for a in node.names]
        else:
            continue
        for n in names:
            yield n, node.lineno, id(node) in top


def _graph() -> dict[str, set[str]]:
    return {m: {t for t, _, _ in _imports(p) if t in MODULES and t != m} for m, p in MODULES.items()}


def _cycle(graph):
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state and (c := visit(t)):
                return c
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_no_import_cycles():
    assert _cycle(_graph()) is None, " -> ".join(_cycle(_graph()))


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_function_level_imports_are_only_the_lazy_ones_on_purpose():
    bad = []
    for m, p in MODULES.items():
        lines = p.read_text().splitlines()
        tree = ast.parse(p.read_text())
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                if LAZY_MARK not in lines[node.lineno - 1]:
                    bad.append(f"{p.relative_to(ROOT.parent)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not bad, "function-level imports without a '# lazy on purpose: <why>' comment:\n" + "\n".join(bad)


def test_layers():
    """parallel knows nothing of the model; model nothing of train / infer / rl / data; infer not train / rl."""
    forbidden = {"deepjax.parallel": ("deepjax.model", "deepjax.train", "deepjax.infer", "deepjax.rl", "deepjax.data",
                                      "deepjax.config"),
                 "deepjax.model": ("deepjax.train", "deepjax.infer", "deepjax.rl", "deepjax.data", "deepjax.config"),
                 "deepjax.infer": ("deepjax.train", "deepjax.rl", "deepjax.config"),
                 "deepjax.data": ("deepjax.model", "deepjax.parallel", "deepjax.train", "deepjax.infer", "deepjax.rl",
                                  "deepjax.config")}
    graph = _graph()
    bad = [(m, t) for m, ts in graph.items() for t in ts for pkg, no in forbidden.items()
           if (m == pkg or m.startswith(pkg + ".")) and any(t == n or t.startswith(n + ".") for n in no)]
    assert not bad, bad


def test_every_module_imports_in_a_fresh_interpreter():
    names = sorted(MODULES)
    code = "import importlib\nfor m in %r:\n    importlib.import_module(m)\n" % names
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd=str(ROOT.parent))
    assert r.returncode == 0, r.stderr[-3000:]

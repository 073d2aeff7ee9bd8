"""The package as users install it: sdist -> wheel (as `pip install git+...` and `python -m build` do), installed
without `-e` into a directory of its own, then imported and run from outside the checkout.

The test environment also holds the editable install of the checkout, which would quietly answer for any module
the wheel lacks; every imported module's `__file__` must therefore lie inside the installed copy."""

import glob
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

from deepjax import model as M
from deepjax.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _packages_in_checkout() -> set[str]:
    """Every package of the checkout's deepjax/ (a directory with an __init__.py), as a path 'deepjax/a/b'."""
    found = set()
    for root, dirs, files in os.walk(os.path.join(REPO, "deepjax")):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        if "__init__.py" in files:
            found.add(os.path.relpath(root, REPO).replace(os.sep, "/"))
    return found


def _build(hook: str, src: str, out: str) -> str:
    """Runs a PEP 517 hook of the project's backend (setuptools.build_meta) in `src`; returns the built file."""
    code = f"import sys; from setuptools import build_meta as b; print(b.{hook}(sys.argv[1]))"
    r = subprocess.run([sys.executable, "-c", code, out], cwd=src, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return os.path.join(out, r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """(sdist, wheel, installed directory): the sdist from a copy of the checkout without build leftovers (a stale
    *.egg-info/SOURCES.txt would add files the configuration does not name), the wheel from the unpacked sdist."""
    tmp = tmp_path_factory.mktemp("dist")
    tree = tmp / "tree"
    shutil.copytree(REPO, tree, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "runs"))
    sdist = _build("build_sdist", str(tree), str(tmp))
    with tarfile.open(sdist) as tf:
        tf.extractall(tmp / "src", filter="data")
    (src,) = glob.glob(str(tmp / "src" / "deepjax-*"))
    wheel = _build("build_wheel", src, str(tmp))
    target = tmp / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                        str(target), wheel], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return sdist, wheel, str(target)


def _env(site: str) -> dict:
    env = dict(os.environ, PYTHONPATH=site)  # conftest's JAX_PLATFORMS and XLA_FLAGS carry over
    env.pop("PYTHONSAFEPATH", None)
    return env


def test_wheel_and_sdist_ship_every_subpackage_and_the_configs(dist):
    sdist, wheel, _ = dist
    packages = _packages_in_checkout()
    assert {"deepjax", "deepjax/model", "deepjax/train", "deepjax/infer/fast", "deepjax/configs"} <= packages
    with zipfile.ZipFile(wheel) as z:
        in_wheel = set(z.namelist())
    with tarfile.open(sdist) as tf:
        in_sdist = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    for pkg in sorted(packages):
        assert f"{pkg}/__init__.py" in in_wheel, f"{pkg} missing from the wheel"
        assert f"{pkg}/__init__.py" in in_sdist, f"{pkg} missing from the sdist"
    for name in ("tiny", "bench", "deepseek_v3", "r1zero"):
        assert f"deepjax/configs/{name}.py" in in_wheel


def test_installed_copy_imports_every_module_from_itself(dist, tmp_path):
    _, _, site = dist
    modules = sorted(
        os.path.relpath(p, site)[:-3].replace(os.sep, ".").removesuffix(".__init__")
        for p in glob.glob(os.path.join(site, "deepjax", "**", "*.py"), recursive=True))
    assert len(modules) > 40 and "deepjax.model.mla" in modules and "deepjax.configs.tiny" in modules
    code = ("import importlib, sys\n"
            "bad = []\n"
            "for m in sys.argv[2:]:\n"
            "    f = importlib.import_module(m).__file__\n"
            "    if not f.startswith(sys.argv[1]): bad.append((m, f))\n"
            "print(len(sys.argv) - 2, bad)\n")
    r = subprocess.run([sys.executable, "-c", code, site + os.sep, *modules], cwd=tmp_path, env=_env(site),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == f"{len(modules)} []", r.stdout


def test_installed_command_runs_info_and_train_on_its_defaults(dist, tmp_path):
    """`deepjax info` with overrides (its output checked against the library), then `deepjax train` as a newcomer
    first types it: no config, no workdir, only the step count shortened."""
    _, _, site = dist
    exe = os.path.join(site, "bin", "deepjax")
    overrides = ["--config.model.n_routed_experts=4", "--config.model.n_group=2"]
    r = subprocess.run([exe, "info", "tiny", *overrides], cwd=tmp_path, env=_env(site), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = load_config("tiny", overrides)
    _, params = M.abstract_init(cfg.model)
    out = r.stdout
    for label, n in [("total", M.count_params(params)),
                     ("main model (without MTP)", M.count_params(params, include_mtp=False)),
                     ("activated per token", M.count_active_params(cfg.model, params))]:
        assert any(line.startswith(label) and f" {n:,}" in line for line in out.splitlines()), (label, n, out)
    assert "logits           [2, 32, 512] float32" in out
    assert "expert_load      [2, 4] float32" in out  # 2 MoE layers x 4 experts: the overrides took effect
    assert "logits finite: True" in out
    # One load line per MoE layer (layers 1 and 2; layer 0 is dense) and one for the MTP module.
    assert [line.split()[:2] for line in out.splitlines() if "MaxVio" in line] == [
        ["layer", "1"], ["layer", "2"], ["mtp", "1"]]

    r = subprocess.run([exe, "train", "--config.train.steps=2"], cwd=tmp_path, env=_env(site), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "tiny"
    assert "step 2: loss" in r.stdout and os.path.getsize(run / "metrics.jsonl") > 0, r.stdout[-2000:]
    assert os.listdir(run / "checkpoints") == ["2"]

"""The `deepjax` command: errors, help; CI = README. (`info` and `train` end to end, run from the installed wheel:
tests/test_packaging.py.)"""

import json
import os
import re
import subprocess
import sys

from deepjax import cli
from deepjax import model as M
from deepjax.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args: str) -> subprocess.CompletedProcess:
    # The environment carries conftest's XLA_FLAGS (cheap compiles) and JAX_PLATFORMS=cpu.
    return subprocess.run([sys.executable, "-m", "deepjax", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_bad_override_exits_2_naming_the_field():
    r = _run("info", "tiny", "--config.model.hidden_size=abc")
    assert r.returncode == 2
    assert "hidden_size" in r.stderr and "'abc'" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_invalid_config_exits_2(capsys):
    assert cli.main(["info", "tiny", "--config.model.num_experts_per_tok=9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deepjax: error: model.num_experts_per_tok=9") and err.count("\n") == 1
    assert cli.main(["info", "no_such_config"]) == 2
    assert "'no_such_config'" in capsys.readouterr().err
    assert cli.main(["info", "tiny", "--batch=2", "--bogus"]) == 2
    assert "--bogus" in capsys.readouterr().err


def test_large_model_is_shapes_only(capsys):
    assert cli.main(["info", "deepseek_v3"]) == 0
    out = capsys.readouterr().out
    assert "main model (without MTP)          671,026,419,200" in out
    assert "forward: skipped" in out and "logits" not in out
    lines = out.splitlines()
    groups = [line.split()[0] for line in lines[lines.index("") + 2:] if line and not line.startswith(" ")]
    assert groups[:6] == ["embed", "dense_layers", "moe_layers", "norm.weight", "head", "mtp"]


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: deepjax") and "info" in out


def test_ci_runs_the_readme_test_command():
    """The README's second Quickstart block is what CI runs first, verbatim (the Python 3.12 leg follows it)."""
    with open(os.path.join(REPO, "README.md")) as f:
        blocks = re.findall(r"```bash\n(.*?)\n```", f.read().split("## Quickstart")[1].split("\n## ")[0], re.S)
    assert len(blocks) == 2
    with open(os.path.join(REPO, ".ci", "run")) as f:
        commands = [line for line in f.read().splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert commands[0] == blocks[1] and len(commands) > 1 and "python3.12" in commands[-1]
    # the first block installs and runs the main job, the R1-Zero story, on its built-in default
    assert blocks[0].endswith("pip install -e . && deepjax r1zero")
    from deepjax import cli
    assert cli.parser().parse_args(["r1zero"]).config == "r1zero"
    assert os.access(os.path.join(REPO, ".ci", "run"), os.X_OK)


def test_compile_cache_env(tmp_path):
    """DEEPJAX_COMPILE_CACHE=DIR writes jax's persistent compilation cache there (a whole `deepjax info` run); off
    (and the CPU default) turns nothing on and makes no directory, which `cli.main` decides before any command runs
    (`compile_cache`, probed case by case in one fresh process: each decision starts from an unset cache directory
    and the environment of its case, and none of them starts jax's backend)."""
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "xdg"), DEEPJAX_COMPILE_CACHE_MIN_SECS="0")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env.pop("DEEPJAX_COMPILE_CACHE", None)
    cache = tmp_path / "cache"
    r = subprocess.run([sys.executable, "-m", "deepjax", "info", "tiny"], cwd=REPO, capture_output=True, text=True,
                       timeout=300, env=dict(env, DEEPJAX_COMPILE_CACHE=str(cache)))
    assert r.returncode == 0, r.stderr
    assert cache.is_dir() and any(cache.iterdir())
    # deciding never starts jax's backend (on several processes jax.distributed.initialize must come first)
    # FAKE: a stand-in accelerator plugin (any importable module), so that "unset" turns the cache on and "off" must
    # turn it off again. One process for the cases (importing deepjax is most of a probe's time): each case sets its
    # environment (JAX_PLATFORMS in jax's config too, as a fresh process would read it) and an unset cache directory.
    probe = ("import json, os, sys, jax; from jax._src import xla_bridge as xb; from deepjax import cli\n"
             "plugins = cli.ACCELERATOR_PLUGINS\n"
             "for extra in json.loads(sys.argv[1]):\n"
             "    for k in ('JAX_PLATFORMS', 'FAKE', 'DEEPJAX_COMPILE_CACHE'): os.environ.pop(k, None)\n"
             "    os.environ.update(extra)\n"
             "    jax.config.update('jax_platforms', extra['JAX_PLATFORMS'] or None)\n"
             "    jax.config.update('jax_compilation_cache_dir', None)\n"
             "    cli.ACCELERATOR_PLUGINS = ('json',) if extra.get('FAKE') else plugins\n"
             "    d = cli.compile_cache(); assert not xb.backends_are_initialized(), extra\n"
             "    print(d, jax.config.jax_compilation_cache_dir, flush=True)\n")
    import importlib.util
    plugin = any(importlib.util.find_spec(m) for m in cli.ACCELERATOR_PLUGINS)
    cases = ((dict(JAX_PLATFORMS="cpu"), "None None"), (dict(JAX_PLATFORMS=""), "xla" if plugin else "None None"),
             (dict(JAX_PLATFORMS="", FAKE="1"), str(tmp_path / "xdg")),
             (dict(JAX_PLATFORMS="cpu", FAKE="1"), "None None"),
             (dict(JAX_PLATFORMS="", FAKE="1", DEEPJAX_COMPILE_CACHE="off"), "None None"))
    r = subprocess.run([sys.executable, "-c", probe, json.dumps([extra for extra, _ in cases])], cwd=REPO,
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, (r.stdout, r.stderr)
    lines = r.stdout.splitlines()
    assert len(lines) == len(cases), (r.stdout, r.stderr)
    for (extra, want), line in zip(cases, lines):
        assert want in line, (extra, line, r.stderr)

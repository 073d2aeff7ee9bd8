"""The Colab notebook's code runs as written (shell lines skipped); the TPU VM launcher builds the right
gcloud commands."""

import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_colab_quickstart_runs(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    with open(os.path.join(ROOT, "colab", "quickstart.ipynb")) as f:
        nb = json.load(f)
    ns: dict = {}
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        src = "".join(line for line in cell["source"] if not line.lstrip().startswith(("!", "%")))
        exec(compile(src, "quickstart.ipynb", "exec"), ns)
    assert ns["out"].logits.shape == (4, 64, ns["cfg"].vocab_size)
    assert (tmp_path / "expert_load.png").stat().st_size > 1000


def _dry(*args):
    env = dict(os.environ, DRY_RUN="1")
    return subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu_vm.sh"), *args], env=env,
                          capture_output=True, text=True)


def test_tpu_vm_launcher_commands():
    r = _dry("run", "pod", "us-east5-a", "--", "python", "-m", "deepjax", "info", "configs/bench.py")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("gcloud compute tpus tpu-vm ssh pod --zone us-east5-a --worker=all --command")
    assert "deepjax\\ info\\ configs/bench.py" in r.stdout
    r = _dry("create", "pod", "us-east5-a", "v5p-128")
    assert "--accelerator-type v5p-128" in r.stdout
    assert _dry("frobnicate", "pod", "zone").returncode == 2
    assert _dry("setup", "pod", "zone").returncode == 2  # the repository URL is required

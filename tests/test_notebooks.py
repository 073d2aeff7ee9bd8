"""Each Colab notebook (colab/*.ipynb) runs top to bottom in a Jupyter kernel (nbclient), on the toy budget its
`DEEPJAX_NOTEBOOK_SMALL=1` cell selects; a cell that raises fails the test. The install cell runs too: its `%pip`
line runs only on Colab (`"google.colab" in sys.modules`)."""

import json
import os
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLAB = os.path.join(ROOT, "colab")
NOTEBOOKS = ["quickstart", "r1zero", "checkpoints"]


def _run(name, tmp_path, monkeypatch):
    """Executes colab/NAME.ipynb with tmp_path as its working directory; returns the executed notebook."""
    monkeypatch.setenv("DEEPJAX_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    # one CPU device (as on Colab's CPU runtime, not conftest's 8), compiled cheaply (conftest's other flags)
    monkeypatch.setenv("XLA_FLAGS", os.environ["DEEPJAX_TEST_CHEAP_COMPILE"])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    # the kernel spec starts `python`: this interpreter's, where deepjax and ipykernel are installed
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    nb = nbformat.read(os.path.join(COLAB, f"{name}.ipynb"), as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError (the cell, the traceback) if a cell raises
    return nb


def _text(nb) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            out.append(o.get("text", "") or "".join(o.get("data", {}).get("text/plain", "")))
    return "".join(out)


def test_notebooks_install_only_on_colab_and_are_stored_without_outputs():
    for name in NOTEBOOKS:
        with open(os.path.join(COLAB, f"{name}.ipynb")) as f:
            nb = json.load(f)
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        install = "".join(code[0]["source"])
        assert 'if "google.colab" in sys.modules:\n    %pip install' in install, name
        for c in code:
            assert not c.get("outputs") and c.get("execution_count") is None, f"{name}: outputs stored"
            shell = [line for line in "".join(c["source"]).splitlines() if line.lstrip().startswith(("!", "%"))]
            assert c is code[0] or not shell, f"{name}: a shell line outside the install cell: {shell}"


def test_quickstart(tmp_path, monkeypatch):
    nb = _run("quickstart", tmp_path, monkeypatch)
    assert "MaxVio per MoE layer" in _text(nb)
    assert (tmp_path / "expert_load.png").stat().st_size > 1000


def test_r1zero(tmp_path, monkeypatch):
    nb = _run("r1zero", tmp_path, monkeypatch)
    text = _text(nb)
    for line in ("[1/4] base", "[4/4] evaluating the GRPO policy", "samples with a checkable answer", "--- grpo"):
        assert line in text, line
    summary = json.load(open(tmp_path / "runs" / "r1zero" / "r1zero.json"))
    assert summary["before"]["n_problems"] == summary["after"]["n_problems"] == 2
    assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


def test_checkpoints(tmp_path, monkeypatch):
    import jax
    import numpy as np

    from deepjax.model import hf

    nb = _run("checkpoints", tmp_path, monkeypatch)
    text = _text(nb)
    work = tmp_path / "checkpoints_demo"
    assert "run directory (checkpoint step 0)" in text and "HF checkpoint directory (from step 3)" in text
    # the export holds the stand-in's tensors, changed by the fine-tuning
    (_, _, before), (_, _, after) = hf.load(str(work / "hf_tiny")), hf.load(str(work / "hf_out"))
    change = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), before, after)
    assert max(jax.tree.leaves(change)) > 0
    # greedy samples: the HF stand-in, the fine-tuned run directory, its export; the last two are the same text
    stdout = ["".join(o.get("text", "") for o in c.get("outputs", []) if o.get("name") == "stdout") for c in nb.cells]
    hf_in, run, hf_out = [t for t in stdout if "tokens/s)" in t]
    greedy = run.rstrip("\n").rsplit("\n", 1)[0]  # less the `N tokens in S s` line
    assert greedy.strip() and greedy in hf_out

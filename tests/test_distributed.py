"""Multi-host data wiring (single- and two-process) and the TPU-topology compile check."""

import importlib.util
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from deepjax.parallel import distributed as D
from deepjax.parallel import sharding as S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_single_process_rows_and_global_batch():
    mcfg = S.MeshConfig(data=2, fsdp=2, expert=2)
    mesh, rules = S.make_mesh(mcfg), S.rules_for(mcfg.rules)
    rows = D.process_rows(16, mesh, rules)
    assert (rows.start, rows.stop) == (0, 16)
    local = np.arange(16 * 5, dtype=np.int32).reshape(16, 5)
    arr = D.global_batch(local[rows], 16, mesh, rules)
    np.testing.assert_array_equal(np.asarray(arr), local)
    assert arr.sharding == S.batch_spec(mesh, rules)
    D.initialize()  # one process: a no-op, must not raise


def test_coordinator_from_environment(monkeypatch):
    """jax reads only JAX_COORDINATOR_ADDRESS; deepjax adds the count and id (a manual GPU / CPU cluster)."""
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.delenv("JAX_NUM_PROCESSES", raising=False)
    assert D._from_env() == {}  # left to jax's SLURM / Open MPI detection
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    assert D._from_env() == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
    for pid in ("4", "-1"):
        monkeypatch.setenv("JAX_PROCESS_ID", pid)
        with pytest.raises(ValueError, match="JAX_PROCESS_ID"):
            D._from_env()
    monkeypatch.delenv("JAX_PROCESS_ID")
    with pytest.raises(ValueError, match="JAX_PROCESS_ID"):
        D._from_env()
    monkeypatch.setenv("JAX_NUM_PROCESSES", "four")
    with pytest.raises(ValueError, match="must be integers"):
        D._from_env()


_WORKER = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    sys.path.insert(0, {root!r})
    import numpy as np
    from deepjax.parallel import distributed as D
    from deepjax.parallel import sharding as S
    pid = int(sys.argv[1])
    D.initialize(coordinator_address="127.0.0.1:{port}", num_processes=2, process_id=pid)
    mcfg = S.MeshConfig(data=2, fsdp=4)
    mesh, rules = S.make_mesh(mcfg), S.rules_for(mcfg.rules)
    rows = D.process_rows(8, mesh, rules)
    full = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    arr = D.global_batch(full[rows], 8, mesh, rules)  # this host never sees the other rows
    total = jax.jit(lambda x: (x * x).sum())(arr)
    print("ROWS", pid, rows.start, rows.stop, "TOTAL", float(total), flush=True)
""")


def test_two_processes_each_feed_their_rows(tmp_path):
    """Two jax processes on loopback (4 CPU devices each) form one 8-device mesh; each loads only its half of
    the batch, and a global reduction sees all of it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "worker.py"
    script.write_text(_WORKER.format(root=ROOT, port=port))
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    procs = [subprocess.Popen([sys.executable, str(script), str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
        outs.append(next(line for line in out.splitlines() if line.startswith("ROWS")))
    spans = sorted(tuple(int(x) for x in o.split()[2:4]) for o in outs)
    assert spans == [(0, 4), (4, 8)]
    want = float((np.arange(24, dtype=np.float32) ** 2).sum())
    for o in outs:
        assert float(o.split()[-1]) == want


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (the `tpu` extra)")
def test_compile_check_bench_on_v5p_2x2x1(capsys):
    from deepjax.train import compile_check

    rc = compile_check.main(["bench", "--topology", "v5p:2x2x1", "--batch", "8", "--seq", "256",
                             "--mesh.fsdp=2", "--mesh.expert=2", "--micro-batches", "2"])
    out = capsys.readouterr().out
    import json

    rep = json.loads(out)
    assert rc == 0 and rep["fits"]
    assert rep["chips"] == 4 and rep["mesh"]["expert"] == 2
    # Parameters + AdamW state per chip: the bench model's 1.25B params sharded 4 ways (fsdp x expert on
    # experts, fsdp on the rest): arguments must be well under the unsharded 1.25e9 x 12 bytes.
    assert 0 < rep["argument_gib"] < 1.25e9 * 12 / 2**30 / 2
    assert rep["flops_per_chip"] > 0

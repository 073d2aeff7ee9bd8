"""Run directories on Google Cloud Storage (deepjax/paths.py, docs/storage.md), against a GCS JSON API on loopback.

The API is `gcp-storage-emulator`, started here in a subprocess on a free port, with two gaps filled (the shim in
EMULATOR): its media downloads carry no `x-goog-generation` header, which tensorstore's GCS driver (Orbax's arrays)
needs ("Malformed StorageGeneration" without it), and it ignores the ifGenerationMatch / ifGenerationNotMatch
preconditions of a download (tensorstore revalidates cached reads with them: 304 / 412 expected). The clients find
it through their own settings: STORAGE_EMULATOR_HOST (gcsfs, which etils.epath uses for gs://, and
google-cloud-storage), TENSORSTORE_GCS_HTTP_URL (tensorstore).

What is checked: a `deepjax train` to gs:// killed with SIGKILL and resumed there ends bitwise equal to a straight
run (state, data order, run directory: config.json, metrics.jsonl, TensorBoard events, train_curves.png, manifests);
the checkpoint guarantees on GCS (an unfinished step is never listed, a damaged one is named and moved aside, the
retention); the logs, plots and eval helpers on gs://; the one-line errors for paths deepjax cannot use.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import jax
import jax.numpy as jnp
import pytest

pytest.importorskip("gcp_storage_emulator")
pytest.importorskip("gcsfs")

from deepjax import paths  # noqa: E402
from deepjax.config import load_config  # noqa: E402
from deepjax.parallel import sharding as S  # noqa: E402
from deepjax.train import checkpoint as C  # noqa: E402
from deepjax.train import run as TR  # noqa: E402
from test_train import assert_same_final_state  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "deepjax-test"

EMULATOR = r'''
import sys
from http import HTTPStatus
from gcp_storage_emulator import server
from gcp_storage_emulator.handlers import objects

plain = objects.download

def download(request, response, storage, *args, **kwargs):
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:
        obj = None
    if obj is not None:
        gen, q = str(obj["generation"]), request.query
        if "ifGenerationMatch" in q and q["ifGenerationMatch"][0] != gen:
            response.status = HTTPStatus.PRECONDITION_FAILED
            return
        if "ifGenerationNotMatch" in q and q["ifGenerationNotMatch"][0] == gen:
            response.status = HTTPStatus.NOT_MODIFIED
            return
        response["x-goog-generation"] = gen
        response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
    return plain(request, response, storage, *args, **kwargs)

objects.download = download  # objects.get (alt=media) calls it by name
server.HANDLERS = tuple((rx, {m: download if h is plain else h for m, h in hs.items()}) for rx, hs in server.HANDLERS)
server.create_server("127.0.0.1", int(sys.argv[1]), in_memory=True, default_bucket=sys.argv[2]).run()
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The emulator's environment (also set in this process while the module runs)."""
    port = _free_port()
    log = open(tmp_path_factory.mktemp("emulator") / "emulator.log", "w")
    proc = subprocess.Popen([sys.executable, "-c", EMULATOR, str(port), BUCKET], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(url + "/", timeout=1).read()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"the GCS emulator did not start (exit {proc.poll()})")
            time.sleep(0.2)
    env = {"STORAGE_EMULATOR_HOST": url,  # gcsfs (etils.epath gs://), google-cloud-storage
           "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore's gcs driver (Orbax's arrays)
           "TENSORSTORE_GCS_REQUEST_CONCURRENCY": "8",  # the emulator serves one request at a time
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # no bucket-type lookup through the gRPC control API
           "GOOGLE_CLOUD_PROJECT": "test", "NO_GCE_CHECK": "true"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def _gs(*parts: str) -> paths.Path:
    return paths.Path(f"gs://{BUCKET}", *parts)


# ----------------------------------------------------------------------------------------- train, killed, resumed


def _train(workdir: str, args, env_extra):
    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, "-m", "deepjax", "train", "tiny", "--workdir", workdir, "--no-progress",
                           *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_train_killed_and_resumed_on_gcs_equals_the_straight_run(gcs, tmp_path, compile_cache, capsys):
    """The straight run and the resumption run in this process (`cli.main`), the SIGKILLed one in a subprocess; the
    persistent compilation cache (conftest's `compile_cache`) compiles each program once between them."""
    from deepjax import cli
    N = 2
    args = ["--config.data.template=plain", "--config.data.seq_len=96", "--config.data.global_batch=8",
            "--config.data.num_train=400", "--config.data.num_test=20", f"--config.data.data_dir={tmp_path}/tfds",
            "--config.train.log_every=1", "--config.train.plot=true", f"--config.train.steps={2 * N}",
            f"--config.train.checkpoint_every={N}",
            # one dense and one MoE layer, no MTP module: a third of tiny's compile time, the same files to store
            "--config.model.num_hidden_layers=2", "--config.model.num_nextn_predict_layers=0"]
    straight, resumed = str(_gs("straight")), str(_gs("resumed"))
    train = lambda d: cli.main(["train", "tiny", "--workdir", d, "--no-progress", *args])  # noqa: E731
    capsys.readouterr()
    assert train(straight) == 0
    assert f"workdir: {straight}" in capsys.readouterr().out
    killed = _train(resumed, args, {**compile_cache, TR.KILL_ENV: str(N + 1)})
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL after step N+1, the step-N checkpoint committed
    assert C.list_steps(f"{resumed}/checkpoints") == [N]
    assert train(resumed) == 0
    assert f"(step {N})" in capsys.readouterr().out

    h1, h2 = TR.read_history(f"{straight}/metrics.jsonl"), TR.read_history(f"{resumed}/metrics.jsonl")
    assert sorted(h1) == sorted(h2) == list(range(1, 2 * N + 1))
    assert [h1[s]["data"] for s in h1] == [h2[s]["data"] for s in h1]  # every step saw the same batch
    assert [h1[s]["loss"] for s in h1] == [h2[s]["loss"] for s in h1]
    cfg = load_config("tiny", args)
    abstract = TR.abstract_train_state(cfg, S.make_mesh(cfg.mesh), S.rules_for(cfg.mesh.rules))[-1]
    assert_same_final_state([f"{d}/checkpoints" for d in (straight, resumed)], abstract, 2 * N)
    # the run directory, in the bucket
    run = paths.Path(resumed)
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 2 * N
    assert (run / "train_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len([f for f in (run / "tb").iterdir() if f.name.startswith("events.out.tfevents")]) == 2  # 2 launches
    assert C.list_steps(run / "checkpoints") == [N, 2 * N]
    for s in (N, 2 * N):
        C.verify_step(run / "checkpoints" / str(s), s)  # manifest + CRC-32s, read back from the bucket
    from deepjax.infer import sample as SA
    assert SA.source_kind(resumed) == "run"


# ------------------------------------------------------------------------------------------ checkpoints on GCS


def _state(seed=0):
    return {"w": jnp.arange(1000, dtype=jnp.float32) + seed, "step": jnp.int32(seed)}


def test_checkpoint_guarantees_hold_on_gcs(gcs):
    root = _gs("ck", "checkpoints")
    ck = C.Checkpointer(root, keep=5, async_save=False)
    assert str(ck.directory) == str(root) and str(ck.damaged_dir) == str(_gs("ck", "damaged"))
    for s in (1, 2):
        assert ck.save(s, _state(s), {"next": s}, {"model": {}})
    ck.close()
    # a save cut off on GCS: Orbax writes the step in place and commits it with commit_success.txt, last
    (root / "3" / "state").mkdir(parents=True, exist_ok=True)
    (root / "3" / "state" / "partial").write_bytes(b"\0" * 10)
    ck = C.Checkpointer(root, keep=5, async_save=False)
    assert ck.steps() == [1, 2]
    step, state, data, _ = ck.restore(jax.eval_shape(_state))
    assert step == 2 and data == {"next": 2} and float(state["w"][0]) == 2.0
    # damage step 2: cut its largest file
    files = {rel: (root / "2" / rel).stat().length for rel in C._files(root / "2")}
    victim = root / "2" / max(files, key=files.get)
    victim.write_bytes(victim.read_bytes()[: files[max(files, key=files.get)] // 2])
    with pytest.raises(C.CheckpointError) as e:
        ck.restore(jax.eval_shape(_state))
    assert "step 2" in str(e.value) and str(victim) in str(e.value), e.value
    step, state, data, _ = ck.restore(jax.eval_shape(_state), fallback=True)
    assert step == 1 and float(state["w"][0]) == 1.0
    assert ck.steps() == [1] and (_gs("ck", "damaged", "2", C.MANIFEST)).exists()
    # saving the cut-off step again replaces it (Orbax deletes the unfinished directory first)
    ck.save(3, _state(3), {"next": 3}, {"model": {}})
    assert ck.steps() == [1, 3] and not (root / "3" / "state" / "partial").exists()
    assert ck.restore(jax.eval_shape(_state))[2] == {"next": 3}
    # retention: the newest `keep` good steps stay
    ck.keep = 1
    for s in (4, 5):
        ck.save(s, _state(s), {"next": s}, {"model": {}})
    ck.close()
    assert C.list_steps(root) == [5]


# ----------------------------------------------------------------------------------- logs, plots, eval helpers


def test_logs_plots_and_eval_files_on_gcs(gcs):
    from matplotlib.figure import Figure

    from deepjax.rl import loop as RL
    from deepjax.rl import r1zero

    work = _gs("logs")
    log = TR.MetricsLog(work, log_every=1, resume_step=0)
    for s in range(1, 7):
        log.write({"step": s, "loss": float(s)}, s)
    log.sync()
    assert [json.loads(x)["step"] for x in (work / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    log.close()
    (work / "metrics.jsonl").write_text((work / "metrics.jsonl").read_text() + '{"step": 7, "lo')  # a cut line
    log = TR.MetricsLog(work, log_every=1, resume_step=4)  # resumed from step 4
    for s in (5, 6, 7):
        log.write({"step": s, "loss": 10.0 * s}, s)
    log.close()
    assert [json.loads(x)["step"] for x in (work / "metrics.jsonl").read_text().splitlines()] == list(range(1, 8))
    assert TR.read_history(work / "metrics.jsonl")[5]["loss"] == 50.0
    assert len(list((work / "tb").iterdir())) == 2  # one event file per launch, copied to the bucket
    # eval.jsonl as GRPO writes it, truncated on resume
    ev = work / "eval.jsonl"
    for s in (2, 4, 6):
        paths.append_text(ev, json.dumps({"step": s, "pass@1": 0.1 * s}) + "\n")
    assert [e["step"] for e in TR.truncate_jsonl(ev, 4)] == [2, 4] and len(ev.read_text().splitlines()) == 2
    # plots and JSON written as `deepjax grpo` / `eval` / `r1zero` write them
    RL.plot_grpo({s: {"reward": 0.1 * s} for s in (1, 2, 3)}, [{"step": 2, "pass@1": 0.5, "cons@k": 0.5}],
                 work / "grpo_curves.png")
    assert (work / "grpo_curves.png").read_bytes()[:4] == b"\x89PNG"
    b = {"k": 4, "pass@1": 0.1, "cons@k": 0.2, "pass@k": 0.3, "answered": 0.5, "accuracy_when_answered": 0.2,
         "n_problems": 3}
    grpo = work / "grpo"
    recs = [{"step": s, "reward": 0.1 * s, "accuracy": 0.1, "format": 1.0} for s in (1, 2)]
    (grpo / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    paths.append_text(grpo / "eval.jsonl", json.dumps({"step": 2, "pass@1": 0.5}) + "\n")
    r1zero.plot(b, b, grpo, work / "r1zero.png")
    assert (work / "r1zero.png").exists()
    with paths.local_file(work / "eval_step1_scaling.png") as local:
        fig = Figure()
        fig.subplots().plot([1, 2])
        fig.savefig(local)
    assert (work / "eval_step1_scaling.png").read_bytes()[:4] == b"\x89PNG"
    paths.write_text_atomic(work / "eval_step1.json", json.dumps({"step": 1}))
    assert json.loads((work / "eval_step1.json").read_text()) == {"step": 1}
    # TFDS data stays on this machine under a gs:// run directory
    assert not paths.is_remote(TR.default_data_dir(work))
    assert TR.default_data_dir("/tmp/run") == "/tmp/run/tfds"


# ------------------------------------------------------------------------------------------------- bad input


def test_paths_deepjax_cannot_use_are_one_line_errors(monkeypatch, capsys):
    from deepjax import cli

    with pytest.raises(paths.StorageError, match=r"--workdir=s3://b/run: s3:// is not supported"):
        paths.run_path("s3://b/run")
    with pytest.raises(paths.StorageError, match="no bucket name"):
        paths.run_path("gs:///run")
    with pytest.raises(paths.StorageError, match=r"data.data_dir=gs://b/tfds: .*local file I/O only"):
        TR.check_data_dir("gs://b/tfds")
    monkeypatch.setattr(paths, "_has", lambda module: False)  # neither gcsfs nor tensorflow installed
    with pytest.raises(paths.StorageError, match=r"--workdir=gs://b/run: gs:// paths need the gcsfs package"):
        paths.run_path("gs://b/run")
    assert cli.main(["train", "tiny", "--workdir", "gs://b/run", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--workdir=gs://b/run" in err and "gcsfs" in err, err
    monkeypatch.undo()
    assert cli.main(["train", "tiny", "--workdir", "az://c/run", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "az:// is not supported" in err, err
    assert str(paths.run_path("rel/dir")) == os.path.abspath("rel/dir")  # local paths as before

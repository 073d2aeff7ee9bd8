"""The TPU VM launcher (launch/tpu_vm.sh) prints the gcloud commands it runs for every action, and its runs detach,
log, report and stop (a stand-in gcloud runs the remote commands on this machine). The Colab notebooks run in
tests/test_notebooks.py."""

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


LAUNCHER = os.path.join(ROOT, "launch", "tpu_vm.sh")


def _launch(*args, env=None, dry=True):
    env = dict(os.environ if env is None else env)
    if dry:
        env["DRY_RUN"] = "1"
    return subprocess.run(["bash", LAUNCHER, *args], env=env, capture_output=True, text=True, timeout=60)


def _dry(*args):
    return _launch(*args)


def _commands(r):
    """The gcloud commands a dry run printed (one per command; a --command script may span lines)."""
    assert r.returncode == 0, r.stderr
    text = "".join(line for line in r.stdout.splitlines(keepends=True) if not line.startswith("# "))  # hints
    return [c.rstrip("\n") for c in ("\n" + text).split("\ngcloud ")[1:]]


def _fake_gcloud(tmp_path, execute):
    """A `gcloud` on PATH that records its arguments (JSON lines) and, when `execute`, runs an ssh --command here
    with HOME=tmp_path/home (the worker), answering `tpu-vm describe` with an IP."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(f"""#!{sys.executable}
import json, os, subprocess, sys
a = sys.argv[1:]
with open(os.environ["GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(a) + "\\n")
if "describe" in a and "tpu-vm" in a:
    print(os.environ.get("FAKE_IP", "10.0.0.2"))
elif "ssh" in a and {execute!r}:
    sys.exit(subprocess.call(["bash", "-c", a[a.index("--command") + 1]],
                             env=dict(os.environ, HOME=os.environ["FAKE_HOME"])))
""")
    gcloud.chmod(gcloud.stat().st_mode | stat.S_IEXEC)
    home = tmp_path / "home"
    (home / "deepjax" / ".venv" / "bin").mkdir(parents=True, exist_ok=True)
    (home / "deepjax" / ".venv" / "bin" / "activate").write_text("export IN_VENV=1\n")
    log = tmp_path / "gcloud.jsonl"
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", GCLOUD_LOG=str(log),
               FAKE_HOME=str(home))
    env.pop("DRY_RUN", None)
    return env, log, home


def _recorded(log):
    if not log.exists():
        return []
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    log.unlink()
    return calls


TRAIN = ["deepjax", "train", "configs/deepseek_v3.py", "--workdir", "gs://bucket/runs/v3",
         "--config.train.steps=100", "--config.data.name=it's a \"test\""]

ACTIONS = [  # every action, single slice and multislice
    ("create", "pod", "us-east5-a", "v5p-128"),
    ("--slices", "2", "--spot", "--wait", "create", "pod", "us-east5-a", "v6e-256"),
    ("--best-effort", "create", "pod", "z", "v5litepod-16"),
    ("setup", "pod", "z", "https://github.com/me/deepjax.git", "dev"),
    ("--slices", "2", "setup", "pod", "z", "-"),
    ("copy", "pod", "z", "configs/NAME.py", "deepjax/configs/"),
    ("--run", "r1", "--env", "LIBTPU_INIT_ARGS=--xla_a=1 --xla_b=2", "run", "pod", "z", "--", *TRAIN),
    ("--slices", "2", "--run", "r1", "run", "pod", "z", "--", *TRAIN),
    ("--slices", "2", "exec", "pod", "z", "--", "deepjax", "info", "configs/bench.py"),
    ("--run", "r1", "--worker", "0", "logs", "pod", "z", "20"),
    ("status", "pod", "z"),
    ("--run", "r1", "--slices", "3", "stop", "pod", "z"),
    ("--project", "proj", "--internal-ip", "delete", "pod", "z"),
]


def test_tpu_vm_dry_run_every_action():
    def one(*args):
        return _commands(_dry(*args))

    # create: a queued resource, the image's runtime picked from the accelerator; multislice: --node-count
    c, = one("create", "pod", "us-east5-a", "v5p-128")[:1]
    assert c.startswith("compute tpus queued-resources create pod --zone us-east5-a --accelerator-type v5p-128 "
                        "--runtime-version v2-alpha-tpuv5 --node-id pod")
    cs = one("--slices", "2", "--spot", "--wait", "create", "pod", "z", "v6e-256")
    assert "--runtime-version v2-alpha-tpuv6e --node-count 2 --node-prefix pod --spot" in cs[0]
    assert cs[1].startswith("compute tpus queued-resources describe pod --zone z --format 'value(state.state)'")
    assert one("--best-effort", "create", "p", "z", "v5litepod-16")[0].startswith(
        "alpha compute tpus queued-resources create p --zone z --accelerator-type v5litepod-16 "
        "--runtime-version v2-alpha-tpuv5-lite --node-id p --best-effort")
    assert "--runtime-version tpu-ubuntu2204-base" in one("create", "p", "z", "v4-32")[0]
    assert "--runtime-version my-rt" in one("create", "p", "z", "v7x-8", "my-rt")[0]

    # setup: every worker, a Python 3.12 venv made by uv, the tpu extra
    s, = one("setup", "pod", "z", "https://github.com/me/deepjax.git", "dev")
    assert s.startswith("compute tpus tpu-vm ssh pod --zone z --worker=all --command ")
    for part in ("git clone -q https://github.com/me/deepjax.git deepjax", "fetch -q origin dev",
                 "python3 -m pip install -q --user uv", "uv venv -q --allow-existing --python 3.12 deepjax/.venv",
                 "uv pip install -q --python deepjax/.venv/bin/python -e '\\''./deepjax[tpu]'\\''"):
        assert part in s, part
    assert "python3 -m venv" not in s and "pip install -q -e" not in s  # not the image's Python 3.10
    s = one("--slices", "2", "setup", "pod", "z", "-")
    assert [c.split(" --command")[0] for c in s] == [
        "compute tpus tpu-vm ssh pod-0 --zone z --worker=all", "compute tpus tpu-vm ssh pod-1 --zone z --worker=all"]
    assert "git clone" not in s[0] and "test -f deepjax/pyproject.toml" in s[0]

    assert one("copy", "pod", "z", "configs/NAME.py", "deepjax/configs/") == [
        "compute tpus tpu-vm scp --recurse configs/NAME.py pod:deepjax/configs/ --zone z --worker=all"]

    # run: detached (setsid nohup), one log per worker, the command and its overrides passed through as given
    r, = one("--run", "r1", "--env", "LIBTPU_INIT_ARGS=--xla_a=1 --xla_b=2", "run", "pod", "z", "--", *TRAIN)
    assert r.startswith("compute tpus tpu-vm ssh pod --zone z --worker=all --command ")
    for part in ("setsid nohup bash ~/deepjax_logs/r1/run.sh > $f.log 2>&1 < /dev/null &",
                 "f=~/deepjax_logs/r1/worker-$(hostname)", "echo $$ > ~/deepjax_logs/r1/worker-$(hostname).pid",
                 "echo $? > ~/deepjax_logs/r1/worker-$(hostname).exit", "export LIBTPU_INIT_ARGS=--xla_a=1\\ --xla_b=2",
                 "deepjax train configs/deepseek_v3.py --workdir gs://bucket/runs/v3 --config.train.steps=100"):
        assert part in r, part
    assert "MEGASCALE" not in r  # one slice
    assert "# logs: launch/tpu_vm.sh --run r1 logs p z" in _dry("--run", "r1", "run", "p", "z", "--", "true").stdout

    # multislice: worker 0 of slice 0 is the fallback coordinator; each slice gets its own MEGASCALE_SLICE_ID
    d, r0, r1 = one("--slices", "2", "--run", "r1", "run", "pod", "z", "--", *TRAIN)
    assert d == "compute tpus tpu-vm describe pod-0 --zone z --format 'value(networkEndpoints[0].ipAddress)'"
    for i, r in enumerate((r0, r1)):
        assert r.startswith(f"compute tpus tpu-vm ssh pod-{i} --zone z --worker=all --command ")
        assert "instance/attributes/tpu-env | grep -q MEGASCALE_COORDINATOR_ADDRESS || export " \
               f"MEGASCALE_COORDINATOR_ADDRESS=COORDINATOR_IP:8081 MEGASCALE_NUM_SLICES=2 MEGASCALE_SLICE_ID={i} " \
               "MEGASCALE_PORT=8081" in r
    d, e0, e1 = one("--slices", "2", "exec", "pod", "z", "--", "deepjax", "info", "configs/bench.py")
    assert e1.startswith("compute tpus tpu-vm ssh pod-1 --zone z --worker=all --command 'cd ~/deepjax && ")
    assert "MEGASCALE_SLICE_ID=1" in e1 and e1.endswith("\ndeepjax info configs/bench.py'")

    assert one("--run", "r1", "--worker", "0", "logs", "pod", "z", "20") == [
        "compute tpus tpu-vm ssh pod --zone z --worker=0 --command "
        "'tail -n 20 ~/deepjax_logs/r1/worker-$(hostname).log | sed \"s/^/$(hostname)| /\"'"]
    q, s = one("status", "pod", "z")
    assert q == "compute tpus queued-resources describe pod --zone z --format 'value(state.state)'"
    assert "for d in ~/deepjax_logs/*/" in s
    stops = one("--run", "r1", "--slices", "3", "stop", "pod", "z")
    assert [c.split()[4] for c in stops] == ["pod-0", "pod-1", "pod-2"]
    assert all("kill -TERM -- -$p" in c and "~/deepjax_logs/r1/worker-$(hostname)" in c for c in stops)
    assert one("--project", "proj", "--internal-ip", "delete", "pod", "z") == [
        "compute tpus queued-resources delete pod --zone z --force --quiet --project proj"]
    assert one("--project", "proj", "--internal-ip", "--run", "r", "logs", "p", "z")[0].startswith(
        "compute tpus tpu-vm ssh p --zone z --worker=all --internal-ip --project proj --command ")


def test_tpu_vm_bad_arguments():
    for args in [("frobnicate", "pod", "zone"), ("setup", "pod", "zone"), ("logs", "pod", "zone"),
                 ("stop", "pod", "zone"), ("run", "pod", "zone"), ("create", "pod", "zone", "v9-8"),
                 ("--run", "a b", "logs", "p", "z"), ("--slices", "0", "status", "p", "z"),
                 ("--env", "NOEQUALS", "exec", "p", "z", "--", "true"), ("--nope", "status", "p", "z"), ("pod",)]:
        r = _dry(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert not r.stdout.startswith("gcloud"), args


def test_tpu_vm_dry_run_prints_what_runs(tmp_path):
    """The printed commands, run by a shell, are the exact gcloud calls the launcher makes."""
    env, log, _ = _fake_gcloud(tmp_path, execute=False)
    env["FAKE_IP"] = "COORDINATOR_IP"
    for args in ACTIONS:
        if "--wait" in args:
            continue
        r = _launch(*args, env=env, dry=False)
        assert r.returncode == 0, (args, r.stderr)
        real = _recorded(log)
        printed = _launch(*args, env=env)
        assert printed.returncode == 0 and not _recorded(log)  # a dry run calls nothing
        subprocess.run(["bash", "-c", printed.stdout], env=env, check=True)
        assert sorted(_recorded(log)) == sorted(real), args  # (slices set up / exec'd at once: any order)
        assert real and all(c[:2] in (["compute", "tpus"], ["alpha", "compute"]) for c in real)


@pytest.mark.skipif(not (shutil.which("setsid") and shutil.which("ps")), reason="needs setsid and ps")
def test_tpu_vm_run_detaches_logs_and_stops(tmp_path):
    """run / status / logs / stop against a fake gcloud that runs each ssh command here (HOME = the worker's)."""
    env, log, home = _fake_gcloud(tmp_path, execute=True)
    logs = home / "deepjax_logs"
    me = socket.gethostname()

    def wait_for(cond):
        deadline = time.time() + 10
        while not cond():
            assert time.time() < deadline
            time.sleep(0.05)

    def L(*args):
        r = _launch(*args, env=env, dry=False)
        return r

    cmd = ["bash", "-c", 'echo "venv=$IN_VENV args:$* env:$MY_VAR"; sleep 30', "x", "a b", "it's", "--config.x=1"]
    r = L("--run", "live", "--env", "MY_VAR=two words", "run", "pod", "z", "--", *cmd)
    assert r.returncode == 0, r.stderr
    assert "started live" in r.stdout  # the ssh command returned while the run goes on
    log_file = logs / "live" / f"worker-{me}.log"
    wait_for(lambda: log_file.exists() and "args" in log_file.read_text())
    assert log_file.read_text() == "venv=1 args:a b it's --config.x=1 env:two words\n"
    assert f"{me} live: running" in L("status", "pod", "z").stdout
    assert L("--run", "live", "logs", "pod", "z").stdout == f"{me}| venv=1 args:a b it's --config.x=1 env:two words\n"
    again = L("--run", "live", "run", "pod", "z", "--", "true")
    assert again.returncode == 1 and "live is already running" in again.stderr
    pid = int((logs / "live" / f"worker-{me}.pid").read_text())
    r = L("--run", "live", "stop", "pod", "z")
    assert r.returncode == 0 and f"{me}: stopped live" in r.stdout
    assert (logs / "live" / f"worker-{me}.exit").read_text() == "stopped\n"
    left = subprocess.run(["ps", "-o", "stat=", "-s", str(pid)], capture_output=True, text=True).stdout.split()
    assert all(st.startswith("Z") for st in left), left  # the whole session is gone (zombies where nothing reaps)

    r = L("--run", "fails", "run", "pod", "z", "--", "sh", "-c", "echo oops >&2; exit 3")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: (logs / "fails" / f"worker-{me}.exit").exists())
    assert (logs / "fails" / f"worker-{me}.exit").read_text() == "3\n"
    assert (logs / "fails" / f"worker-{me}.log").read_text() == "oops\n"
    status = L("status", "pod", "z").stdout
    assert f"{me} live: exited stopped" in status and f"{me} fails: exited 3" in status
    assert L("--run", "fails", "status", "pod", "z").stdout == f"{me} fails: exited 3\n"
    assert L("--run", "fails", "run", "pod", "z", "--", "true").returncode == 0  # a finished run id may be reused

    assert L("exec", "pod", "z", "--", "sh", "-c", "exit 4").returncode == 4
    calls = _recorded(log)
    assert all(c[:4] == ["compute", "tpus", "tpu-vm", "ssh"] and "--worker=all" in c
               or c[:4] == ["compute", "tpus", "queued-resources", "describe"] for c in calls)


def test_tpu_vm_multislice_env(tmp_path):
    """MEGASCALE_* from the launcher only where the VM's tpu-env metadata has none (a fake curl answers)."""
    env, log, _ = _fake_gcloud(tmp_path, execute=True)
    curl = tmp_path / "bin" / "curl"
    show = ["bash", "-c", 'echo "slice=${MEGASCALE_SLICE_ID:-none}/${MEGASCALE_NUM_SLICES:-none} '
            'at=${MEGASCALE_COORDINATOR_ADDRESS:-none} port=${MEGASCALE_PORT:-none}"']
    curl.write_text("#!/bin/sh\nexit 22\n")  # no tpu-env (slices not from one queued resource)
    curl.chmod(0o755)
    r = _launch("--slices", "2", "exec", "pod", "z", "--", *show, env=env, dry=False)
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.splitlines()) == ["slice=0/2 at=10.0.0.2:8081 port=8081",
                                             "slice=1/2 at=10.0.0.2:8081 port=8081"]
    calls = _recorded(log)
    assert calls[0] == ["compute", "tpus", "tpu-vm", "describe", "pod-0", "--zone", "z", "--format",
                        "value(networkEndpoints[0].ipAddress)"]
    assert sorted(c[4] for c in calls[1:]) == ["pod-0", "pod-1"]
    # the queued resource's tpu-env metadata
    curl.write_text("#!/bin/sh\necho \"MEGASCALE_COORDINATOR_ADDRESS: '10.1.1.1:8080'\"\n")
    r = _launch("--slices", "2", "exec", "pod", "z", "--", *show, env=env, dry=False)
    assert r.stdout.splitlines() == ["slice=none/none at=none port=none"] * 2  # jax / libtpu read the metadata


def test_tpu_vm_launcher_shell_checks():
    assert subprocess.run(["bash", "-n", LAUNCHER]).returncode == 0
    shellcheck = shutil.which("shellcheck")
    if shellcheck:
        r = subprocess.run([shellcheck, LAUNCHER], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout

"""Fault-injection soak for checkpoints and resume (issue 23): SIGKILLs of `deepjax train` and `deepjax grpo`,
bit flips / truncations / deletions of every kind of checkpoint file, bogus step directories and a full disk.

    PYTHONPATH=. python bench/faults.py --cpu                     # the tiny preset on CPU, about 15 minutes
    PYTHONPATH=. python bench/faults.py --cpu --kills 6 --budget-s 300   # a short pass

1. references: `train` (tiny, 12 steps, checkpoint every 2, keep 3) and `grpo` (tiny, random init, 6 GRPO steps,
   checkpoint every 2, held-out eval every 2) run straight once.
2. kills: trials alternate train / grpo. A trial relaunches the same command, SIGKILLing it each time (modes, see
   `launch`: a random moment of start-up; just after a random step is logged; as soon as the 1st / 2nd checkpoint
   write is in flight, seen from outside as Orbax's temporary directory; 0-0.3 s into a save and 0-0.5 s into a
   restore, through the DEEPJAX_TEST_SIGKILL_IN hook), then lets it finish; some trials first add an empty step
   directory at the last step and a non-numeric one. After every kill each committed step must verify (manifest,
   sizes, CRC-32); the finished run must equal the reference bitwise (state, data iterator, GRPO's reference
   policy) with metrics.jsonl holding every step once with the reference's values. A kill "during a write" left a
   temporary directory this launch began; "during a restore" came before the "resumed from" line.
3. corruption: a bit flip, a truncation and a deletion of each kind of file of the references' newest step (copies),
   restored in process: detected and named (the error names the file), harmless (restores equal; only Orbax's
   unhashed top-level files can be: commit_success.txt, a flip that leaves _CHECKPOINT_METADATA valid JSON), or
   missed (must be 0). Bogus directories: empty newest, non-numeric, `0100`, a numeric one without a manifest.
   Then, through the CLI with fallback_on_damage, one damaged newest step per program: the run moves it aside,
   retrains, saves it again and ends equal to the reference.
4. full disk (root only: a 10 MiB tmpfs over the run's checkpoints/): the run stops with one line naming the step,
   the committed steps verify; with room again (remount) the rerun resumes and ends equal to the reference.

Good checkpoints lost: a step that verified and later disappeared while fewer than `keep` newer good steps existed,
or stopped verifying. Prints one JSON line per event, then the summary table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_FLAGS = ("--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
             "--xla_llvm_disable_expensive_passes=true")
KEEP = 3
TRAIN_STEPS, GRPO_STEPS = 12, 6


def emit(**kw):
    print(json.dumps(kw, default=str), flush=True)
    return kw


def program_args(kind: str, data_dir: str) -> list[str]:
    common = ["--config.data.template=plain", f"--config.data.data_dir={data_dir}", "--config.data.seq_len=96",
              "--config.train.checkpoint_every=2", f"--config.train.keep_checkpoints={KEEP}",
              "--config.train.log_every=1", "--config.train.plot=false"]
    if kind == "train":
        return common + ["--config.data.global_batch=8", "--config.data.num_train=400", "--config.data.num_test=20",
                         f"--config.train.steps={TRAIN_STEPS}"]
    return common + ["--config.data.max_digits=1", "--config.data.ops=+-", "--config.data.num_train=150",
                     "--config.data.num_test=20", f"--config.rl.steps={GRPO_STEPS}", "--config.rl.prompts_per_step=4",
                     "--config.rl.loss.group_size=4", "--config.rl.loss.mu=2", "--config.rl.rollout.max_new_tokens=16",
                     "--config.rl.loss.beta=0.05", "--config.rl.eval.every=2", "--config.rl.eval.problems=4",
                     "--config.rl.eval.k=1"]


class Soak:
    def __init__(self, args):
        self.args, self.root = args, os.path.abspath(args.workdir)
        self.rng = random.Random(args.seed)
        self.env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
                        JAX_COMPILATION_CACHE_DIR=os.path.join(self.root, "xla_cache"),
                        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
        self.data_dir = os.path.join(self.root, "tfds")
        self.refs: dict = {}  # kind -> (run dir, final (step, leaves, data), metrics records, job seconds)
        self.stats = {k: 0 for k in ("kills_train", "kills_grpo", "kills_in_write", "kills_in_restore",
                                     "trials", "trials_exact", "kill_damaged_steps", "relaunch_failures",
                                     "corruptions", "detected_named", "detected_unnamed", "harmless", "missed",
                                     "unclear_errors", "bogus_cases", "bogus_ok", "fallback_runs", "fallback_exact",
                                     "good_lost")}
        self.disk = "not run"
        self.n_launch = 0

    # ---- running the CLI -------------------------------------------------------------------------------------
    def launch(self, kind: str, workdir: str, extra=(), kill: str = "none", job_s: float = 30.0) -> dict:
        """Runs `deepjax <kind>` once; kill: none | startup (a random moment of the first half of the reference's
        run time) | step (0-0.3 s after a random step past the newest checkpoint is logged) | write (when the 1st or
        2nd checkpoint write of the launch is in flight) | save (0-0.3 s into its 1st or 2nd save) | restore (0-0.5 s
        into the restore). Returns rc, stdout, stderr, killed, whether a write was in flight / the restore unfinished
        when it died."""
        total = TRAIN_STEPS if kind == "train" else GRPO_STEPS
        self.n_launch += 1
        env = dict(self.env)
        if kill == "save":
            env["DEEPJAX_TEST_SIGKILL_IN"] = f"save:{self.rng.uniform(0, 0.3):.3f}:{self.rng.randint(1, 2)}"
        elif kill == "restore":
            env["DEEPJAX_TEST_SIGKILL_IN"] = f"restore:{self.rng.uniform(0, 0.5):.3f}"
        logs = os.path.join(self.root, "logs", f"{self.n_launch:03d}_{kind}_{kill}")
        os.makedirs(os.path.dirname(logs), exist_ok=True)
        cmd = [sys.executable, "-m", "deepjax", kind, "tiny", "--workdir", workdir, "--no-progress",
               *program_args(kind, self.data_dir), *extra]
        ck = os.path.join(workdir, "checkpoints")
        tmp_before = self.tmp_dirs(ck)
        with open(logs + ".out", "w") as out, open(logs + ".err", "w") as err:
            p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err)
            t_kill, started, in_write = None, None, False
            last = max(int(n) for n in os.listdir(ck) if n.isdigit()) if os.path.isdir(ck) and any(
                n.isdigit() for n in os.listdir(ck)) else 0
            target = self.rng.randint(last + 1, max(last + 1, total - 1))  # "step": after this step is logged
            nth_write, writes = self.rng.randint(1, 2), set()
            metrics = os.path.join(workdir, "metrics.jsonl")
            while p.poll() is None:
                if started is None and "workdir:" in open(logs + ".out").read():
                    started = time.time()
                    if kill == "startup":
                        t_kill = started + self.rng.uniform(0.0, 0.5) * job_s
                if kill == "write":
                    new = self.tmp_dirs(ck) - tmp_before
                    writes |= {n for n, _, _ in new}
                    if len(writes) >= nth_write and new:
                        p.send_signal(signal.SIGKILL)
                        in_write = True
                if kill == "step" and t_kill is None and started and os.path.exists(metrics):
                    with open(metrics) as f:
                        steps = [json.loads(line)["step"] for line in f if line.endswith("\n")]
                    if steps and steps[-1] >= target and time.time() - started > 1:
                        t_kill = time.time() + self.rng.uniform(0, 0.3)
                if t_kill is not None and time.time() >= t_kill:
                    p.send_signal(signal.SIGKILL)
                time.sleep(0.002 if kill == "write" else 0.01)
            rc = p.wait(timeout=600)
        stdout, stderr = open(logs + ".out").read(), open(logs + ".err").read()
        killed = rc == -signal.SIGKILL
        in_write = in_write or (killed and bool(self.tmp_dirs(ck) - tmp_before))  # a write this launch began
        in_restore = killed and kill == "restore" and "resumed from" not in stdout
        return dict(rc=rc, stdout=stdout, stderr=stderr, killed=killed, in_write=in_write, in_restore=in_restore,
                    wall_s=time.time() - (started or time.time()))

    @staticmethod
    def tmp_dirs(ck: str) -> set:
        """Orbax's temporary step directories under ck, with inode and mtime (a relaunch recreates the same name)."""
        if not os.path.isdir(ck):
            return set()
        out = set()
        for n in os.listdir(ck):
            if ".orbax-checkpoint-tmp" in n:
                try:
                    st = os.stat(os.path.join(ck, n))
                except FileNotFoundError:
                    continue
                out.add((n, st.st_ino, st.st_mtime_ns))
        return out

    # ---- reading a run back (in process) -----------------------------------------------------------------------
    def final(self, kind: str, run_dir: str, step_dir_root: str | None = None):
        """(step, [leaves as numpy], data state) of the newest checkpoint of a run (GRPO: the reference policy too)."""
        import jax
        import numpy as np
        from flax import nnx
        from deepjax.config import load_config
        from deepjax.parallel import sharding as S
        from deepjax.train import checkpoint as C
        from deepjax.train import run as TR

        cfg = load_config("tiny", program_args(kind, self.data_dir))
        abstract = TR.abstract_train_state(cfg, S.make_mesh(cfg.mesh), S.rules_for(cfg.mesh.rules))[-1]
        extra = {"ref": nnx.merge_state(abstract.params, abstract.router_bias)} if kind == "grpo" else None
        ck = C.Checkpointer(step_dir_root or os.path.join(run_dir, "checkpoints"), extra_items=tuple(extra or ()))
        try:
            out = ck.restore(abstract, extra=extra)
        finally:
            ck.close()
        leaves = [np.asarray(x) for x in jax.tree.leaves(out[1])]
        if extra:
            leaves += [np.asarray(x) for x in jax.tree.leaves(out[4])]
        return out[0], leaves, out[2]

    @staticmethod
    def jsonl(path: str) -> list[dict]:
        with open(path) as f:
            return [json.loads(line) for line in f]

    def metrics(self, run_dir: str) -> list[dict]:
        return self.jsonl(os.path.join(run_dir, "metrics.jsonl"))

    def same_as_ref(self, kind: str, run_dir: str) -> tuple[bool, str]:
        import numpy as np
        _, (step, leaves, data), ref_metrics, _ = self.refs[kind]
        s2, l2, d2 = self.final(kind, run_dir)
        if s2 != step or d2 != data or len(l2) != len(leaves):
            return False, f"final step {s2} / data {d2} vs {step} / {data}"
        if not all(np.array_equal(a, b) for a, b in zip(leaves, l2)):
            return False, "final state differs"
        m = self.metrics(run_dir)
        steps = [r["step"] for r in m]
        if steps != list(range(1, len(ref_metrics) + 1)):
            return False, f"metrics.jsonl steps {steps}"
        keys = ("loss", "data", "grad_norm") if kind == "train" else ("reward", "loss", "example", "grad_norm")
        for a, b in zip(ref_metrics, m):
            if any(a.get(k) != b.get(k) for k in keys):
                return False, f"metrics of step {a['step']} differ"
        if kind == "grpo":
            evals = [e["step"] for e in self.jsonl(os.path.join(run_dir, "eval.jsonl"))]
            if evals != [e["step"] for e in self.jsonl(os.path.join(self.refs[kind][0], "eval.jsonl"))]:
                return False, f"eval.jsonl steps {evals}"
        return True, ""

    def good_steps(self, ck_dir: str) -> set[int]:
        from deepjax.train import checkpoint as C
        good = set()
        for s in C.list_steps(ck_dir):
            try:
                C.verify_step(os.path.join(ck_dir, str(s)), s)
                good.add(s)
            except C.CheckpointError as e:
                emit(event="damaged_step", dir=ck_dir, error=str(e))
        return good

    def check_lost(self, before: set[int], after: set[int], ck_dir: str) -> int:
        """Good steps of `before` gone (or damaged) in `after` while fewer than KEEP newer good steps exist."""
        lost = [s for s in before - after if len([t for t in after if t > s]) < KEEP]
        if lost:
            emit(event="good_checkpoint_lost", dir=ck_dir, steps=lost, before=sorted(before), after=sorted(after))
        return len(lost)

    # ---- phases -------------------------------------------------------------------------------------------------
    def references(self):
        for kind in ("train", "grpo"):
            d = os.path.join(self.root, f"ref_{kind}")
            shutil.rmtree(d, ignore_errors=True)
            r = self.launch(kind, d)
            assert r["rc"] == 0, r["stderr"][-3000:]
            self.refs[kind] = (d, self.final(kind, d), self.metrics(d), r["wall_s"])
            emit(event="reference", kind=kind, wall_s=round(r["wall_s"], 1), steps=len(self.refs[kind][2]))

    def kill_trials(self):
        modes = [("step", "restore", "save"), ("write", "restore", "step"), ("save", "restore", "write"),
                 ("startup", "step", "restore")]
        t_end = time.time() + self.args.budget_s
        kills = trial = 0
        while kills < self.args.kills and time.time() < t_end:
            kind = ("train", "grpo")[trial % 2]
            d = os.path.join(self.root, f"trial{trial:02d}_{kind}")
            shutil.rmtree(d, ignore_errors=True)
            ck = os.path.join(d, "checkpoints")
            job_s = self.refs[kind][3]
            good: set[int] = set()
            seq = modes[(trial // 2) % len(modes)]
            for i, mode in enumerate(seq):
                if mode == "restore" and not good:
                    mode = "step"
                r = self.launch(kind, d, kill=mode, job_s=job_s)
                if not r["killed"]:
                    if r["rc"] != 0:
                        self.stats["relaunch_failures"] += 1
                        emit(event="relaunch_failed", trial=trial, mode=mode, stderr=r["stderr"][-1500:])
                    break
                kills += 1
                self.stats[f"kills_{kind}"] += 1
                self.stats["kills_in_write"] += r["in_write"]
                self.stats["kills_in_restore"] += r["in_restore"]
                now = self.good_steps(ck) if os.path.isdir(ck) else set()
                self.stats["kill_damaged_steps"] += len(set(
                    int(n) for n in os.listdir(ck) if n.isdigit()) - now) if os.path.isdir(ck) else 0
                self.stats["good_lost"] += self.check_lost(good, now, ck)
                good = now
                emit(event="kill", trial=trial, kind=kind, mode=mode, in_write=r["in_write"],
                     in_restore=r["in_restore"], good_steps=sorted(good))
            if trial % 2 == 1 or trial % 4 == 0:  # bogus step directories before the finishing launch
                os.makedirs(os.path.join(ck, "abc"), exist_ok=True)
                last = TRAIN_STEPS if kind == "train" else GRPO_STEPS
                if not os.path.exists(os.path.join(ck, str(last))):
                    os.makedirs(os.path.join(ck, str(last)))
            r = self.launch(kind, d)
            self.stats["trials"] += 1
            ok, why = (r["rc"] == 0, r["stderr"][-1500:]) if r["rc"] else self.same_as_ref(kind, d)
            after = self.good_steps(ck)
            self.stats["good_lost"] += self.check_lost(good, after, ck)
            if os.path.isdir(os.path.join(d, "damaged")) and any(
                    os.listdir(os.path.join(d, "damaged", n)) for n in os.listdir(os.path.join(d, "damaged"))):
                ok, why = False, "a non-empty step was moved aside after kills alone"
            self.stats["trials_exact"] += ok
            emit(event="trial", trial=trial, kind=kind, exact=ok, why=why, steps=sorted(after))
            trial += 1

    def corruptions(self):
        """Every kind of file of the references' newest step: bit flip, truncation, deletion; restored in process."""
        from deepjax.train import checkpoint as C
        import numpy as np
        for kind in ("train", "grpo"):
            ref_dir, (step, leaves, data), _, _ = self.refs[kind]
            src = os.path.join(ref_dir, "checkpoints", str(step))
            files = sorted(os.path.relpath(os.path.join(r, n), src) for r, _, ns in os.walk(src) for n in ns)
            kinds: dict[str, str] = {}
            for rel in files:  # one file per kind: hash-named data files share a kind
                parts = rel.split(os.sep)
                key = os.sep.join(p if len(p) < 24 else "*" for p in parts)
                if key not in kinds or os.path.getsize(os.path.join(src, rel)) > os.path.getsize(
                        os.path.join(src, kinds[key])):
                    kinds[key] = rel
            for key, rel in sorted(kinds.items()):
                for mode in ("bitflip", "truncate", "delete"):
                    scratch = os.path.join(self.root, "corrupt", "checkpoints")
                    shutil.rmtree(os.path.dirname(scratch), ignore_errors=True)
                    shutil.copytree(src, os.path.join(scratch, str(step)))
                    p = os.path.join(scratch, str(step), rel)
                    size = os.path.getsize(p)
                    if mode == "bitflip":
                        if size == 0:
                            continue
                        at, bit = self.rng.randrange(size), self.rng.randrange(8)
                        with open(p, "r+b") as f:
                            f.seek(at)
                            b = f.read(1)[0]
                            f.seek(at)
                            f.write(bytes([b ^ (1 << bit)]))
                    elif mode == "truncate":
                        with open(p, "r+b") as f:
                            f.truncate(self.rng.randrange(size) if size else 0)
                        if size == 0:
                            continue
                    else:
                        os.remove(p)
                    self.stats["corruptions"] += 1
                    try:
                        s2, l2, d2 = self.final(kind, "", scratch)
                    except C.CheckpointError as e:
                        named = p in str(e)
                        self.stats["detected_named" if named else "detected_unnamed"] += 1
                        outcome = "detected_named" if named else "detected_unnamed"
                        msg = str(e)
                    except Exception as e:  # noqa: BLE001  anything else is a traceback for the user
                        self.stats["unclear_errors"] += 1
                        outcome, msg = "unclear_error", f"{type(e).__name__}: {e}"[:300]
                    else:
                        same = (s2, d2) == (step, data) and all(np.array_equal(a, b) for a, b in zip(leaves, l2))
                        self.stats["harmless" if same else "missed"] += 1
                        outcome, msg = ("harmless" if same else "MISSED"), ""
                    emit(event="corruption", kind=kind, file=key, mode=mode, outcome=outcome, error=msg[:240])

    def bogus_dirs(self):
        """In process: bogus entries beside the reference's steps never become the newest."""
        from deepjax.train import checkpoint as C
        ref_dir, (step, _, data), _, _ = self.refs["train"]
        cases = {"empty newest": (str(step + 2), None), "non-numeric": ("abc", "junk"), "leading zero": ("0100", None),
                 "numeric, no manifest": (str(step + 4), "state/_METADATA")}
        for name, (entry, file) in cases.items():
            scratch = os.path.join(self.root, "bogus", "checkpoints")
            shutil.rmtree(os.path.dirname(scratch), ignore_errors=True)
            shutil.copytree(os.path.join(ref_dir, "checkpoints"), scratch)
            os.makedirs(os.path.join(scratch, entry))
            if file:
                os.makedirs(os.path.dirname(os.path.join(scratch, entry, file)), exist_ok=True)
                with open(os.path.join(scratch, entry, file), "wb") as f:
                    f.write(os.urandom(64))
            self.stats["bogus_cases"] += 1
            try:
                s2, _, d2 = self.final("train", "", scratch)
                ok = (s2, d2) == (step, data)
            except C.CheckpointError as e:  # a damaged newest step: named, restorable with fallback
                ok = entry in str(e) and "fallback_on_damage" in str(e)
            self.stats["bogus_ok"] += ok
            emit(event="bogus_dir", case=name, ok=ok)

    def fallback_runs(self):
        """Through the CLI: a damaged newest step with fallback_on_damage: moved aside, retrained, saved again."""
        for kind, item in (("train", "state"), ("grpo", "ref")):
            ref_dir, (step, _, _), _, _ = self.refs[kind]
            d = os.path.join(self.root, f"fallback_{kind}")
            shutil.rmtree(d, ignore_errors=True)
            shutil.copytree(ref_dir, d)
            sd = os.path.join(d, "checkpoints", str(step))
            victim = max((os.path.join(r, n) for r, _, ns in os.walk(os.path.join(sd, item)) for n in ns),
                         key=os.path.getsize)
            with open(victim, "r+b") as f:  # 4 KiB overwritten, same size
                f.seek(os.path.getsize(victim) // 2)
                f.write(os.urandom(min(4096, os.path.getsize(victim) // 2)))
            before = self.good_steps(os.path.join(d, "checkpoints"))
            bad = self.launch(kind, d)
            last = bad["stderr"].strip().splitlines()[-1] if bad["stderr"].strip() else ""
            named = bad["rc"] != 0 and last.startswith("deepjax: error:") and victim in last
            r = self.launch(kind, d, extra=["--config.train.fallback_on_damage=true"])
            ok, why = (False, r["stderr"][-1500:]) if r["rc"] else self.same_as_ref(kind, d)
            ok = ok and named and os.path.isdir(os.path.join(d, "damaged", str(step)))
            after = self.good_steps(os.path.join(d, "checkpoints"))
            self.stats["good_lost"] += self.check_lost(before, after, os.path.join(d, "checkpoints"))
            self.stats["fallback_runs"] += 1
            self.stats["fallback_exact"] += ok
            emit(event="fallback", kind=kind, error_named=named, exact=ok, why=why, steps=sorted(after))

    def full_disk(self):
        if os.geteuid() != 0:
            self.disk = "skipped: mounting a tmpfs needs root"
            return
        d = os.path.join(self.root, "full_disk")
        ck = os.path.join(d, "checkpoints")
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(ck)
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=10m", "tmpfs", ck]).returncode:
            self.disk = "skipped: mount -t tmpfs failed"
            return
        try:
            r = self.launch("train", d)
            last = r["stderr"].strip().splitlines()[-1] if r["stderr"].strip() else ""
            stopped = r["rc"] == 2 and "no space left on device" in last and last.startswith("deepjax: error:")
            good = self.good_steps(ck)
            subprocess.run(["mount", "-o", "remount,size=64m", ck], check=True)
            r2 = self.launch("train", d)
            ok, why = (False, r2["stderr"][-1500:]) if r2["rc"] else self.same_as_ref("train", d)
            self.stats["good_lost"] += self.check_lost(good, self.good_steps(ck), ck)
            logged = "Traceback" in r["stderr"]
            self.disk = (f"stopped, rc {r['rc']}, last line names the step and the full disk: {stopped}; Orbax's "
                         f"background traceback logged before it: {logged}; committed steps verify: {sorted(good)}; "
                         f"rerun with room resumed and exact: {ok} {why[:200]}")
        finally:
            subprocess.run(["umount", ck])
        emit(event="full_disk", result=self.disk)

    def table(self, wall_s: float):
        s = self.stats
        rows = [
            ("SIGKILLs: train / grpo", f"{s['kills_train']} / {s['kills_grpo']}"),
            ("  of which during a checkpoint write", s["kills_in_write"]),
            ("  of which during a restore", s["kills_in_restore"]),
            ("  committed steps left damaged by a kill (must be 0)", s["kill_damaged_steps"]),
            ("trials finished and resumed exactly (bitwise)", f"{s['trials_exact']} / {s['trials']}"),
            ("corruptions injected (bit flip, truncation, deletion)", s["corruptions"]),
            ("  detected, file named", s["detected_named"]),
            ("  detected, file not named", s["detected_unnamed"]),
            ("  harmless (restored equal)", s["harmless"]),
            ("  other errors (tracebacks)", s["unclear_errors"]),
            ("  missed (must be 0)", s["missed"]),
            ("bogus step directories never taken as newest", f"{s['bogus_ok']} / {s['bogus_cases']}"),
            ("damaged newest + fallback: named, moved, re-saved, exact",
             f"{s['fallback_exact']} / {s['fallback_runs']}"),
            ("full disk", self.disk),
            ("good checkpoints lost (must be 0)", s["good_lost"]),
            ("launches / wall time", f"{self.n_launch} / {wall_s / 60:.1f} min"),
        ]
        w = max(len(k) for k, _ in rows)
        print("\nfault-injection soak (tiny preset)")
        for k, v in rows:
            print(f"  {k:<{w}}  {v}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="/tmp/deepjax_faults")
    ap.add_argument("--kills", type=int, default=24, help="SIGKILLs across train and grpo")
    ap.add_argument("--budget-s", type=float, default=720, help="stop starting kill trials after this long")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpu", action="store_true", help="JAX on CPU with 8 host devices and cheap compiles")
    ap.add_argument("--skip", nargs="*", default=[], choices=["kills", "corruption", "fallback", "disk"])
    args = ap.parse_args(argv)
    if args.cpu:  # before jax is imported (here and in every launch)
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + CPU_FLAGS).strip()
    os.makedirs(args.workdir, exist_ok=True)
    t0 = time.time()
    soak = Soak(args)
    soak.references()
    if "kills" not in args.skip:
        soak.kill_trials()
    if "corruption" not in args.skip:
        soak.corruptions()
        soak.bogus_dirs()
    if "fallback" not in args.skip:
        soak.fallback_runs()
    if "disk" not in args.skip:
        soak.full_disk()
    soak.table(time.time() - t0)
    s = soak.stats
    bad = s["missed"] + s["good_lost"] + s["kill_damaged_steps"] + (s["trials"] - s["trials_exact"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

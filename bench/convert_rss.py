"""Peak resident memory of `deepjax convert`, both ways, on bench-preset-sized random checkpoints (issue 22.5).

    PYTHONPATH=. python bench/convert_rss.py                       # bench preset (12 layers) and 6 layers
    PYTHONPATH=. python bench/convert_rss.py --layers 6,12,24      # a third size (24 layers: 4.9 GB of bf16)

For each model (the bench preset of configs/bench.py, 1.25B parameters, and the same with other layer counts, so
that how the peak depends on the model's size shows):

1. a random HF checkpoint in bfloat16, 1 GB shards (`convert.random_hf`, tensor by tensor);
2. each step in a fresh child process whose peak RSS (VmHWM: anonymous and file-backed pages) is
   reported, with "above imports" = peak - the process's RSS just before the conversion starts (after importing
   jax and deepjax):
     hf -> run        deepjax convert HF RUN --config.model.param_dtype=bfloat16
     run -> hf        deepjax convert RUN HF2 (as stored: bf16); HF2 is checked equal to HF tensor for tensor
     run -> hf --fp8  deepjax convert RUN HF8 --fp8
     orbax -> hf      (12 layers only) from a checkpoint Orbax itself wrote, as `deepjax train` does (the
                      parameters saved by train.checkpoint.Checkpointer on one device: each array one chunk)
     hf.load          the baseline that holds the model: deepjax.model.hf.load of HF onto the CPU
3. the model's directories are deleted (--keep keeps them).

Prints one JSON line per measurement, then a table; writes results.json under --root.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2 ** 30
ORBAX_LAYERS = 12  # the bench preset: the Orbax-written case (its setup holds the model in memory, twice)


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def hwm() -> int:
    """This process's peak RSS so far, bytes: VmHWM (getrusage's ru_maxrss is no good here: it survives the execve
    of a child, which would then report its parent's peak)."""
    return _status("VmHWM")


def rss() -> int:
    """This process's RSS now, bytes."""
    return _status("VmRSS")


def model_config(layers: int):
    from deepjax.model import presets

    return dataclasses.replace(presets.bench(), num_hidden_layers=layers, param_dtype="bfloat16")


def child(mode: str, src: str, dst: str, layers: int) -> None:
    """One measured step; prints {"before", "peak", "seconds"} as JSON."""
    import jax  # noqa: F401  (the imports a conversion needs, before the baseline)
    from deepjax import cli
    from deepjax.model import hf
    from deepjax.train import checkpoint as C
    from deepjax.train import step as TS

    before = rss()
    t = time.perf_counter()
    if mode == "hf->run":
        assert cli.main(["convert", src, dst, "--config.model.param_dtype=bfloat16", "--no-progress"]) == 0
    elif mode == "run->hf":
        assert cli.main(["convert", src, dst, "--no-progress"]) == 0
    elif mode == "run->hf --fp8":
        assert cli.main(["convert", src, dst, "--fp8", "--no-progress"]) == 0
    elif mode == "orbax->hf":
        assert cli.main(["convert", src, dst, "--no-progress"]) == 0
    elif mode == "hf.load":
        _, _, params = hf.load(src, model_config(layers))
        jax.block_until_ready(params)
    elif mode == "orbax-save":  # setup, not measured: the parameters of `src`/hf saved by Orbax as a run in `dst`
        _, _, params = hf.load(os.path.join(src, "hf"), model_config(layers))
        trainable, bias = TS.split_params(params)
        os.makedirs(dst)
        shutil.copy(os.path.join(src, "run", "config.json"), dst)
        ck = C.Checkpointer(os.path.join(dst, "checkpoints"), async_save=False)
        ck.save(1, {"params": trainable, "router_bias": bias}, None, {})
        ck.close()
    else:
        raise ValueError(mode)
    print(json.dumps({"before": before, "peak": hwm(), "seconds": time.perf_counter() - t}))


def measure(mode: str, src: str, dst: str, layers: int) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", mode, src, dst, str(layers)], cwd=REPO,
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO))
    if r.returncode:
        raise RuntimeError(f"{mode}: {r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def same_tensors(a: str, b: str) -> bool:
    """Same names and values (compared as float32: the router biases come back in float32, the parameter dtype of
    deepjax's RouterBias, from the bfloat16 of the random source)."""
    import numpy as np

    from deepjax.model import hf

    ca, cb = hf.Checkpoint(a), hf.Checkpoint(b)
    if set(ca.where) != set(cb.where):
        return False
    for name in ca.where:  # one tensor at a time
        x, y = ca.raw(name), cb.raw(name)
        if x.shape != y.shape or not np.array_equal(x.astype(np.float32), y.astype(np.float32)):
            return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="/tmp/convert_rss")
    ap.add_argument("--layers", default="6,12", help="comma-separated layer counts (bench preset: 12)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    ap.add_argument("--child", nargs=4, metavar=("MODE", "SRC", "DST", "LAYERS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, src, dst, layers = args.child
        return child(mode, src, dst, int(layers))
    from deepjax import model as M
    from deepjax.model import hf
    from deepjax.train import convert as CV

    import numpy as np

    layer_counts = [int(x) for x in args.layers.split(",")]
    rows = []
    for layers in layer_counts:
        cfg = model_config(layers)
        _, abstract = M.abstract_init(cfg)
        n_params = M.count_params(abstract)
        d = os.path.join(args.root, f"L{layers}")
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        CV.random_hf(os.path.join(d, "hf"), cfg, max_shard_bytes=GiB)
        ck = hf.Checkpoint(os.path.join(d, "hf"))
        largest = max(int(np.prod(ck.shape(n))) * 2 for n in ck.where)
        steps = [("hf->run", "hf", "run"), ("run->hf", "run", "hf2"), ("run->hf --fp8", "run", "hf8")]
        if layers == ORBAX_LAYERS:
            steps += [("orbax-save", ".", "orbax"), ("orbax->hf", "orbax", "hf_orbax")]
        for mode, src, dst in steps + [("hf.load", "hf", "-")]:
            r = measure(mode, os.path.normpath(os.path.join(d, src)), os.path.join(d, dst), layers)
            if mode == "orbax-save":
                continue
            row = {"layers": layers, "params": n_params, "model_bytes": 2 * n_params, "largest_tensor": largest,
                   "mode": mode, "peak": r["peak"], "above_imports": r["peak"] - r["before"],
                   "seconds": round(r["seconds"], 1),
                   "written": du(os.path.join(d, dst)) if dst != "-" else None}
            if mode == "run->hf":
                row["equal_to_source"] = same_tensors(os.path.join(d, "hf"), os.path.join(d, "hf2"))
            if mode == "orbax->hf":
                row["equal_to_source"] = same_tensors(os.path.join(d, "hf"), os.path.join(d, "hf_orbax"))
            print(json.dumps(row), flush=True)
            rows.append(row)
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)
    with open(os.path.join(args.root, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print()
    print(table(rows))


def table(rows: list[dict]) -> str:
    lines = [f"{'layers':>6} {'model':>9} {'conversion':<14} {'peak RSS':>9} {'above imports':>13} {'time':>7} "
             f"{'written':>9}"]
    for r in rows:
        written = f"{r['written'] / GiB:5.2f} GiB" if r["written"] else ""
        lines.append(f"{r['layers']:>6} {r['model_bytes'] / GiB:5.2f} GiB {r['mode']:<14} {r['peak'] / GiB:5.2f} GiB "
                     f"{r['above_imports'] / GiB:9.2f} GiB {r['seconds']:6.1f}s {written:>9}"
                     + ("" if r.get("equal_to_source", True) else "  NOT EQUAL"))
    return "\n".join(line.rstrip() for line in lines)

if __name__ == "__main__":
    main()

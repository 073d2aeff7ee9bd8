"""Profile the sampler's decode loop on the GPU: a jax.profiler trace (Perfetto JSON) of one generate call.

    PYTHONPATH=. python bench/profile_decode.py --batch 64 --out /tmp/prof     # then: python bench/profile_decode.py --summarize /tmp/prof

--summarize prints GPU time per kernel name (top 40) from the trace's perfetto_trace.json.gz.
"""
import argparse
import collections
import dataclasses
import glob
import gzip
import json
import os


def run(batch, new, out, fused=True, kernels="auto"):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from deepjax import model as M, presets, sampling as SP
    cfg = dataclasses.replace(presets.bench(), dtype="bfloat16", param_dtype="bfloat16")
    graphdef, params = M.init(cfg, jax.random.key(0))
    prompts = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, 128)), jnp.int32)
    lengths = jnp.full((batch,), 128, jnp.int32)
    sc = SP.SamplingConfig(max_new_tokens=new, temperature=0.0, fused=fused, kernels=kernels)
    jax.block_until_ready(SP.jit_generate(graphdef, params, prompts, lengths, jax.random.key(0), sc))
    import time
    with jax.profiler.trace(out, create_perfetto_trace=True):
        t = time.perf_counter()
        jax.block_until_ready(SP.jit_generate(graphdef, params, prompts, lengths, jax.random.key(1), sc))
        print(f"generate wall {1e3 * (time.perf_counter() - t):.1f} ms (batch {batch}, {new} new, "
              f"{'fused' if fused else 'module'}, kernels {kernels})")


def load_trace(out):
    """(events, {pid: process name}, GPU pids) of the newest Perfetto trace under `out`."""
    path = sorted(glob.glob(os.path.join(out, "**", "perfetto_trace.json.gz"), recursive=True))[-1]
    with gzip.open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    pids = {e["pid"]: e["args"].get("name", "") for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    return events, pids, {p for p, n in pids.items() if "GPU" in n or "/device:" in n}


def sequence(events, gpu, n):
    """The n GPU kernels from the middle of the trace in launch order: duration and idle gap before each (us)."""
    ks = sorted((e for e in events if e.get("ph") == "X" and e.get("pid") in gpu), key=lambda e: e["ts"])
    mid = len(ks) // 2
    prev = None
    print(f"kernel sequence ({n} from the middle): gap us, duration us, name")
    for e in ks[mid:mid + n]:
        gap = 0.0 if prev is None else e["ts"] - prev
        prev = e["ts"] + e.get("dur", 0)
        print(f"{gap:7.1f} {e.get('dur', 0):7.1f}  {e['name'][:70]}")


def summarize(out, top=25, top_host=25, seq=0):
    events, pids, gpu = load_trace(out)
    if seq:
        sequence(events, gpu, seq)
    tot = collections.Counter()
    cnt = collections.Counter()
    info = {}
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in gpu:
            tot[e["name"]] += e.get("dur", 0)
            cnt[e["name"]] += 1
            info.setdefault(e["name"], e.get("args", {}))
    all_us = sum(tot.values())
    spans = [(e["ts"], e["ts"] + e.get("dur", 0)) for e in events if e.get("ph") == "X" and e.get("pid") in gpu]
    span = max(b for _, b in spans) - min(a for a, _ in spans)
    print(f"GPU processes: {[pids[p] for p in gpu]}; total kernel time {all_us / 1e3:.1f} ms over a span of "
          f"{span / 1e3:.1f} ms; {sum(cnt.values())} events")
    kind = collections.Counter()
    for name, us in tot.items():
        kind[name.rstrip("0123456789").rstrip("_")] += us
    print("by kind:", ", ".join(f"{k} {v / 1e3:.2f} ms" for k, v in kind.most_common(14)))
    for name, us in tot.most_common(top):
        a = info[name]
        hlo = a.get("long_name") or a.get("hlo_op") or a.get("tf_op") or ""
        print(f"{us / 1e3:9.2f} ms {100 * us / all_us:5.1f}% {cnt[name]:7d}  {name[:60]}  {str(hlo)[:160]}")
    host, hcnt = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("pid") not in gpu:
            host[e["name"]] += e.get("dur", 0)
            hcnt[e["name"]] += 1
    print("host events (total ms, count):")
    for name, us in host.most_common(top_host):
        print(f"{us / 1e3:9.2f} ms {hcnt[name]:7d}  {name[:110]}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--out", default="/tmp/prof")
    ap.add_argument("--summarize", default=None)
    ap.add_argument("--module", action="store_true", help="the unfused module path (fused=False)")
    ap.add_argument("--kernels", default="auto", help="auto | xla | pallas (the fused path's kernels)")
    ap.add_argument("--top", type=int, default=25, help="kernels listed")
    ap.add_argument("--seq", type=int, default=0, help="also list this many kernels in launch order, with gaps")
    a = ap.parse_args()
    if a.summarize:
        summarize(a.summarize, a.top, seq=a.seq)
    else:
        run(a.batch, a.new, a.out, fused=not a.module, kernels=a.kernels)
        summarize(a.out, a.top, top_host=10, seq=a.seq)

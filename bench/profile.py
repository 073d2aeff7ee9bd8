"""Profile one `generate` call on the GPU (bench preset, bf16): a jax.profiler trace (Perfetto JSON), then GPU time
per kernel from it.

    PYTHONPATH=. python bench/profile.py --batch 64 --new 64 --out /tmp/prof      # trace one call, summarize it
    PYTHONPATH=. python bench/profile.py --summarize /tmp/prof --seq 60 --split    # re-read a trace
    PYTHONPATH=. python bench/profile.py --batch 1 --new 256 --hlo /tmp/decode_b1.hlo   # the optimized HLO only

The summary: total kernel time over the trace's span, time by kernel kind, the --top kernels (total ms, share,
count, HLO op) and the host events.
  --seq N      also N kernels from the middle of the trace in launch order, with the idle gap before each
  --split [F]  also the decode loop alone: the kernels after fraction F (default 0.6) of the span (the prefill
               comes first), their time, the top kernels and the device memcpy sizes
  --hlo FILE   writes the optimized HLO of the same generate call (abstract params: nothing runs, any backend)
               for counting kernels per decode step, and exits
--module profiles the unfused module path (sampling.decoder='model'), --kernels picks the fused path's kernels.

`load_trace` and `gpu_kernels` are imported by bench/tune.py.
"""
import argparse
import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import time


def _setup(batch: int, prompt: int, new: int, fused: bool, kernels: str, abstract: bool = False):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from deepjax import model as M
    from deepjax.infer import sampling as SP
    from deepjax.model import presets

    cfg = dataclasses.replace(presets.bench(), dtype="bfloat16", param_dtype="bfloat16")
    graphdef, params = M.abstract_init(cfg) if abstract else M.init(cfg, jax.random.key(0))
    if abstract:
        prompts, lengths = jax.ShapeDtypeStruct((batch, prompt), jnp.int32), jax.ShapeDtypeStruct((batch,), jnp.int32)
    else:
        prompts = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt)), jnp.int32)
        lengths = jnp.full((batch,), prompt, jnp.int32)
    decoder = "model" if not fused else {"auto": "auto", "xla": "fused"}.get(kernels, kernels)
    sc = SP.SamplingConfig(max_new_tokens=new, temperature=0.0, decoder=decoder)
    return graphdef, params, prompts, lengths, sc


def run(batch: int, prompt: int, new: int, out: str, fused: bool = True, kernels: str = "auto"):
    """Traces one `jit_generate` call (after a warm-up call that compiles it) into `out`."""
    import jax

    from deepjax.infer import sampling as SP

    graphdef, params, prompts, lengths, sc = _setup(batch, prompt, new, fused, kernels)
    jax.block_until_ready(SP.jit_generate(graphdef, params, prompts, lengths, jax.random.key(0), sc))
    with jax.profiler.trace(out, create_perfetto_trace=True):
        t = time.perf_counter()
        jax.block_until_ready(SP.jit_generate(graphdef, params, prompts, lengths, jax.random.key(1), sc))
        print(f"generate wall {1e3 * (time.perf_counter() - t):.1f} ms (batch {batch}, prompt {prompt}, {new} new, "
              f"{'fused' if fused else 'module'}, kernels {kernels}, {jax.devices()[0].device_kind})")


def dump_hlo(path: str, batch: int, prompt: int, new: int, fused: bool = True, kernels: str = "auto"):
    """The optimized HLO text of the generate call (jitted as `jit_generate` is on one GPU), written to `path`."""
    import jax

    from deepjax.infer import sampling as SP

    graphdef, params, prompts, lengths, sc = _setup(batch, prompt, new, fused, kernels, abstract=True)
    opts = SP.compiler_options(jax.default_backend(), True, batch)
    f = jax.jit(lambda p, x, l, k: SP.generate(graphdef, p, x, l, k, sc), compiler_options=opts)
    text = f.lower(params, prompts, lengths, jax.random.key(0)).compile().as_text()
    with open(path, "w") as fh:
        fh.write(text)
    print(f"{path}: {len(text)} characters, {text.count(' fusion(')} fusions, {text.count(' custom-call(')} "
          f"custom calls, {text.count(' while(')} while loops ({jax.default_backend()})")


def load_trace(out: str):
    """(events, {pid: process name}, GPU pids) of the newest Perfetto trace under `out`."""
    paths = sorted(glob.glob(os.path.join(out, "**", "perfetto_trace.json.gz"), recursive=True))
    if not paths:
        raise SystemExit(f"no perfetto_trace.json.gz under {out}")
    with gzip.open(paths[-1]) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    pids = {e["pid"]: e["args"].get("name", "") for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    return events, pids, {p for p, n in pids.items() if "GPU" in n or "/device:" in n}


def gpu_kernels(events, gpu) -> list:
    """The complete ("X") events of the GPU processes, in launch order."""
    return sorted((e for e in events if e.get("ph") == "X" and e.get("pid") in gpu), key=lambda e: e["ts"])


def _end(e) -> float:
    return e["ts"] + e.get("dur", 0)


def _by_name(ks):
    tot, cnt, info = collections.Counter(), collections.Counter(), {}
    for e in ks:
        tot[e["name"]] += e.get("dur", 0)
        cnt[e["name"]] += 1
        info.setdefault(e["name"], e.get("args", {}))
    return tot, cnt, info


def sequence(ks, n: int):
    """n kernels from the middle of `ks` in launch order: the idle gap before each and its duration (us)."""
    mid = len(ks) // 2
    prev = None
    print(f"kernel sequence ({n} from the middle): gap us, duration us, name")
    for e in ks[mid:mid + n]:
        gap = 0.0 if prev is None else e["ts"] - prev
        prev = _end(e)
        print(f"{gap:7.1f} {e.get('dur', 0):7.1f}  {e['name'][:70]}")


def split(ks, frac: float = 0.6, top: int = 12):
    """The decode loop alone: the kernels starting after `frac` of the trace's span (the prefill comes first)."""
    t0, t1 = ks[0]["ts"], max(_end(e) for e in ks)
    part = [e for e in ks if e["ts"] > t0 + frac * (t1 - t0)]
    if not part:
        print(f"split: no kernels after {frac:.0%} of the span")
        return
    tot, cnt, _ = _by_name(part)
    span = max(_end(e) for e in part) - part[0]["ts"]
    print(f"decode loop (kernels after {frac:.0%} of the span): span {span / 1e3:.2f} ms, kernel time "
          f"{sum(tot.values()) / 1e3:.2f} ms, {len(part)} kernels")
    for name, us in tot.most_common(top):
        print(f"{us / 1e3:8.2f} ms {cnt[name]:6d}  {name[:90]}")
    sizes = collections.Counter()
    for e in part:
        if e["name"].startswith("Memcpy"):
            detail = e.get("args", {}).get("memcpy_details", "").split("size:")
            sizes[detail[-1].split()[0] if len(detail) > 1 and detail[-1].split() else "?"] += 1
    print("memcpy sizes (bytes: count):", sizes.most_common(10))


_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = .*metadata=\{([^}]*)\}")


def hlo_sources(text: str, frames: int = 3) -> dict:
    """{(module, instruction): "file:line function < caller ... | op_name's tail"} for the instructions of an optimized
    HLO module's text (`Compiled.as_text()`) that carry source metadata: what a trace's kernel names (its `hlo_op`
    argument: a fusion or a custom call) stand for in the Python code. Reads either form of the metadata: a
    `stack_frame_id` into the module's StackFrames / FileLocations / FileNames tables (their parent ids printed one
    higher, 0 for none), or source_file / source_line."""
    module = re.match(r"HloModule ([\w.\-]+)", text)
    module = module.group(1) if module else ""
    tables = {}
    for section in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
        m = re.search(rf"^{section}\n((?:\d+ .*\n)+)", text, re.M)
        tables[section] = dict(line.split(" ", 1) for line in m.group(1).splitlines()) if m else {}
    field = lambda entry, key: (re.search(rf"{key}=(\d+)", entry) or [None, ""])[1]  # noqa: E731
    strip = lambda v: v.strip().strip('"')  # noqa: E731

    def frame(fid: str) -> tuple:
        entry = tables["StackFrames"].get(fid, "")
        loc = tables["FileLocations"].get(field(entry, "file_location_id"), "")
        name = os.path.basename(strip(tables["FileNames"].get(field(loc, "file_name_id"), "?")))
        fn = strip(tables["FunctionNames"].get(field(loc, "function_name_id"), "?"))
        parent = field(entry, "parent_frame_id")
        return f"{name}:{field(loc, 'line')} {fn}", str(int(parent) - 1) if parent else "0"

    out = {}
    for line in text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        meta = m.group(2)
        op = (re.search(r'op_name="([^"]*)"', meta) or [None, ""])[1]
        chain, fid = [], field(meta, "stack_frame_id")
        while fid and fid != "0" and len(chain) < frames:
            where, fid = frame(fid)
            chain.append(where)
        sf = re.search(r'source_file="?([^" ]+)', meta)
        if not chain and sf:
            chain.append(f"{os.path.basename(sf.group(1))}:{field(meta, 'source_line')}")
        if chain or op:
            out[(module, m.group(1))] = " < ".join(chain) + " | " + "/".join(op.split("/")[-2:])
    # kernels are named after their instruction with "." as "_" (loop_add_fusion.60 -> loop_add_fusion_60)
    return {**{(mod, name.replace(".", "_")): v for (mod, name), v in out.items()}, **out}


def summarize(out: str, top: int = 25, top_host: int = 25, seq: int = 0, split_at=None, sources=None):
    """sources: `hlo_sources` of the traced modules (their union), printed beside each top kernel."""
    events, pids, gpu = load_trace(out)
    ks = gpu_kernels(events, gpu)
    if not ks:
        raise SystemExit(f"no GPU kernels in the trace under {out} (processes: {sorted(pids.values())})")
    if seq:
        sequence(ks, seq)
    tot, cnt, info = _by_name(ks)
    all_us = sum(tot.values())
    span = max(_end(e) for e in ks) - ks[0]["ts"]
    print(f"GPU processes: {[pids[p] for p in gpu]}; total kernel time {all_us / 1e3:.1f} ms over a span of "
          f"{span / 1e3:.1f} ms; {len(ks)} events")
    kind = collections.Counter()
    for name, us in tot.items():
        kind[name.rstrip("0123456789").rstrip("_")] += us
    print("by kind:", ", ".join(f"{k} {v / 1e3:.2f} ms" for k, v in kind.most_common(14)))
    for name, us in tot.most_common(top):
        a = info[name]
        hlo = a.get("long_name") or a.get("hlo_op") or a.get("tf_op") or ""
        if sources:  # by (module, instruction) only: generic names (add.0, loop_convert_fusion) recur in modules.
            # Inside a command buffer (CUDA graph) the trace's hlo_op is the buffer; the kernel's name is the fusion's
            mod = str(a.get("hlo_module", "")).split(",")[0]
            hlo = sources.get((mod, a.get("hlo_op", ""))) or sources.get((mod, name)) or hlo
        print(f"{us / 1e3:9.2f} ms {100 * us / all_us:5.1f}% {cnt[name]:7d}  {name[:60]}  {str(hlo)[:160]}")
    host, hcnt, _ = _by_name(e for e in events if e.get("ph") == "X" and e.get("pid") not in gpu)
    print("host events (total ms, count):")
    for name, us in host.most_common(top_host):
        print(f"{us / 1e3:9.2f} ms {hcnt[name]:7d}  {name[:110]}")
    if split_at is not None:
        split(ks, split_at)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--out", default="/tmp/prof", help="trace directory")
    ap.add_argument("--summarize", metavar="DIR", help="summarize the trace under DIR (no run)")
    ap.add_argument("--module", action="store_true", help="the unfused module path (sampling.decoder='model')")
    ap.add_argument("--kernels", default="auto", help="auto | xla | pallas (the fused path's kernels)")
    ap.add_argument("--top", type=int, default=25, help="kernels listed")
    ap.add_argument("--seq", type=int, default=0, help="also list this many kernels in launch order, with gaps")
    ap.add_argument("--split", type=float, nargs="?", const=0.6, default=None, metavar="F",
                    help="also the decode loop alone: kernels after fraction F of the span (default 0.6)")
    ap.add_argument("--hlo", metavar="FILE", help="write the optimized HLO of the generate call to FILE; no run")
    a = ap.parse_args(argv)
    if a.hlo:
        dump_hlo(a.hlo, a.batch, a.prompt, a.new, fused=not a.module, kernels=a.kernels)
    elif a.summarize:
        summarize(a.summarize, a.top, seq=a.seq, split_at=a.split)
    else:
        run(a.batch, a.prompt, a.new, a.out, fused=not a.module, kernels=a.kernels)
        summarize(a.out, a.top, top_host=10, seq=a.seq, split_at=a.split)


if __name__ == "__main__":
    main()

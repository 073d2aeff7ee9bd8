"""A/B of kernel settings end to end: `generate` on the bench preset (bf16) with each variant in turn, for several
rounds in one process (variants measured side by side see the same machine state; docs/LOG.md: separate
processes differ by ~2%).

    PYTHONPATH=. python bench/ab.py --batch 64 route.logits=1 route.logits=0
    PYTHONPATH=. python bench/ab.py --batch 64 --rounds 3 "route.logits=1,route.bd=256" route.logits=0

A variant is a comma list of `kernel.key=value` overrides of `deepjax.kernels.TUNING` (values are Python
literals); an empty string is the defaults. Prints a JSON line per (round, variant) and a summary: the median
tokens/s over the whole call and decode-only per variant.
"""
import argparse
import ast
import dataclasses
import json
import statistics

import jax

from deepjax import kernels as KN
from deepjax import model as M
from deepjax import presets
from deepjax import sampling as SP
from sampling_bench import time_generate  # bench/ is on sys.path when this script runs


def parse(variant: str) -> dict:
    out = {}
    for item in filter(None, variant.split(",")):
        key, _, value = item.partition("=")
        kernel, _, name = key.partition(".")
        if kernel not in KN.TUNING or name not in KN.TUNING[kernel]:
            raise SystemExit(f"ab.py: unknown setting {key!r} (kernels.TUNING has {sorted(KN.TUNING)})")
        out.setdefault(kernel, {})[name] = ast.literal_eval(value)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    a = ap.parse_args()
    cfg = dataclasses.replace(presets.bench(), dtype="bfloat16", param_dtype="bfloat16")
    graphdef, params = M.init(cfg, jax.random.key(0))
    default = {k: dict(v) for k, v in KN.TUNING.items()}
    res = {v: [] for v in a.variants}
    for r in range(a.rounds):
        for v in a.variants:
            for k, d in default.items():
                KN.TUNING[k].clear()
                KN.TUNING[k].update(d)
            for k, d in parse(v).items():
                KN.TUNING[k].update(d)
            jax.clear_caches()  # TUNING is read while tracing
            SP._JITS.clear()
            t = time_generate(graphdef, params, cfg, a.batch, a.prompt, a.new, a.reps)
            res[v].append((t["tokens_per_s"], t["decode_tokens_per_s"], t["prefill_s"]))
            print(json.dumps({"round": r, "variant": v, **{k: t[k] for k in ("tokens_per_s", "decode_tokens_per_s",
                                                                            "prefill_s")}}), flush=True)
    print(f"\nbatch {a.batch}, {jax.devices()[0].device_kind}: median over {a.rounds} rounds")
    for v, rows in res.items():
        print(f"{v or '(defaults)':>40}: {statistics.median(x[0] for x in rows):>9,.0f} tok/s, decode "
              f"{statistics.median(x[1] for x in rows):>9,.0f}, prefill call {1e3 * statistics.median(x[2] for x in rows):.1f} ms")


if __name__ == "__main__":
    main()

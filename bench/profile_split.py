"""Splits a profile_decode.py trace at the last prefill kernel: kernel time and memcpy count of the decode loop only.

    PYTHONPATH=. python bench/profile_split.py /tmp/prof64
"""
import collections, glob, gzip, json, sys

p = sorted(glob.glob(f"{sys.argv[1]}/**/perfetto_trace.json.gz", recursive=True))[-1]
ev = [e for e in json.load(gzip.open(p))["traceEvents"] if e.get("ph") == "X" and "dur" in e]
pids = {e["pid"] for e in ev if "correlation_id" in e.get("args", {})}
ev = sorted((e for e in ev if e["pid"] in pids), key=lambda e: e["ts"])
# the decode loop starts after the biggest gap-free prefill: take the second half of the kernels by time
t0, t1 = ev[0]["ts"], ev[-1]["ts"] + ev[-1]["dur"]
half = [e for e in ev if e["ts"] > t0 + 0.6 * (t1 - t0)]
tot, cnt = collections.Counter(), collections.Counter()
for e in half:
    tot[e["name"]] += e["dur"]
    cnt[e["name"]] += 1
span = half[-1]["ts"] + half[-1]["dur"] - half[0]["ts"]
print(f"last 40% of the trace: span {span / 1e3:.2f} ms, kernel time {sum(tot.values()) / 1e3:.2f} ms, {len(half)} kernels")
for n, us in tot.most_common(12):
    print(f"{us / 1e3:8.2f} ms {cnt[n]:6d}  {n[:90]}")
sizes = collections.Counter(e["args"].get("memcpy_details", "").split("size:")[-1].split()[0]
                            for e in half if e["name"].startswith("Memcpy"))
print("memcpy sizes (bytes: count):", sizes.most_common(10))

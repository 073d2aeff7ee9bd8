"""DeepSeek-V3's auxiliary-loss-free load balancing at small scale (V3 paper section 2.1.2 and 4.5.2).

Trains the same model on the same data three ways and compares expert-load balance (MaxVio) and loss:

    v3        gamma = --gamma (1e-3), alpha = --alpha (1e-4)     bias update + tiny sequence-wise loss (V3)
    no_bal    gamma = 0,              alpha = --alpha (1e-4)     no balancing to speak of
    aux_loss  gamma = 0,              alpha = --aux-alpha (3e-2) a pure auxiliary balance loss

gamma is train.bias_update_speed (b_i += gamma * sign(mean load - load_i) after every step), alpha is
train.balance_alpha (weight of the complementary sequence-wise balance loss). The claim checked: v3 has a clearly
lower MaxVio than no_bal at an equal or better loss, and than aux_loss at a better loss.

    PYTHONPATH=. JAX_PLATFORMS=cpu python bench/balancing.py    # tiny preset with 16 experts, 1500 steps, 2 seeds
    PYTHONPATH=. JAX_PLATFORMS=cpu python bench/balancing.py --experts 0 --steps 400 --aux-alpha 1e-2 \
        --root /tmp/balancing_8e --png /tmp/balancing_8e.png             # the tiny preset's own 8 experts

Each run goes to ROOT/<setting>_s<seed> (deepjax.train.loop.train; a finished run of the same config is reused, one of
another config is an error, --fresh deletes it),
then every metrics.jsonl is read back. "final" is the mean over the last 10% of steps, "run" the mean over the
whole run; MaxVio is first averaged over the MoE layers (main model only, not the MTP module). Loss is the
main model's next-token cross-entropy (not MTP, not the balance loss). Prints a table (per seed and the mean
over seeds) and writes a PNG of smoothed MaxVio and loss curves.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np

SETTINGS = ("v3", "no_bal", "aux_loss")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", help="preset name or config file (default tiny)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                   help="each seed sets the init seed and the data shuffle seed")
    p.add_argument("--gamma", type=float, default=1e-3, help="bias update speed of the v3 setting")
    p.add_argument("--alpha", type=float, default=1e-4, help="balance-loss weight of the v3 and no_bal settings")
    p.add_argument("--aux-alpha", type=float, default=3e-2, help="balance-loss weight of the aux_loss setting")
    p.add_argument("--experts", type=int, default=16,
                   help="model.n_routed_experts (tiny has 8; n_group=4 must divide it; 0: the config's)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch", type=int, default=16, help="data.global_batch (packed rows)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--override", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="more config overrides for every run, e.g. model.hidden_size=96")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    p.add_argument("--root", default="/tmp/deepjax_balancing", help="run directories go here")
    p.add_argument("--data-dir", default="/tmp/balance_tfds", help="shared TFDS data_dir (built once)")
    p.add_argument("--png", default="balancing.png", help="output figure ('' for none)")
    p.add_argument("--smooth", type=int, default=25, help="moving-average window of the plotted curves")
    p.add_argument("--fresh", action="store_true", help="delete existing run directories first")
    p.add_argument("--report-only", action="store_true", help="train nothing; read the run directories")
    p.add_argument("--json", default=None, help="also write the summary as JSON here")
    return p.parse_args(argv)


def setting_overrides(name: str, a) -> dict:
    gamma, alpha = {"v3": (a.gamma, a.alpha), "no_bal": (0.0, a.alpha), "aux_loss": (0.0, a.aux_alpha)}[name]
    return {"train.bias_update_speed": gamma, "train.balance_alpha": alpha}


def overrides_for(name: str, seed: int, a) -> list[str]:
    o = {
        "seed": seed, "data.seed": seed,
        "data.template": "plain", "data.mode": "pretrain", "data.data_dir": a.data_dir,
        "data.global_batch": a.batch, "data.seq_len": a.seq_len,
        "train.steps": a.steps, "train.checkpoint_every": a.steps, "train.keep_checkpoints": 1,
        "train.plot": False, "optim.lr": a.lr,
        **setting_overrides(name, a),
    }
    if a.experts:
        o["model.n_routed_experts"] = a.experts
    out = [f"{k}={v}" for k, v in o.items()]
    return out + list(a.override)


def read_metrics(workdir: str) -> list[dict]:
    hist = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            hist[r["step"]] = r  # a step redone after a resume keeps its last record
    return [hist[s] for s in sorted(hist)]


def summarize(recs: list[dict]) -> dict:
    loss = np.array([r["loss"] for r in recs], float)
    vio = np.array([np.mean(r["maxvio"]) for r in recs], float)
    vio_worst = np.array([np.max(r["maxvio"]) for r in recs], float)
    n = max(1, len(recs) // 10)
    return {"steps": len(recs), "loss_final": float(loss[-n:].mean()), "loss_run": float(loss.mean()),
            "maxvio_final": float(vio[-n:].mean()), "maxvio_run": float(vio.mean()),
            "maxvio_worst_final": float(vio_worst[-n:].mean()),
            "balance_loss_final": float(np.mean([r["balance_loss"] for r in recs[-n:]]))}


def run_one(name: str, seed: int, a) -> tuple[str, float]:
    workdir = os.path.join(a.root, f"{name}_s{seed}")
    if a.fresh and os.path.exists(workdir) and not a.report_only:
        shutil.rmtree(workdir)
    if a.report_only:
        return workdir, float("nan")
    from deepjax.config import load_config, to_dict
    from deepjax.train.loop import train

    cfg = load_config(a.config, overrides_for(name, seed, a))
    saved = os.path.join(workdir, "config.json")
    if os.path.exists(saved):
        with open(saved) as f:
            if json.load(f) != json.loads(json.dumps(to_dict(cfg))):
                raise SystemExit(f"{workdir} holds a run of another config: pass --fresh or another --root")
        if len(read_metrics(workdir)) >= a.steps:  # finished: reuse, with the wall time it took
            wall = os.path.join(workdir, "wall_s.txt")
            return workdir, float(open(wall).read()) if os.path.exists(wall) else float("nan")
    t0 = time.perf_counter()
    train(cfg, workdir, progress=False)
    wall = time.perf_counter() - t0
    with open(os.path.join(workdir, "wall_s.txt"), "w") as f:
        f.write(f"{wall:.1f}\n")
    return workdir, wall


def plot(curves: dict, a, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(x):
        w = max(1, min(a.smooth, len(x)))
        return np.convolve(x, np.ones(w) / w, mode="valid")

    colors = {"v3": "tab:green", "no_bal": "tab:red", "aux_loss": "tab:blue"}
    labels = {"v3": f"gamma={a.gamma:g}, alpha={a.alpha:g} (V3)", "no_bal": f"gamma=0, alpha={a.alpha:g}",
              "aux_loss": f"gamma=0, alpha={a.aux_alpha:g} (aux loss)"}
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.4))
    for (name, seed), recs in sorted(curves.items()):
        steps = np.array([r["step"] for r in recs])
        vio = np.array([np.mean(r["maxvio"]) for r in recs])
        loss = np.array([r["loss"] for r in recs])
        w = max(1, min(a.smooth, len(recs)))
        kw = dict(color=colors[name], lw=1.2, alpha=1.0 if seed == a.seeds[0] else 0.45,
                  ls="-" if seed == a.seeds[0] else "--",
                  label=labels[name] if seed == a.seeds[0] else None)
        ax[0].plot(steps[w - 1:], smooth(vio), **kw)
        ax[1].plot(steps[w - 1:], smooth(loss), **kw)
    ax[0].set_title(f"MaxVio (mean over MoE layers, {a.smooth}-step avg)", fontsize=9)
    ax[1].set_title(f"next-token CE ({a.smooth}-step avg)", fontsize=9)
    ax[1].set_yscale("log")
    for x in ax:
        x.set_xlabel("step")
        x.grid(alpha=0.3)
    ax[0].legend(fontsize=8)
    seeds = ", ".join(map(str, a.seeds))
    fig.suptitle(f"aux-loss-free balancing, {a.config} preset"
                 f"{f', {a.experts} experts' if a.experts else ''}{''.join(', ' + o for o in a.override)}; "
                 f"seeds {seeds} "
                 f"(first solid, others dashed)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def main(argv=None) -> int:
    a = parse_args(argv)
    os.makedirs(a.root, exist_ok=True)
    import jax

    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} CPUs; config {a.config}; "
          f"steps {a.steps}; seeds {a.seeds}; overrides (v3): {' '.join(overrides_for('v3', a.seeds[0], a))}",
          flush=True)
    rows, curves = [], {}
    for seed in a.seeds:
        for name in a.settings:
            workdir, wall = run_one(name, seed, a)
            recs = read_metrics(workdir)
            curves[(name, seed)] = recs
            s = summarize(recs)
            rows.append({"setting": name, "seed": seed, "wall_s": wall, **setting_overrides(name, a), **s})
            print(f"  {name} seed {seed}: {workdir}, {wall:.0f} s", 
                  flush=True)

    hdr = (f"{'setting':<9} {'gamma':>7} {'alpha':>7} {'seed':>5} {'loss final':>10} {'loss run':>9} "
           f"{'MaxVio final':>12} {'MaxVio run':>10} {'worst-layer final':>17} {'wall s':>7}")
    print("\n" + hdr + "\n" + "-" * len(hdr))
    fmt = lambda r, seed: (f"{r['setting']:<9} {r['train.bias_update_speed']:>7g} {r['train.balance_alpha']:>7g} "  # noqa: E731
                           f"{seed:>5} {r['loss_final']:>10.4f} {r['loss_run']:>9.4f} {r['maxvio_final']:>12.3f} "
                           f"{r['maxvio_run']:>10.3f} {r['maxvio_worst_final']:>17.3f} {r['wall_s']:>7.0f}")
    for r in rows:
        print(fmt(r, str(r["seed"])))
    means = []
    if len(a.seeds) > 1:
        print("-" * len(hdr))
        for name in a.settings:
            rs = [r for r in rows if r["setting"] == name]
            m = {k: float(np.mean([r[k] for r in rs])) for k in rs[0] if k not in ("setting", "seed")}
            m["setting"] = name
            means.append(m)
            print(fmt(m, "mean"))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "rows": rows, "means": means}, f, indent=1)
    if a.png:
        plot(curves, a, a.png)
        print(f"\nwrote {a.png} ({os.path.getsize(a.png) / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

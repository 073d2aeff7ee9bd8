"""Compile the full training step for a TPU pod on this (CPU) machine, and report per-chip memory and FLOPs.

    pip install -e '.[tpu]'     # libtpu: lets jax describe and compile for TPU topologies without a TPU
    python -m deepjax.train.compile_check configs/deepseek_v3.py --topology v5p:8x8x8 \\
        --mesh.fsdp=64 --mesh.expert=8 --batch 512 --seq 4096

Nothing is allocated: parameters, optimizer state and the batch are abstract (`jax.ShapeDtypeStruct` with
shardings), the step is lowered and compiled by XLA:TPU for the topology's devices, and the compiled
executable's memory analysis says what one chip would hold. Defaults for the check: activations in bf16,
full per-layer rematerialization (override with --config.model.dtype / --config.model.remat).

FLOPs: `flops_per_chip` is XLA's cost analysis, which counts a loop body once (measured: a 10-step `lax.scan`
of matmuls reports 1/10 of the unrolled figure), so with scanned layers, blocked attention / expert
dispatch and micro-batch scans it is far below the work done; `model_flops_per_chip` is the analytic
figure (step.matmul_flops_per_token: main model, PaLM convention, no MTP, no remat recompute).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# Compile-only use of libtpu: no chips are claimed, so several processes (tests, a second check) may load it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax
import jax.numpy as jnp
import optax
from jax.experimental import topologies

from deepjax import model as M
from deepjax.parallel import sharding as S
from deepjax.train import step as TS
from deepjax.config import load_config
from deepjax.schema import ConfigError

V5P_HBM_GIB = 95.0


def compile_step(cfg, devices, mesh_cfg: S.MeshConfig, batch: int, seq: int, micro_batches: int = 1):
    """Lowers and compiles the training step (deepjax/train/step.py, the one `deepjax train` runs: AdamW,
    the aux-loss-free bias update, the non-finite guard); returns (compiled, seconds, mesh)."""
    mesh = S.make_mesh(mesh_cfg, devices)
    rules = S.rules_for(mesh_cfg.rules)
    graphdef, abstract = M.abstract_init(cfg)
    optimizer = TS.adamw(optax.constant_schedule(2.2e-4), TS.split_params(abstract)[0])
    state = jax.eval_shape(lambda p: TS.init_state(p, optimizer, 0), abstract)
    state_sh = TS.state_shardings(state, mesh, rules)
    data = S.batch_spec(mesh, rules)
    b = TS.Batch(*(jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=data) for _ in range(4)))
    with S.use_mesh(mesh, rules):
        step = TS.make_train_step(graphdef, cfg, optimizer, micro_batches=micro_batches)
        jitted = jax.jit(step, donate_argnums=0, out_shardings=(state_sh, None))
        t = time.time()
        compiled = jitted.lower(S.abstract_with_shardings(state, state_sh), b).compile()
    return compiled, time.time() - t, mesh


def report(compiled) -> dict:
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    gib = 2**30
    out = {
        "argument_gib": mem.argument_size_in_bytes / gib,
        "output_gib": mem.output_size_in_bytes / gib,
        "temp_gib": mem.temp_size_in_bytes / gib,
        "alias_gib": mem.alias_size_in_bytes / gib,
        "generated_code_gib": mem.generated_code_size_in_bytes / gib,
        # XLA's count: each loop (scan) body once, see the module docstring
        "flops_per_chip": float(cost.get("flops", float("nan"))) if cost else float("nan"),
    }
    # Donated outputs alias their arguments: peak ~ arguments + temporaries + non-aliased outputs.
    out["peak_gib"] = out["argument_gib"] + out["temp_gib"] + out["output_gib"] - out["alias_gib"]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--topology", default="v5p:8x8x8")
    ap.add_argument("--batch", type=int, default=512, help="global sequences per optimizer step")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--micro-batches", type=int, default=1)
    ap.add_argument("--hbm-gib", type=float, default=V5P_HBM_GIB)
    args, rest = ap.parse_known_args(argv)
    mesh_kw, overrides = {}, []
    for r in rest:
        if r.startswith("--mesh."):
            k, v = r[len("--mesh."):].split("=", 1)
            mesh_kw[k] = v if k == "rules" else int(v)
        else:
            overrides.append(r)
    try:
        cfg = load_config(args.config, ["--config.model.dtype=bfloat16", "--config.model.remat=full",
                                        *overrides])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    topo = topologies.get_topology_desc(args.topology, "tpu")
    mesh_cfg = S.MeshConfig(**mesh_kw)
    compiled, secs, mesh = compile_step(cfg.model, topo.devices, mesh_cfg, args.batch, args.seq,
                                        args.micro_batches)
    rep = report(compiled)
    _, abstract = M.abstract_init(cfg.model)
    per_token = TS.matmul_flops_per_token(cfg.model, args.seq, M.count_active_params(cfg.model, abstract))
    rep["model_flops_per_chip"] = per_token * args.batch * args.seq / len(topo.devices)
    rep.update(topology=args.topology, chips=len(topo.devices), mesh=dict(mesh.shape), rules=mesh_cfg.rules,
               batch=args.batch, seq=args.seq, micro_batches=args.micro_batches, compile_s=round(secs, 1),
               fits=rep["peak_gib"] <= args.hbm_gib)
    print(json.dumps(rep, indent=1))
    return 0 if rep["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())

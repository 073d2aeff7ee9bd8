"""Compile the full training step for a TPU pod on this (CPU) machine, and report per-chip memory and FLOPs.

    pip install -e '.[tpu]'     # libtpu: lets jax describe and compile for TPU topologies without a TPU
    python -m deepjax.train.compile_check configs/deepseek_v3.py --topology v5p:8x8x8 \\
        --mesh.fsdp=64 --mesh.expert=8 --batch 512 --seq 4096
    python -m deepjax.train.compile_check bench --topology local --batch 8 --seq 2048 \\
        --config.model.kernels=tokamax --config.model.param_dtype=bfloat16      # the GPU program, on a GPU

Nothing is allocated: parameters, optimizer state and the batch are abstract (`jax.ShapeDtypeStruct` with
shardings), the step is lowered and compiled by XLA:TPU for the topology's devices, and the compiled
executable's memory analysis says what one chip would hold. Defaults for the check: activations in bf16,
full per-layer rematerialization (override with --config.model.dtype / --config.model.remat).

FLOPs, per chip and optimizer step (docs/LOG.md has the figures):
  flops_xla_per_chip       XLA's cost analysis: each loop body counted once, a kernel only through its
                           `pl.CostEstimate`: far below the work in a step of scanned layers.
  flops_per_chip           the compiled program's matmul FLOPs read from its optimized HLO (`hlo_flops.count`):
                           dots and convolutions from their shapes, each loop body times its trip count (XLA's
                           annotation, or the loop condition on TPU), custom kernels from their cost estimate or,
                           without one, from their shapes (`kernel_flops`).
  model_flops_per_chip     the model's FLOPs (PaLM convention, what MFU divides by): 6 x matmul-active parameters
                           + 6 x layers x heads x T x (qk + v) per token, main model and MTP modules.
  expected_flops_per_chip  model + the work a step adds by design, each named in `overhead_per_chip`: the forward
                           recomputed under remat, and expert rows computed beyond the real assignments (the XLA
                           blocked form's per-expert padding; the expert-parallel receive buffer, sized for the
                           worst case: a grouped-matmul kernel's cost estimate counts the whole buffer, though it
                           skips empty tiles at run time).
  flops_check              flops_per_chip within 15% of expected_flops_per_chip.
  bytes_per_chip           memory traffic counted the same way (`hlo_flops`), and step_s_at_peak the step time
                           flops and bytes imply at the chip's published peaks (v5p: 459 TFLOP/s bf16, 2.765
                           TB/s), mfu_at_peak_step the model FLOPs' share of that: a bound, not a prediction.
"""

from __future__ import annotations

from typing import Optional

import argparse
import contextlib
import json
import math
import os
import re
import sys
import time

# Compile-only use of libtpu: no chips are claimed, so several processes (tests, a second check) may load it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax
import jax.numpy as jnp
import optax
from jax.experimental import topologies

from deepjax import model as M
from deepjax.model import expert_parallel as EP, moe, ops
from deepjax.parallel import sharding as S
from deepjax.train import hlo_flops
from deepjax.train import step as TS
from deepjax.config import load_config
from deepjax.schema import ConfigError

V5P_HBM_GIB = 95.0
V5P_BF16_FLOPS = 459e12  # per chip, Google's published v5p peak
V5P_HBM_BYTES_S = 2765e9  # per chip
# Published dense bf16 peaks and HBM bandwidth of the GPUs the device machines lend (NVIDIA's SXM data sheets), for
# `--topology local`: (substring of device_kind, FLOP/s, bytes/s, HBM GiB).
GPU_PEAKS = (("H200", 989e12, 4.8e12, 141.0), ("H100", 989e12, 3.35e12, 80.0))


def local_peaks(device) -> tuple[float, float, float]:
    """(peak FLOP/s, peak bytes/s, HBM GiB) of a local device, from GPU_PEAKS; an error naming the device kind for
    one it does not list (a CPU's peaks are not published in a form this check can use)."""
    for name, flops, bw, hbm in GPU_PEAKS:
        if name in device.device_kind:
            return flops, bw, hbm
    raise SystemExit(f"error: --topology local: no published peaks for device kind {device.device_kind!r} "
                     f"(deepjax/train/compile_check.py GPU_PEAKS lists {[g[0] for g in GPU_PEAKS]})")


def _cross_compile():
    """tokamax checks that the default device can run its kernels; compiling for a topology this host does not
    have, that check is lifted (tokamax.config.cross_compile)."""
    try:
        import tokamax.config  # lazy on purpose: tokamax needs Python >= 3.12
    except ImportError:
        return contextlib.nullcontext()
    return tokamax.config.cross_compile(True)


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
    with S.use_mesh(mesh, rules), _cross_compile():
        step = TS.make_train_step(graphdef, cfg, optimizer, micro_batches=micro_batches)
        jitted = jax.jit(step, donate_argnums=0, out_shardings=(state_sh, None))
        t = time.time()
        compiled = jitted.lower(S.abstract_with_shardings(state, state_sh), b).compile()
    return compiled, time.time() - t, mesh


def model_flops(cfg, params, batch: int, seq: int) -> dict:
    """The model's FLOPs per optimizer step (all chips): {"main", "mtp", "remat"}. main and mtp are the PaLM
    convention (6 x matmul-active parameters + non-causal attention, per token); remat is the forward of the
    scanned layers that cfg.remat recomputes in the backward (full / save_outputs: all of it; save_dots: the
    attention products, the one matmul family with batch dimensions it does not save; save_experts: all but the
    routed experts' products)."""
    tokens = batch * seq
    D, V = cfg.hidden_size, cfg.vocab_size
    attn = 6 * cfg.num_attention_heads * seq * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)
    active = M.count_active_params(cfg, params)
    main = TS.matmul_flops_per_token(cfg, seq, active) * tokens
    unchosen = (cfg.n_routed_experts - cfg.num_experts_per_tok) * 3 * D * cfg.moe_intermediate_size
    n_mtp = cfg.num_nextn_predict_layers
    mtp_params = sum(math.prod(shape) for path, shape, _ in M.param_table(params) if path.startswith("mtp."))
    mtp = (6 * (mtp_params - n_mtp * unchosen + n_mtp * D * V) + n_mtp * attn) * tokens
    layers = active - 2 * V * D  # without the embedding and the head
    L = cfg.num_hidden_layers
    routed = cfg.n_moe_layers * cfg.num_experts_per_tok * 3 * D * cfg.moe_intermediate_size  # kept by save_experts
    remat = {"none": 0.0, "save_dots": L * attn / 3 * tokens,
             "save_experts": (2 * (layers - routed) + L * attn / 3) * tokens}.get(
        cfg.remat, (2 * layers + L * attn / 3) * tokens)
    return {"main": float(main), "mtp": float(mtp), "remat": float(remat)}


def expert_overhead(cfg, tokens_local: int, ep: int, kernels: str) -> dict:
    """FLOPs per chip per step of expert work beyond the real (token, expert) assignments: "expert_rows", rows
    computed past them (the XLA blocked form's padding, `moe.block_rows`, without expert parallelism; with it,
    the receive buffer of `expert_parallel`: ep x assignments per block of TOKEN_CHUNK tokens, dropless, or c x
    assignments with a capacity factor c) in the forward, both backward products and a recompute; and
    "expert_block_remat", the recompute of the real rows' forward that `model_flops` does not count: the
    expert-parallel token blocks are rematerialized when there are several, and a layer remat policy other than
    full / save_outputs recomputes the expert kernels too. (Measured: an outer full remat and the inner block
    remat recompute the forward once, not twice.)"""
    K, E = cfg.num_experts_per_tok, cfg.n_routed_experts
    X = tokens_local * K
    blocks = 1
    if ep > 1:
        chunk = min(tokens_local, EP.TOKEN_CHUNK) * K
        per_chunk = ep * chunk if cfg.capacity_factor is None else ep * math.ceil(cfg.capacity_factor * chunk / ep)
        blocks = math.ceil(X / chunk)
        rows = per_chunk * blocks
    elif kernels == "tokamax":
        rows = X
    else:
        b = moe.block_rows(X, E)
        rows = math.ceil((X + E * (b - 1)) / b) * b
    in_model = cfg.remat in ("full", "save_outputs")  # model_flops' remat term recomputes the real rows
    recompute = in_model or blocks > 1 or (cfg.remat not in ("none", "save_experts") and kernels == "tokamax")
    per_row = 3 * 2 * cfg.hidden_size * cfg.moe_intermediate_size * (cfg.n_moe_layers + cfg.num_nextn_predict_layers)
    return {"expert_rows": float((rows - X) * per_row * (3 + recompute)),
            "expert_block_remat": float(X * per_row if recompute and not in_model else 0.0)}


def attention_kernel_flops(name: str, operands: list, outputs: list) -> Optional[float]:
    """FLOPs of an attention kernel that carries no cost estimate, from its shapes: q, k and v are its first three
    floating-point operands of rank >= 3; 2 T S (dqk + dv) per head for the forward, every block counted (as the
    model's non-causal convention counts them; the kernels skip the blocks above the diagonal at run time).
      jax's splash attention (TPU): [.., T, d]; a backward kernel ("bwd" / no "fwd" in the name) counts twice the
        forward (it also recomputes q k^T, not counted).
      tokamax's Mosaic GPU attention: [B, T, N, d]; the forward is flash_attention_sm90 / _sm100, the backward two
        kernels named batched_body (dq; dk and dv), each counted as one forward, so the pair is the model's twice
        the forward. Their q and k come padded to a power of two (96 -> 128 at the bench preset), and the padded
        width is the one counted: the work the kernel does."""
    gpu_fwd = re.match(r"flash_attention_sm\d+", name) is not None
    gpu_bwd = name == "batched_body"
    if not (gpu_bwd or "splash" in name or "flash" in name):
        return None
    arrays = [d for dtype, d in operands if dtype in ("bf16", "f16", "f32") and len(d) >= 3]
    if len(arrays) < 3:
        return None
    q, k, v = arrays[:3]
    if gpu_fwd or gpu_bwd:
        if len(q) != 4:
            return None
        heads, T, S = q[0] * q[2], q[1], k[1]
    else:
        heads, T, S = math.prod(q[:-2]), q[-2], k[-2]
    fwd = 2.0 * heads * T * S * (q[-1] + v[-1])
    return fwd if ("fwd" in name or gpu_fwd or gpu_bwd) else 2 * fwd


def grouped_matmul_kernel_flops(name: str, operands: list, outputs: list) -> Optional[float]:
    """FLOPs of a grouped-matmul kernel without a cost estimate (tokamax's Mosaic GPU ragged dot, deepjax's Triton
    weight gradient `gmm_grad.grouped_dw`), from its shapes, every row counted (the kernels skip rows past the last
    group at run time): out [M, N] = x [M, K] times a group's [K, N] (or [N, K]) is 2 M K N; the weight gradient
    out [G, K, N] from x [M, K] and dy [M, N] is 2 M K N too."""
    if not any(s in name for s in ("ragged_dot", "gmm", "grouped")):
        return None
    floats = [d for dtype, d in operands if dtype in ("bf16", "f16", "f32", "f8e4m3fn", "f8e5m2")]
    outs = [d for dtype, d in outputs if dtype in ("bf16", "f16", "f32")]
    if not floats or not outs:
        return None
    out, x = outs[0], floats[0]
    if len(out) == 2 and len(x) == 2 and x[0] == out[0]:
        return 2.0 * out[0] * x[1] * out[1]
    mats = [d for d in floats if len(d) == 2]
    if len(out) == 3 and len(mats) >= 2 and mats[0][0] == mats[1][0]:
        return 2.0 * mats[0][0] * out[1] * out[2]
    return None


def kernel_flops(name: str, operands: list, outputs: list) -> Optional[float]:
    """`hlo_flops.count`'s fallback for kernels without a cost estimate: attention, then grouped matmuls."""
    f = attention_kernel_flops(name, operands, outputs)
    return f if f is not None else grouped_matmul_kernel_flops(name, operands, outputs)


def report(compiled, cfg=None, params=None, batch: int = 0, seq: int = 0, mesh=None,
           peak_flops: float = V5P_BF16_FLOPS, peak_bytes_s: float = V5P_HBM_BYTES_S) -> dict:
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
        "flops_xla_per_chip": float(cost.get("flops", float("nan"))) if cost else float("nan"),
    }
    # Donated outputs alias their arguments: peak ~ arguments + temporaries + non-aliased outputs.
    out["peak_gib"] = out["argument_gib"] + out["temp_gib"] + out["output_gib"] - out["alias_gib"]
    counted = hlo_flops.count(compiled.as_text(), kernel_flops)
    out["flops_per_chip"] = counted.total
    out["bytes_per_chip"] = counted.bytes
    # the step time the counted work implies at the chip's peaks (a lower bound: no overlap loss, no collectives)
    out["step_s_at_peak"] = max(counted.total / peak_flops, counted.bytes / peak_bytes_s)
    out["flops_by_kind"] = counted.by_kind
    top = sorted(counted.bytes_by_source.items(), key=lambda kv: -kv[1])[:12]
    out["bytes_by_source_top"] = {k: float(v) for k, v in top}  # where the traffic goes (jax source of each op)
    out["kernels"] = counted.kernels
    out["uncounted_kernels"] = counted.uncounted
    out["loops"] = {"counted": len(counted.loops), "trip_count_from_condition": len(counted.derived_loops),
                    "unknown_trip_count": len(counted.unknown_loops)}
    if cfg is not None:
        chips = mesh.size if mesh is not None else 1
        tensor = dict(mesh.shape).get("tensor", 1) if mesh is not None else 1
        ep = dict(mesh.shape).get("expert", 1) if mesh is not None else 1
        kernels = ops.resolve(cfg.kernels, jnp.dtype(cfg.dtype)) if mesh is None else _kernels_on(cfg, mesh)
        mf = model_flops(cfg, params, batch, seq)
        overhead = {"remat": mf["remat"] / chips, **expert_overhead(cfg, batch * seq * tensor // chips, ep, kernels)}
        out["model_flops_per_chip"] = (mf["main"] + mf["mtp"]) / chips
        out["overhead_per_chip"] = overhead
        out["expected_flops_per_chip"] = out["model_flops_per_chip"] + sum(overhead.values())
        out["flops_ratio"] = out["flops_per_chip"] / out["expected_flops_per_chip"]
        out["flops_check"] = abs(out["flops_ratio"] - 1) <= 0.15
        out["mfu_at_peak_step"] = out["model_flops_per_chip"] / (out["step_s_at_peak"] * peak_flops)
    return out


def _kernels_on(cfg, mesh) -> str:
    with S.use_mesh(mesh, S.rules_for(S.MeshConfig().rules)):
        return ops.resolve(cfg.kernels, jnp.dtype(cfg.dtype))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--topology", default="v5p:8x8x8",
                    help="a TPU topology compiled for with libtpu, or 'local': this machine's devices (the GPU "
                         "program, with the peaks of GPU_PEAKS)")
    ap.add_argument("--batch", type=int, default=512, help="global sequences per optimizer step")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--micro-batches", type=int, default=1)
    ap.add_argument("--hbm-gib", type=float, help=f"memory per chip (default: v5p's {V5P_HBM_GIB}, or the GPU's)")
    ap.add_argument("--hlo", metavar="FILE", help="write the compiled program's optimized HLO text here")
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
    if args.topology == "local":
        devices = jax.devices()
        peak_flops, peak_bytes_s, hbm = local_peaks(devices[0])
    else:
        devices = topologies.get_topology_desc(args.topology, "tpu").devices
        peak_flops, peak_bytes_s, hbm = V5P_BF16_FLOPS, V5P_HBM_BYTES_S, V5P_HBM_GIB
    hbm = args.hbm_gib or hbm
    mesh_cfg = S.MeshConfig(**mesh_kw)
    compiled, secs, mesh = compile_step(cfg.model, devices, mesh_cfg, args.batch, args.seq, args.micro_batches)
    _, abstract = M.abstract_init(cfg.model)
    rep = report(compiled, cfg.model, abstract, args.batch, args.seq, mesh, peak_flops, peak_bytes_s)
    if args.hlo:
        with open(args.hlo, "w") as f:
            f.write(compiled.as_text())
    rep.update(topology=args.topology, device_kind=devices[0].device_kind, chips=len(devices),
               mesh=dict(mesh.shape), rules=mesh_cfg.rules, batch=args.batch, seq=args.seq,
               micro_batches=args.micro_batches, compile_s=round(secs, 1), fits=rep["peak_gib"] <= hbm)
    print(json.dumps(rep, indent=1))
    return 0 if rep["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())

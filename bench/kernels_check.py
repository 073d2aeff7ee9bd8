"""The Pallas decode kernels (`deepjax.kernels`) against the XLA fused path on the GPU, bench preset.

    PYTHONPATH=. python bench/kernels_check.py

For float32 and bfloat16 and batches 1 and 64: prefill 128 random tokens, then 4 teacher-forced decode steps with
the fused weights, once with the kernels (compiled through Triton) and once without, and the unfused module path
for scale; prints the largest logit difference over the largest logit, how many (row, step) pairs differ by more
than 1e-3 of it (a routing choice flipped by rounding changes one row), and whether the greedy choices agree.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepjax import model as M
from deepjax import presets
from deepjax import sampling as SP


def decode_logits(graphdef, params, prompts, cont, kernels):
    model = nnx.merge(graphdef, params)
    cfg = model.cfg
    B, P = prompts.shape
    S = P + cont.shape[1]
    lengths = jnp.full((B,), P, jnp.int32)
    cache = SP.init_cache(cfg, B, S)
    logits, cache = SP.prefill(model, prompts, lengths, cache, SP.prefill_experts_fn(cfg))
    if kernels == "module":  # the unfused module path, for scale: two XLA paths differ this much too
        layers, fn = SP.unstack_layers(model), SP.decode_experts_fn(cfg, B)
    else:
        layers, fn = SP.fuse_layers(model, B, kernels, S), None
    out = [logits]
    for i in range(cont.shape[1]):
        logits, cache = SP.decode_step(model, cont[:, i], lengths + i, cache, fn, "absorbed", layers)
        out.append(logits)
    return jnp.stack(out, 1).astype(jnp.float32)


def main():
    print(jax.devices()[0].device_kind, jax.__version__)
    import sys
    for dtype in sys.argv[1:] or ("float32", "bfloat16"):
        cfg = dataclasses.replace(presets.bench(), dtype=dtype, param_dtype=dtype)
        graphdef, params = M.init(cfg, jax.random.key(0))
        run = jax.jit(decode_logits, static_argnums=(0, 4))
        for B in (1, 64):
            rng = np.random.default_rng(B)
            prompts = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, 128)), jnp.int32)
            cont = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, 4)), jnp.int32)
            ref = np.asarray(run(graphdef, params, prompts, cont, None))
            for other in ("gpu", "module"):
                got = np.asarray(run(graphdef, params, prompts, cont, other))
                d = np.abs(got - ref).max(-1) / np.abs(ref).max()  # [B, steps]
                agree = (got.argmax(-1) == ref.argmax(-1)).mean()
                print(f"{dtype:9s} batch {B:3d} {'kernels' if other == 'gpu' else 'module'} vs fused xla: "
                      f"max rel diff {d.max():.2e}, (row, step) over 1e-3: {int((d > 1e-3).sum())} of {d.size}; "
                      f"greedy agree {100 * agree:.1f}%; finite {np.isfinite(got).all()}", flush=True)


if __name__ == "__main__":
    main()

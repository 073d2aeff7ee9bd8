"""The Pallas decode kernels (`deepjax.kernels`) against the XLA fused path on the GPU, bench preset.

    PYTHONPATH=. python bench/kernels_check.py
    PYTHONPATH=. python bench/kernels_check.py float32 --highest   # XLA's float32 matmuls at full precision
    PYTHONPATH=. python bench/kernels_check.py float32 --batch 64   # one batch size

(--highest: under jax.default_matmul_precision("highest"); XLA:GPU's default float32 matmuls may round their
inputs, the kernels' float32 products do not, so it separates that rounding from a kernel bug.)

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


def prefill_logits(graphdef, params, prompts, fused):
    """Prefill logits and the last layer's cache rows: the module path, or `prefill_fused` with the GPU kernels."""
    model = nnx.merge(graphdef, params)
    B, P = prompts.shape
    lengths = jnp.full((B,), P, jnp.int32) - jnp.arange(B, dtype=jnp.int32) % 7  # rows of different lengths
    cache = SP.init_cache(model.cfg, B, P + 16)
    if fused:
        logits, cache = SP.prefill_fused(model, SP.fuse_layers(model, B, "gpu", P + 16), prompts, lengths, cache)
    else:
        logits, cache = SP.prefill(model, prompts, lengths, cache, SP.prefill_experts_fn(model.cfg))
    return logits.astype(jnp.float32), jnp.stack([c[:, :P] for c in (*cache.dense, *cache.moe)]).astype(jnp.float32)


def main():
    import contextlib
    import sys
    print(jax.devices()[0].device_kind, jax.__version__)
    argv = sys.argv[1:]
    batches = (1, 64)
    if "--batch" in argv:
        i = argv.index("--batch")
        batches, argv = (int(argv[i + 1]),), argv[:i] + argv[i + 2:]
    args = [a for a in argv if a != "--highest"]
    with jax.default_matmul_precision("highest") if "--highest" in argv else contextlib.nullcontext():
        for dtype in args or ("float32", "bfloat16"):
            check(dtype, batches)


def check(dtype: str, batches=(1, 64)):
    cfg = dataclasses.replace(presets.bench(), dtype=dtype, param_dtype=dtype)
    graphdef, params = M.init(cfg, jax.random.key(0))
    run = jax.jit(decode_logits, static_argnums=(0, 4))
    for B in batches:
        rng = np.random.default_rng(B)
        prompts = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, 128)), jnp.int32)
        cont = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, 4)), jnp.int32)
        pf = jax.jit(prefill_logits, static_argnums=(0, 3))
        (l0, c0), (l1, c1) = pf(graphdef, params, prompts, False), pf(graphdef, params, prompts, True)
        dl = float(jnp.abs(l1 - l0).max() / jnp.abs(l0).max())
        tok = jnp.abs(c1 - c0).max(-1) / jnp.abs(c0).max((1, 2, 3))[:, None, None]  # [layers, B, P]
        far = ", ".join(f"{100 * float((t > 1e-3).mean()):.0f}" for t in tok)
        print(f"{dtype:9s} batch {B:3d} prefill_fused vs prefill: logits max rel diff {dl:.2e}, greedy agree "
              f"{100 * float((l1.argmax(-1) == l0.argmax(-1)).mean()):.1f}%; cache rows: median rel diff "
              f"{float(jnp.median(tok)):.1e}, % of tokens over 1e-3 per layer [{far}] (a routing flip "
              "changes a token's later layers)", flush=True)
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

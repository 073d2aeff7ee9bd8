"""Writes the optimized HLO of one generate call (bench preset, bf16) to a file, for counting kernels per step.

    PYTHONPATH=. python bench/dump_decode_hlo.py --batch 1 --out /tmp/decode_b1.hlo
"""
import argparse
import dataclasses

import jax
import jax.numpy as jnp

from deepjax import model as M, presets, sampling as SP

ap = argparse.ArgumentParser()
ap.add_argument("--batch", type=int, default=1)
ap.add_argument("--out", default="/tmp/decode.hlo")
ap.add_argument("--module", action="store_true", help="the unfused module path (fused=False)")
a = ap.parse_args()
cfg = dataclasses.replace(presets.bench(), dtype="bfloat16", param_dtype="bfloat16")
graphdef, params = M.abstract_init(cfg)
prompts = jax.ShapeDtypeStruct((a.batch, 128), jnp.int32)
lengths = jax.ShapeDtypeStruct((a.batch,), jnp.int32)
sc = SP.SamplingConfig(max_new_tokens=256, temperature=0.0, fused=not a.module)
f = jax.jit(lambda p, x, l, k: SP.generate(graphdef, p, x, l, k, sc))
text = f.lower(params, prompts, lengths, jax.random.key(0)).compile().as_text()
open(a.out, "w").write(text)
print(a.out, len(text))

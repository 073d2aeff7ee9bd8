"""What the Pallas kernels share: block-size arithmetic and the `pallas_call` wrapper for both modes ("gpu":
compiled through Triton; "interpret": Pallas' interpreter, any backend)."""

from __future__ import annotations

from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton


def pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def chunk(n: int, cap: int) -> int:
    """The largest power of two dividing n, at most cap."""
    c = 1
    while c * 2 <= cap and n % (c * 2) == 0:
        c *= 2
    return c


def call(kernel, mode: str, out_shape, grid, name: str, num_warps: int = 4, num_stages: int = 2, **kw):
    params = {}
    if mode == "gpu":
        params["compiler_params"] = pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    return pl.pallas_call(kernel, out_shape=out_shape, grid=grid, interpret=mode == "interpret", name=name,
                          **params, **kw)

"""`held_jit`: jax.jit whose compiled executables the caller holds, so that jax's bounded trace caches never
evict them.

Why: jax keeps a jitted function's trace and executable in process-wide LRU caches of a few thousand entries
(`pjit._infer_params_cached`, `_pjit_lower`). One trace of the bench-preset GRPO update or sampler with the GPU
kernels (tokamax, Pallas) adds thousands of entries of its own, so tracing one evicts the other, and the next call
traces and compiles it again: on one H100 the first GRPO iteration after the warm-up recompiled the sampler (35 to
55 s) and, at 128 rows, the update (27 s) as well, every time the two alternated for the first time (docs/LOG.md,
2026-12-06). `deepjax grpo`, `train` with evaluation, and `r1zero` alternate such programs all run long.

`held_jit(fun, **jit_kwargs)` lowers and compiles once per call signature (the static arguments, the pytree
structure, and each leaf's shape, dtype, weak type and sharding) through jax's own AOT API
(`jax.jit(...).lower(...).compile()`) and calls the held `jax.stages.Compiled`; nothing jax evicts is on its path.
Called with tracers (inside another jit) it is plain `jax.jit`. It holds at most `max_entries` executables (least
recently used dropped first), like jax's caches but sized for the handful of shapes a run uses.
"""

from __future__ import annotations

import collections
import functools
import weakref
from typing import Any, Callable, Sequence

import jax
import numpy as np


def _leaf_signature(x) -> Any:
    if isinstance(x, jax.Array):
        return ("a", x.shape, x.dtype, getattr(x, "weak_type", False), x.sharding)  # (key arrays: no weak_type)
    if isinstance(x, (np.ndarray, np.generic)):
        return ("n", x.shape, x.dtype)
    return ("p", type(x))  # a Python scalar: jit traces it weakly typed by its type


class HeldJit:
    """See the module docstring. `compiles` counts the executables this object built (tests read it)."""

    def __init__(self, fun: Callable, *, static_argnums: Sequence[int] = (), max_entries: int = 8, **jit_kwargs):
        self.jitted = jax.jit(fun, static_argnums=tuple(static_argnums), **jit_kwargs)
        self.static_argnums = frozenset(static_argnums)
        self.max_entries = max_entries
        self.executables: collections.OrderedDict = collections.OrderedDict()
        self.compiles = 0
        functools.update_wrapper(self, fun)
        _LIVE.add(self)

    def __call__(self, *args):
        dynamic = [a for i, a in enumerate(args) if i not in self.static_argnums]
        leaves, tree = jax.tree.flatten(dynamic)
        if any(isinstance(x, jax.core.Tracer) for x in leaves):
            return self.jitted(*args)
        key = (tuple(args[i] for i in sorted(self.static_argnums) if i < len(args)), tree,
               tuple(_leaf_signature(x) for x in leaves))
        compiled = self.executables.get(key)
        if compiled is None:
            compiled = self.jitted.lower(*args).compile()
            self.compiles += 1
            self.executables[key] = compiled
            while len(self.executables) > self.max_entries:
                self.executables.popitem(last=False)
        else:
            self.executables.move_to_end(key)
        return compiled(*dynamic)

    def clear(self) -> None:
        self.executables.clear()


_LIVE: "weakref.WeakSet[HeldJit]" = weakref.WeakSet()


def clear_all() -> None:
    """Drops every live HeldJit's executables (as jax.clear_caches() drops jax's; tests/conftest.py calls both)."""
    for h in list(_LIVE):
        h.clear()


def held_jit(fun: Callable = None, **kwargs):
    """`HeldJit(fun, **kwargs)`; usable as a decorator with keyword arguments only (`@held_jit(static_argnums=0)`)."""
    if fun is None:
        return functools.partial(HeldJit, **kwargs)
    return HeldJit(fun, **kwargs)


__all__ = ["HeldJit", "held_jit", "clear_all"]

"""Test setup: 8 fake CPU devices (sharding tests), cheap XLA compiles, loud rank promotion.

XLA_FLAGS must be set before jax is imported anywhere, hence at the top of conftest.
"""
import os

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
# The tiny test models are compile-bound on 2 cores; unoptimized CPU code runs them fast enough.
if "xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

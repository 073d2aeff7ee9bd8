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


import gc  # noqa: E402

import pytest  # noqa: E402

from deepjax import held_jit  # noqa: E402


@pytest.fixture(scope="session")
def jax_cache_env(tmp_path_factory) -> dict:
    """Environment for `deepjax` subprocesses: one persistent compilation cache for the session's subprocess runs,
    so a straight run, its killed twin and the resumption compile each program once (a cache hit loads the
    executable that compile made: results are bitwise the same). The test process itself does not use it."""
    return {"JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Drop every compiled program when a test module ends. XLA:CPU maps memory for each executable it loads (about 6
    mappings per small program, measured); one pytest process over the whole suite reached Linux's vm.max_map_count
    (65,530) and aborted inside an XLA compile (tests/test_sharding.py's first init, session 10)."""
    yield
    jax.clear_caches()
    held_jit.clear_all()
    gc.collect()

"""Test setup: 8 fake CPU devices (sharding tests), cheap XLA compiles, loud rank promotion.

XLA_FLAGS must be set before jax is imported anywhere, hence at the top of conftest.
"""
import os

from importlib import metadata as _metadata


def _jaxlib_before(major: int, minor: int) -> bool:
    try:
        v = tuple(int(x) for x in _metadata.version("jaxlib").split(".")[:2])
    except (_metadata.PackageNotFoundError, ValueError):
        return False
    return v < (major, minor)


# The tiny test models are compile-bound on 2 cores; unoptimized CPU code runs them fast enough. XLA:CPU's classic
# fusion emitters compile these programs in about half the time of the newer MLIR ones (a tiny train step: 2.2 s
# instead of 4.8 s, measured; the suite is compile-bound) and run them about as fast; jaxlib 0.11 dropped the flag
# (an unknown XLA flag aborts the process), so it is passed to older ones only. Subprocess tests that set their own
# XLA_FLAGS (one device) take CHEAP_COMPILE.
CHEAP_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true" + (
    " --xla_cpu_use_fusion_emitters=false" if _jaxlib_before(0, 11) else "")
os.environ["DEEPJAX_TEST_CHEAP_COMPILE"] = CHEAP_COMPILE

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in _flags:
    _flags += " " + CHEAP_COMPILE
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


import contextlib  # noqa: E402
import gc  # noqa: E402

import pytest  # noqa: E402

from deepjax import held_jit  # noqa: E402


@pytest.fixture(scope="session")
def jax_cache_env(tmp_path_factory) -> dict:
    """Environment for `deepjax` subprocesses: one persistent compilation cache for the session's subprocess runs,
    so a straight run, its killed twin and the resumption compile each program once (a cache hit loads the
    executable that compile made: results are bitwise the same). The test process uses it only inside tests that
    ask for `compile_cache`."""
    return {"JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


_CACHE_KEYS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
               "jax_persistent_cache_min_entry_size_bytes")


@contextlib.contextmanager
def persistent_compile_cache(directory: str):
    """This process compiles through a persistent compilation cache in `directory` (every program, however small)
    inside the block: a program built again (a new run object's jit, a later stage of a pipeline, a resumed run)
    loads the executable its first compile made instead of compiling, so results are bitwise the same."""
    from jax.experimental.compilation_cache import compilation_cache as cc
    old = {k: getattr(jax.config, k) for k in _CACHE_KEYS}
    for k, v in zip(_CACHE_KEYS, (str(directory), 0.0, 0)):
        jax.config.update(k, v)
    cc.reset_cache()  # taken up at the next compile
    try:
        yield
    finally:
        for k, v in old.items():
            jax.config.update(k, v)
        cc.reset_cache()


@pytest.fixture
def compile_cache(jax_cache_env):
    """`jax_cache_env`'s persistent compilation cache, used by this process too while the test runs: a run made here
    and its twins in `deepjax` subprocesses (a SIGKILLed one) then compile each program once between them. Yields
    the subprocesses' environment."""
    with persistent_compile_cache(jax_cache_env["JAX_COMPILATION_CACHE_DIR"]):
        yield jax_cache_env


@pytest.fixture
def expert_problem():
    """make(seed, T, D, I, E, K): a routed-experts problem in float32, (x [T, D], routing weights [T, K], expert
    ids [T, K] (K distinct per token), [w_gate [E, D, I], w_up [E, D, I], w_down [E, I, D]])."""
    import jax.numpy as jnp
    import numpy as np

    def make(seed: int, T: int, D: int, I: int, E: int, K: int):
        rng = np.random.default_rng(seed)
        x = jnp.asarray(rng.normal(size=(T, D)), jnp.float32)
        w = jnp.asarray(rng.random((T, K)), jnp.float32)
        idx = jnp.asarray(np.stack([rng.choice(E, K, replace=False) for _ in range(T)]), jnp.int32)
        ws = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((E, D, I), (E, D, I), (E, I, D))]
        return x, w, idx, ws
    return make


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Drop every compiled program when a test module ends. XLA:CPU maps memory for each executable it loads (about 6
    mappings per small program, measured); one pytest process over the whole suite reached Linux's vm.max_map_count
    (65,530) and aborted inside an XLA compile (tests/test_sharding.py's first init, session 10)."""
    yield
    jax.clear_caches()
    held_jit.clear_all()
    gc.collect()

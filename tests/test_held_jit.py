"""deepjax.held_jit: executables held by the caller survive what evicts jax's own caches (jax.clear_caches() here
stands in for the LRU eviction a large trace causes on the GPU, docs/LOG.md 2026-12-06)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepjax.held_jit import HeldJit, held_jit

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


@pytest.fixture
def compiles():
    """A list that gets one entry per XLA backend compile while the test runs."""
    seen = []

    def listen(event, duration, **kwargs):
        if event == BACKEND_COMPILE:
            seen.append(duration)
    jax.monitoring.register_event_duration_secs_listener(listen)
    yield seen
    jax.monitoring.unregister_event_duration_listener(listen)


def _f(x, n, y):
    return x * n + y.sum()


def test_held_executables_survive_what_evicts_jit(compiles):
    plain = jax.jit(_f, static_argnums=1)
    held = held_jit(_f, static_argnums=(1,))
    x, y = jnp.arange(4.0), jnp.ones((2, 3))
    np.testing.assert_allclose(held(x, 3, y), plain(x, 3, y))
    assert held.compiles == 1
    jax.clear_caches()
    before = len(compiles)
    plain(x, 3, y)
    assert len(compiles) > before  # the failure mode: jit traces and compiles again
    before = len(compiles)
    np.testing.assert_allclose(held(x, 3, y), 3 * np.arange(4.0) + 6)
    assert len(compiles) == before and held.compiles == 1  # nothing compiled


def test_one_executable_per_signature():
    held = HeldJit(_f, static_argnums=(1,), max_entries=2)
    x = jnp.arange(4.0)
    held(x, 2, jnp.ones(3))
    held(np.arange(4.0, dtype=np.float32), 2, jnp.ones(3))  # host array of the same shape: another signature
    held(x, 2, jnp.ones(3))
    assert held.compiles == 2
    held(x, 5, jnp.ones(3))  # another static value
    held(x, 2, jnp.ones(5))  # another shape
    assert held.compiles == 4 and len(held.executables) == 2  # the least recently used dropped
    np.testing.assert_allclose(held(x, 2, jnp.ones(5)), 2 * np.arange(4.0) + 5)


def test_donation_and_tracers():
    step = held_jit(lambda s, g: (s - 0.5 * g, (g * g).sum()), donate_argnums=0)
    s = jnp.ones(3)
    s2, n = step(s, jnp.ones(3))
    np.testing.assert_allclose(s2, 0.5) and np.testing.assert_allclose(n, 3.0)
    # called inside another jit it is plain jit: traced into the outer program, nothing held
    out = jax.jit(lambda a: step(a, a)[1])(jnp.full(3, 2.0))
    np.testing.assert_allclose(out, 12.0)
    assert step.compiles == 1


def test_profile_maps_kernels_to_source_lines():
    """bench/profile.py's `hlo_sources` (grpo_bench --trace prints it beside each kernel) reads the held executable's
    optimized HLO: each instruction's innermost frames and op name."""
    import importlib.util
    import inspect
    import os

    spec = importlib.util.spec_from_file_location(
        "bench_profile", os.path.join(os.path.dirname(__file__), "..", "bench", "profile.py"))
    P = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(P)

    def inner(y):
        return jnp.sin(y) * 3.0

    def outer(x):
        return inner(jnp.tanh(x)).sum()

    f = held_jit(outer)
    f(jnp.ones((8, 8)))
    (exe,) = f.executables.values()
    src = P.hlo_sources(exe.as_text())
    line = inspect.getsourcelines(inner)[1] + 1  # the line of jnp.sin
    sines = [v for (mod, op), v in src.items() if "/sin" in v]
    assert sines and all(v.startswith(f"test_held_jit.py:{line} ") and ".inner < test_held_jit.py:" in v
                         and ".outer < " in v for v in sines), src
    assert all(mod == next(iter(src))[0] and mod for mod, _ in src)

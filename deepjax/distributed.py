"""Multi-host wiring: one process per host, each feeding only its own rows of the global batch.

On a Cloud TPU VM pod slice, `initialize()` needs no arguments: jax reads the worker list from the TPU
metadata. On multi-node GPU it takes the coordinator from the environment (JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID) or from SLURM / Open MPI, which jax detects itself. A single process
skips initialization entirely, so the same entry point runs on a laptop, a Colab VM and a pod.

Data: `process_rows` says which contiguous rows of the global batch this host's devices hold under the
batch sharding; the host loads only those and `global_batch` assembles the global jax.Array without any
host ever holding the whole batch.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh

from deepjax import sharding as S

_MULTIHOST_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")


def _tpu_pod() -> bool:
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts


def initialize(**kwargs) -> None:
    """jax.distributed.initialize when this is one process of several; a no-op otherwise.
    Must run before anything touches jax devices."""
    if jax.distributed.is_initialized():
        return
    if kwargs or _tpu_pod() or any(os.environ.get(k) for k in _MULTIHOST_ENV):
        jax.distributed.initialize(**kwargs)


def process_rows(global_batch: int, mesh: Mesh, rules: dict) -> slice:
    """The contiguous rows of a [global_batch, ...] batch held by this process's devices."""
    sharding = S.batch_spec(mesh, rules, ndim=1)
    idx = sharding.addressable_devices_indices_map((global_batch,))
    spans = sorted({(s[0].start or 0, global_batch if s[0].stop is None else s[0].stop) for s in idx.values()})
    start, stop = spans[0][0], spans[0][1]
    for a, b in spans[1:]:
        if a > stop:
            raise ValueError(f"this process's rows of the batch are not contiguous: {spans}; "
                             "order the mesh so each host's devices are adjacent along the batch axes")
        stop = max(stop, b)
    return slice(start, stop)


def global_batch(local: np.ndarray, global_batch_size: int, mesh: Mesh, rules: dict) -> jax.Array:
    """A global [global_batch_size, ...] array from this process's rows (`process_rows`)."""
    sharding = S.batch_spec(mesh, rules, ndim=local.ndim)
    return jax.make_array_from_process_local_data(sharding, local, (global_batch_size, *local.shape[1:]))

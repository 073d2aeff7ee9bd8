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

import importlib.util
import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from deepjax.errors import MeshError
from deepjax.parallel import sharding as S

_MULTIHOST_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")


def _tpu_pod() -> bool:
    """A Cloud TPU VM worker: the worker list in the environment (set by some images and by tests), else TPU
    chips on this host (/dev/accel* on v4 / v5e, /dev/vfio on v5p / v6e), whose worker list jax then reads
    from the GCE metadata (a one-host slice initializes as one process)."""
    if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        return True
    if os.environ.get("DEEPJAX_NO_TPU_DETECT") or importlib.util.find_spec("libtpu") is None:
        return False
    return os.path.exists("/dev/accel0") or (os.path.isdir("/dev/vfio") and any(
        n.isdigit() for n in os.listdir("/dev/vfio")))


def initialize(**kwargs) -> None:
    """jax.distributed.initialize when this is one process of several; a no-op otherwise.
    Must run before anything touches jax devices."""
    if jax.distributed.is_initialized():
        return
    if not kwargs and os.environ.get("JAX_COORDINATOR_ADDRESS") and not _tpu_pod():
        kwargs = _from_env()
    if kwargs or _tpu_pod() or any(os.environ.get(k) for k in _MULTIHOST_ENV):
        jax.distributed.initialize(**kwargs)


def _from_env() -> dict:
    """Coordinator, process count and this process's id from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID (jax itself reads only the address and would fail asking for the count); {} when the
    count is not set, leaving SLURM / Open MPI detection to jax."""
    n = os.environ.get("JAX_NUM_PROCESSES")
    if not n:
        return {}
    pid = os.environ.get("JAX_PROCESS_ID")
    try:
        n_i, pid_i = int(n), int(pid) if pid is not None else None
    except ValueError:
        raise MeshError(f"JAX_NUM_PROCESSES={n!r} and JAX_PROCESS_ID={pid!r} must be integers") from None
    if pid_i is None or not 0 <= pid_i < n_i:
        raise MeshError(f"JAX_PROCESS_ID={pid!r}: set it to this process's index in [0, {n_i})")
    return {"coordinator_address": os.environ["JAX_COORDINATOR_ADDRESS"], "num_processes": n_i,
            "process_id": pid_i}


def check_mesh(mesh_cfg: S.MeshConfig, batches: dict[str, int]) -> None:
    """Before a run builds anything: the mesh fits this run's devices and each batch ({"data.global_batch=16": 16})
    splits evenly over the mesh's batch shards; a MeshError naming the field otherwise. Initializes multi-host jax
    first (`initialize`), as it touches the devices."""
    initialize()
    mesh = S.make_mesh(mesh_cfg)
    for what, rows in batches.items():
        S.check_batch(rows, mesh, S.rules_for(mesh_cfg.rules), what)


def process_rows(global_batch: int, mesh: Mesh, rules: dict) -> slice:
    """The contiguous rows of a [global_batch, ...] batch held by this process's devices (a MeshError when the rows
    do not split evenly over the batch shards)."""
    S.check_batch(global_batch, mesh, rules)
    sharding = S.batch_spec(mesh, rules, ndim=1)
    idx = sharding.addressable_devices_indices_map((global_batch,))
    spans = sorted({(s[0].start or 0, global_batch if s[0].stop is None else s[0].stop) for s in idx.values()})
    start, stop = spans[0][0], spans[0][1]
    for a, b in spans[1:]:
        if a > stop:
            raise MeshError(f"this process's rows of the batch are not contiguous: {spans}; "
                            "order the mesh so each host's devices are adjacent along the batch axes")
        stop = max(stop, b)
    return slice(start, stop)


def global_batch(local: np.ndarray, global_batch_size: int, mesh: Mesh, rules: dict) -> jax.Array:
    """A global [global_batch_size, ...] array from this process's rows (`process_rows`)."""
    sharding = S.batch_spec(mesh, rules, ndim=local.ndim)
    return jax.make_array_from_process_local_data(sharding, local, (global_batch_size, *local.shape[1:]))


def from_host(x: np.ndarray, mesh: Mesh, rules: dict) -> jax.Array:
    """A [rows, ...] host array that every process holds whole, as a global array split over the batch axes (each
    process contributes its `process_rows`)."""
    rows = process_rows(x.shape[0], mesh, rules)
    return global_batch(np.ascontiguousarray(x[rows]), x.shape[0], mesh, rules)


def host_array(x: jax.Array) -> np.ndarray:
    """The whole of a (possibly multi-host) global array on this host: an all-gather across processes when
    there are several (device_get cannot read other hosts' shards), else device_get."""
    if jax.process_count() > 1:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def host_arrays(*xs):
    """`host_array` of each (None stays None); on one process a single device_get, so the copies overlap."""
    if jax.process_count() > 1:
        return [None if x is None else host_array(x) for x in xs]
    return [None if x is None else np.asarray(x) for x in jax.device_get(list(xs))]

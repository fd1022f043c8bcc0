"""Multi-process start-up: `jax.distributed.initialize()` when the environment describes a cluster.

JAX runs one Python process per host (or per accelerator); every process runs the same program and
they meet through a coordinator. `maybe_initialize()` (called by `dsjax.train.loop.train` before it
touches a device) starts that runtime when one of these environments is found, and does nothing on a
single machine:

- generic: `JAX_COORDINATOR_ADDRESS=host:port`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` (optionally
  `JAX_LOCAL_DEVICE_IDS=0,1,...`, read by JAX itself);
- SLURM: `SLURM_NTASKS > 1` (an `srun` step with several tasks). JAX derives the coordinator from
  the node list and the job id and, with one task per GPU, gives task `SLURM_LOCALID` its GPU. With
  one task per node, every GPU of the node is given to that task (from `SLURM_GPUS_ON_NODE`);
- Cloud TPU pod slices: `TPU_WORKER_HOSTNAMES` lists more than one host. JAX finds the rest itself
  (on TPU the call is optional, but it sets up the same coordination service as on GPUs).

`DSJAX_DISTRIBUTED=1` forces the call (JAX's own cluster auto-detection: Open MPI, Kubernetes, ...),
`DSJAX_DISTRIBUTED=0` disables it. It must happen before JAX creates its backends; a process that
already initialised the runtime is left as it is.
"""

from __future__ import annotations

import logging
import os
from typing import Mapping

import jax

log = logging.getLogger(__name__)

__all__ = ["cluster_arguments", "maybe_initialize"]


def _int(environ: Mapping[str, str], name: str) -> int | None:
    try:
        return int(environ[name])
    except (KeyError, ValueError):
        return None


def cluster_arguments(environ: Mapping[str, str] | None = None) -> dict | None:
    """Keyword arguments for `jax.distributed.initialize` that `environ` calls for, or None."""
    environ = os.environ if environ is None else environ
    switch = environ.get("DSJAX_DISTRIBUTED", "").strip().lower()
    if switch in ("0", "false", "no", "off"):
        return None
    if environ.get("JAX_COORDINATOR_ADDRESS") and _int(environ, "JAX_NUM_PROCESSES") is not None:
        num_processes = _int(environ, "JAX_NUM_PROCESSES")
        process_id = _int(environ, "JAX_PROCESS_ID")
        if process_id is None:
            raise ValueError("JAX_COORDINATOR_ADDRESS and JAX_NUM_PROCESSES are set, but JAX_PROCESS_ID is not")
        if num_processes > 1:
            return dict(coordinator_address=environ["JAX_COORDINATOR_ADDRESS"], num_processes=num_processes,
                        process_id=process_id)
        return None
    if (_int(environ, "SLURM_NTASKS") or 1) > 1 and "SLURM_PROCID" in environ:
        arguments: dict = {}
        nodes = _int(environ, "SLURM_STEP_NUM_NODES") or _int(environ, "SLURM_JOB_NUM_NODES") or _int(
            environ, "SLURM_NNODES")
        gpus = _int(environ, "SLURM_GPUS_ON_NODE")
        # JAX's SLURM support assumes one task per GPU (it would give a per-node task GPU 0 only).
        if nodes == _int(environ, "SLURM_NTASKS") and gpus and "JAX_LOCAL_DEVICE_IDS" not in environ:
            arguments["local_device_ids"] = list(range(gpus))
        return arguments
    if len([h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1:
        return {}
    if switch in ("1", "true", "yes", "on"):
        return {}
    return None


def maybe_initialize() -> bool:
    """Starts JAX's multi-process runtime if the environment describes a cluster; True if it runs."""
    if jax.distributed.is_initialized():
        return True
    arguments = cluster_arguments()
    if arguments is None:
        return False
    log.info("jax.distributed.initialize(%s)", ", ".join(f"{k}={v!r}" for k, v in arguments.items()))
    jax.distributed.initialize(**arguments)
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return True

"""Multi-host start-up: `jax.distributed.initialize` when (and only when) the run spans hosts.

* Explicit: `JAX_COORDINATOR_ADDRESS=host:port JAX_NUM_PROCESSES=N
  JAX_PROCESS_ID=i` in every process's environment (any cluster, and the
  2-process test on 127.0.0.1).
* Detected: a Cloud TPU pod slice (`TPU_WORKER_HOSTNAMES` lists several
  workers), SLURM with several tasks, Open MPI with several ranks: JAX's own
  cluster detection fills in the rest.
* Otherwise one host: nothing to do.
"""

from __future__ import annotations

import os
import platform

from absl import logging


def _cluster_detected() -> bool:
  if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
    return True
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  return int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1


def maybe_initialize() -> bool:
  """Initialises `jax.distributed` for a multi-host run; returns whether it did."""
  import jax

  address = os.environ.get("JAX_COORDINATOR_ADDRESS")
  if address:
    jax.distributed.initialize(
      coordinator_address=address,
      num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
      process_id=int(os.environ["JAX_PROCESS_ID"]),
    )
    return True
  if _cluster_detected():
    jax.distributed.initialize()
    return True
  return False


def log_runtime() -> None:
  """Versions and the device layout, printed once (process 0)."""
  import flax
  import jax
  import optax
  import orbax.checkpoint

  if jax.process_index() != 0:
    return
  devices = jax.devices()
  kinds = sorted({d.device_kind for d in devices})
  print(
    f"python {platform.python_version()}, jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}, "
    f"orbax {orbax.checkpoint.__version__}; {len(devices)} {'/'.join(kinds)} device(s) on {jax.process_count()} "
    f"host(s), {jax.local_device_count()} local"
  )
  logging.info("devices: %s", devices)

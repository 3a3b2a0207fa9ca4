"""Joining a multi-process (multi-host) run through JAX's own runtime, `jax.distributed`."""
import os

import jax
from jax.experimental import multihost_utils


def initialize(coordinator: str | None, num_processes: int | None,
               process_id: int | None) -> None:
  """Joins the run when this is one of several processes: explicitly (coordinator address,
  process count and id, as `launch.local` passes them) or as JAX detects it (Cloud TPU pods,
  SLURM). A single process on a machine of its own does nothing."""
  if num_processes and num_processes > 1:
    # CPU processes (local fake hosts) exchange data through gloo; GPUs and TPUs ignore this
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator, num_processes, process_id)
  elif _on_multihost_tpu():
    jax.distributed.initialize()


def _on_multihost_tpu() -> bool:
  hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  return len([h for h in hosts.split(',') if h]) > 1


def barrier(name: str) -> None:
  """Waits until every process gets here (nothing to wait for in a single process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)

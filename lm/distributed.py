"""Joining a multi-process (multi-host) run through JAX's own runtime, `jax.distributed`."""
import os
from collections.abc import Callable
from typing import TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

from lm.config import ConfigError

T = TypeVar('T')


def initialize(coordinator: str | None, num_processes: int | None,
               process_id: int | None) -> None:
  """Joins the run when this is one of several processes: explicitly (coordinator address,
  process count and id, as `launch.local` passes them) or as JAX detects it (Cloud TPU pods,
  SLURM). A single process on a machine of its own does nothing."""
  if num_processes and num_processes > 1:
    # CPU processes (local fake hosts) exchange data through gloo; GPUs and TPUs ignore this
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator, num_processes, process_id)
    if jax.default_backend() == 'cpu':
      # jaxlib 0.12: processes that load their step from the persistent compilation cache
      # deadlock in its first gloo all-reduce (each waits in another one; 3 hung runs of 3
      # once the cache held the program, none of 4 compiling it), so CPU hosts compile
      jax.config.update('jax_enable_compilation_cache', False)
  elif _on_multihost_tpu():
    jax.distributed.initialize()


def _on_multihost_tpu() -> bool:
  hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  return len([h for h in hosts.split(',') if h]) > 1


def barrier(name: str) -> None:
  """Waits until every process gets here (nothing to wait for in a single process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


class PeerError(RuntimeError):
  """Another process failed at a step every process takes."""


MESSAGE_BYTES = 1024


def main_first(fn: Callable[[], T], what: str) -> T:
  """fn() on process 0 first, then on the others (which then read what it made).

  The others wait in a collective that also carries process 0's error message, so a failure
  there ends every process at once, naming the cause, instead of leaving them to time out."""
  if jax.process_count() == 1:
    return fn()
  error, message = None, ''
  if jax.process_index() == 0:
    try:
      result = fn()
    except Exception as e:  # noqa: BLE001 - passed on to the others, then raised here
      error = e
      message = f'{"config" if isinstance(e, ConfigError) else type(e).__name__}|{e}'
  message = _broadcast_text(message)
  if error is not None:
    raise error
  if jax.process_index() == 0:
    return result
  if message:
    kind, _, text = message.partition('|')
    cls = ConfigError if kind == 'config' else PeerError
    raise cls(f'process 0 failed while {what}: {text}')
  return fn()


def _broadcast_text(text: str) -> str:
  """Process 0's text on every process."""
  data = np.zeros(MESSAGE_BYTES, np.uint8)
  raw = text.encode('utf-8')[:MESSAGE_BYTES]
  data[:len(raw)] = np.frombuffer(raw, np.uint8)
  received = np.asarray(multihost_utils.broadcast_one_to_all(data))
  return bytes(received).rstrip(b'\0').decode('utf-8', 'replace')

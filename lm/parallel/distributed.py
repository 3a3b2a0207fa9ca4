"""Joining a multi-process (multi-host) run through JAX's own runtime, `jax.distributed`."""
import atexit
import os
import sys
import threading
import time
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


# A process that stops (killed, its host lost) leaves the others waiting in a collective, or
# ended by JAX's own heartbeat check (100 s) with an abort and no word of which process went.
# Each process beats through the coordination service's key-value store instead, and ends,
# naming the process, once a peer has been silent for `peer_timeout` seconds.
BEAT_S = 2.0
PEER_TIMEOUT_S = 30.0
LOST_PEER_EXIT = 4   # lm.main's exit code when another process of the run was lost
_ALIVE, _DONE = 'lm/alive/', 'done'
_STOPPING = threading.Event()


def _client():
  from jax._src import distributed as jax_distributed
  return jax_distributed.global_state.client


def watch_peers(timeout_s: float = PEER_TIMEOUT_S, on_lost: Callable[[str], None] | None = None
                ) -> None:
  """In a run of several processes, starts a daemon thread that beats every BEAT_S seconds
  and, when another process has not beaten for `timeout_s` seconds (or the coordination
  service, on process 0, no longer answers), calls on_lost(message): by default prints the
  message and ends this process with exit code LOST_PEER_EXIT at once, in the middle of a
  collective if need be (the lost process can no longer take part in any)."""
  if jax.process_count() == 1 or timeout_s <= 0:
    return
  client, me, n = _client(), jax.process_index(), jax.process_count()
  on_lost = on_lost or _end_lost
  # this process's own exit (JAX's shutdown at exit cancels the watch's calls) is no loss:
  # atexit runs the last registered first, so this is set before JAX shuts its client down
  _STOPPING.clear()
  atexit.register(_STOPPING.set)

  def beat() -> None:
    seen = {p: (None, time.monotonic()) for p in range(n) if p != me}
    count = 0
    while not _STOPPING.is_set():
      count += 1
      try:
        client.key_value_set(f'{_ALIVE}{me}', str(count), allow_overwrite=True)
        beats = dict(client.key_value_dir_get(_ALIVE))
      except Exception as e:  # noqa: BLE001 - the service runs in process 0
        if _STOPPING.is_set() or seen.get(0, (None,))[0] == _DONE:
          return   # this process is ending, or process 0 ended its run and shut the service
        return on_lost(f'lost process 0 of {n} (the coordination service it runs stopped '
                       f'answering: {str(e).splitlines()[0]})')
      now = time.monotonic()
      for p, (value, since) in seen.items():
        latest = beats.get(f'{_ALIVE}{p}')
        if latest != value:
          seen[p] = (latest, now)
        elif latest != _DONE and now - since > timeout_s:
          return on_lost(f'lost process {p} of {n}: no heartbeat for {now - since:.0f} s')
      time.sleep(BEAT_S)
  threading.Thread(target=beat, name='lm-peer-watch', daemon=True).start()


def _end_lost(message: str) -> None:
  print(f'error: {message}; ending this process too: relaunch every process of the run to '
        'resume from its newest checkpoint', file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(LOST_PEER_EXIT)


def await_lost_peer(error: Exception, timeout_s: float) -> None:
  """After a failed collective in a run of several processes, waits (up to the watch's
  timeout) for watch_peers to find the process that was lost; returns when none is."""
  if jax.process_count() > 1 and timeout_s > 0 and isinstance(error, jax.errors.JaxRuntimeError):
    time.sleep(timeout_s + 2 * BEAT_S)


def done() -> None:
  """Tells the other processes' watches that this one ended on purpose (not lost), and
  stops its own."""
  if jax.process_count() > 1:
    _STOPPING.set()
    _client().key_value_set(f'{_ALIVE}{jax.process_index()}', _DONE, allow_overwrite=True)


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
  message = broadcast_text(message)
  if error is not None:
    raise error
  if jax.process_index() == 0:
    return result
  if message:
    kind, _, text = message.partition('|')
    cls = ConfigError if kind == 'config' else PeerError
    raise cls(f'process 0 failed while {what}: {text}')
  return fn()


def broadcast_text(text: str) -> str:
  """Process 0's text on every process (up to MESSAGE_BYTES of it)."""
  if jax.process_count() == 1:
    return text
  data = np.zeros(MESSAGE_BYTES, np.uint8)
  raw = text.encode('utf-8')[:MESSAGE_BYTES]
  data[:len(raw)] = np.frombuffer(raw, np.uint8)
  received = np.asarray(multihost_utils.broadcast_one_to_all(data))
  return bytes(received).rstrip(b'\0').decode('utf-8', 'replace')

"""What the commands share beyond their command line (`lm.config.arguments`): JAX's platform,
CPU devices and compilation cache set before JAX starts, and `run`, a command's entry point."""
import glob
import os
import sys
from collections.abc import Callable

from lm.config import ConfigError
from lm.config.arguments import fail


def skip_absent_tpu() -> None:
  """JAX on the CPU alone where libtpu is installed (the `tpu` extra, for compiling TPU
  programs) but the machine has neither a TPU nor an NVIDIA GPU: otherwise JAX starts libtpu,
  which prints a page of warnings about the TPU it cannot find. JAX_PLATFORMS, when set,
  decides. Call before JAX makes its backends (lm.plan, which compiles for TPU, does not)."""
  if 'JAX_PLATFORMS' in os.environ:
    return
  accelerators = ('/dev/accel*', '/dev/vfio/[0-9]*', '/dev/nvidia[0-9]*')
  if not any(glob.glob(pattern) for pattern in accelerators):
    os.environ['JAX_PLATFORMS'] = 'cpu'
    if 'jax' in sys.modules:   # it read the variable when imported: tell it
      sys.modules['jax'].config.update('jax_platforms', 'cpu')


def use_compilation_cache() -> None:
  """JAX's persistent compilation cache for the commands that compile (a rerun, a resume or
  the next point of a sweep loads its programs instead of compiling them again): in
  $JAX_COMPILATION_CACHE_DIR when set (empty: none), else ~/.cache/lm/jax."""
  import jax
  directory = os.environ.get('JAX_COMPILATION_CACHE_DIR')
  if directory is None:
    cache_home = os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache')
    directory = os.path.join(cache_home, 'lm', 'jax')
  if directory:
    jax.config.update('jax_compilation_cache_dir', directory)


def split_cpu(devices: int) -> None:
  """config.mesh.cpu_devices: JAX's CPU client made with `devices` devices, so that a run
  without accelerators spreads each step over the cores along the data axis (XLA:CPU spreads
  one small op over cores poorly: nanoGPT's CPU recipe on 2 cores took 70 ms per step on one
  device, 45 on two). Call before JAX makes its backends. A count chosen in XLA_FLAGS
  (--xla_force_host_platform_device_count, as tests and launch.local set it) is kept."""
  if devices <= 0 or 'xla_force_host_platform_device_count' in os.environ.get('XLA_FLAGS', ''):
    return
  import jax
  # A device waiting in a collective holds one of XLA:CPU's threads, whose pools have
  # max(cores, devices) threads: with 2 devices on 2 cores, runs of 400-2000 steps and 8-50
  # evaluations deadlocked in the eval step's all-reduce 6 times in 9; with cores + devices
  # threads (PJRT_NPROC sizes the pools), in none of 6.
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  os.environ.setdefault('PJRT_NPROC', str((cores or 1) + devices))
  jax.config.update('jax_num_cpu_devices', devices)


def run(main: Callable[[list[str]], object], argv: list[str] | None = None) -> None:
  """A command's entry point: `main(argv)` (by default the command line's arguments), with bad
  input (a ConfigError, which names the field or file) reported as one line on stderr and exit
  code 2 instead of a traceback."""
  skip_absent_tpu()
  try:
    main(sys.argv[1:] if argv is None else argv)
  except ConfigError as e:
    fail(str(e))

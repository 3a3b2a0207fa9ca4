"""What every command shares: absl flag parsing where a missing experiment file or an unknown
`--config.*` override key is one line on stderr and exit code 2, not a traceback."""
import argparse
import glob
import os
import re
import sys
from collections.abc import Callable

from absl import flags

from lm.config import ConfigError


def _config_value(argv: list[str]) -> str | None:
  """--config's value (FILE or FILE:VARIANT), read from the command line: the experiment is
  loaded while the flags are parsed."""
  for i, arg in enumerate(argv):
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
    if arg.startswith('--config='):
      return arg.removeprefix('--config=')
  return None


def _config_path(value: str) -> str:
  """The experiment file of a --config value, without its :variant."""
  return value if os.path.exists(value) else value.rpartition(':')[0] or value


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a missing experiment file, an unknown variant or a mistyped
  override key reported as one line (exit 2) instead of a traceback."""
  value = _config_value(argv)
  path = None if value is None else _config_path(value)
  if path is not None and not os.path.exists(path):
    fail(f'--config: no such experiment file: {path}')
  if path is not None and os.path.exists(os.path.join(os.path.dirname(path), '__init__.py')):
    # an experiment in a package imports its siblings (`from experiments import x`), also
    # when the command is a script outside the repository root (python benchmarks/x.py)
    parent = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if parent not in sys.path:
      sys.path.insert(0, parent)
  try:
    return flags.FLAGS(argv)
  except SystemExit as e:   # absl exits 1 after printing the help a user asked for
    asked = any(a.split('=')[0] in ('--help', '-h', '-?', '--helpshort', '--helpfull')
                for a in argv[1:])
    sys.exit(0 if asked else e.code)
  except (AttributeError, KeyError) as e:   # an override naming a key the config lacks
    fail(f'a --config.* override names no config key: {_one_line(e)}')
  except flags.Error as e:   # an unknown flag, a bad value, a missing one, a refused variant
    for cause in _causes(e):
      if isinstance(cause, ConfigError):   # get_config refused the variant (read_variant)
        fail(f'--config={value}: {cause}')
      if isinstance(cause, TypeError) and 'get_config() takes 0' in str(cause):
        fail(f'--config={value}: {path} has no variants (give the file alone)')
    line = str(e).splitlines()[0].removesuffix(': Error whilst parsing config file:')
    fail(re.sub(r'^flags \w+=[^:]*: ', '', line))   # a validator of several flags: its message


def _causes(error: BaseException) -> list[BaseException]:
  """The error and those it came from, the first cause last."""
  chain = []
  while error is not None and error not in chain:
    chain.append(error)
    error = error.__cause__ or error.__context__
  return chain[::-1]


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


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
  """The description as written, and each flag's default after its help (where it has one)."""

  def _get_help_string(self, action: argparse.Action) -> str:
    if action.default is None or action.default is False:
      return action.help
    return super()._get_help_string(action)


def parser(prog: str, description: str | None) -> argparse.ArgumentParser:
  """The one style of the argparse commands: flags spelled with underscores (hyphenated ones
  that commands took before stay as aliases), every flag with its help and default, and no
  prefix of a flag taken for it (`--max_new_token` is an error, not `--max_new_tokens`)."""
  return argparse.ArgumentParser(prog=prog, description=description,
                                 formatter_class=HelpFormatter, allow_abbrev=False)


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


def load_config(holder: flags.FlagHolder):
  """The experiment's config with the overrides applied (they are applied on first use)."""
  try:
    return holder.value
  except (AttributeError, KeyError) as e:
    fail(f'a --config.* override names no config key: {_one_line(e)}')


def _one_line(error: Exception) -> str:
  """ml_collections' message, which arrives as the repr of a KeyError's text, as one line."""
  text = str(error.args[0] if error.args else error)
  return ' '.join(text.replace('\\n', ' ').replace('\\', '').replace("'", '').split())


def run(main: Callable[[list[str]], object], argv: list[str] | None = None) -> None:
  """A command's entry point: `main(argv)` (by default the command line's arguments), with bad
  input (a ConfigError, which names the field or file) reported as one line on stderr and exit
  code 2 instead of a traceback."""
  skip_absent_tpu()
  try:
    main(sys.argv[1:] if argv is None else argv)
  except ConfigError as e:
    fail(str(e))


def fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)

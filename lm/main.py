"""Command line: `python -m lm.main --config experiments/X.py --workdir DIR [--config.a.b=v]`."""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from lm import config as config_lib

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment file with get_config().',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (resumes if it has checkpoints).')
_COORDINATOR = flags.DEFINE_string('coordinator', None, 'host:port of process 0, for a run of '
                                   'several processes (auto-detected on Cloud TPU).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, 0 .. num_processes - 1.')
flags.mark_flags_as_required(['config', 'workdir'])


def _config_path(argv: list[str]) -> str | None:
  """The experiment file named by --config (without its :variant), read from the command line:
  with overrides present, a missing file fails while the flags are parsed."""
  for i, arg in enumerate(argv):
    if arg == '--config' and i + 1 < len(argv):
      value = argv[i + 1]
    elif arg.startswith('--config='):
      value = arg.removeprefix('--config=')
    else:
      continue
    return value if os.path.exists(value) else value.rpartition(':')[0] or value
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a missing experiment file or a mistyped override key reported
  as one line (exit 2) instead of a traceback."""
  path = _config_path(argv)
  if path is not None and not os.path.exists(path):
    _fail(f'--config: no such experiment file: {path}')
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:   # an override naming a key the config lacks
    _fail(f'a --config.* override names no config key: {_one_line(e)}')


def load_config():
  """The experiment's config with the overrides applied (they are applied on first use)."""
  try:
    return _CONFIG.value
  except (AttributeError, KeyError) as e:
    _fail(f'a --config.* override names no config key: {_one_line(e)}')


def _one_line(error: Exception) -> str:
  """ml_collections' message, which arrives as the repr of a KeyError's text, as one line."""
  text = str(error.args[0] if error.args else error)
  return ' '.join(text.replace('\\n', ' ').replace('\\', '').replace("'", '').split())


def _fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)
  from lm import distributed, train  # after flag parsing: --help does not import JAX
  try:
    config = load_config()
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    train.train(config, _WORKDIR.value)
  except (config_lib.ConfigError, train.NonFiniteError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except distributed.PeerError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)

"""Command line: `python -m lm.main --config experiments/X.py --workdir DIR [--config.a.b=v]`."""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from lm import cli
from lm import config as config_lib

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment file with get_config().',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (resumes if it has checkpoints).')
_COORDINATOR = flags.DEFINE_string('coordinator', None, 'host:port of process 0, for a run of '
                                   'several processes (auto-detected on Cloud TPU).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, 0 .. num_processes - 1.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)
  cli.use_compilation_cache()
  from lm import distributed, train  # after flag parsing: --help does not import JAX
  try:
    config = cli.load_config(_CONFIG)
    cli.split_cpu(config.mesh.cpu_devices)
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    train.train(config, _WORKDIR.value)
  except (config_lib.ConfigError, train.NonFiniteError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except distributed.PeerError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)

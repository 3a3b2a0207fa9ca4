"""Command line: `python -m lm.main --config experiments/X.py --workdir DIR [--config.a.b=v]`
trains (or resumes) one run; `--show_config` prints its resolved config instead."""
import os
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
_PEER_TIMEOUT = flags.DEFINE_float(
    'peer_timeout', 30.0, 'In a run of several processes: seconds without a heartbeat from '
    'another process after which every process ends (exit code 4), naming the lost one; 0: '
    'never (JAX then aborts after its own 100 s).')
_SHOW_CONFIG = flags.DEFINE_bool(
    'show_config', False, 'Print the resolved config, every key with its value and meaning, '
    'and exit (no --workdir needed).')
flags.mark_flags_as_required(['config'])
flags.register_multi_flags_validator(
    ['workdir', 'show_config'], lambda f: bool(f['workdir']) or f['show_config'],
    message='--workdir is required (the run directory; it resumes if it holds checkpoints)')
STORAGE_EXIT = 3   # the workdir's storage refused a write (full, read-only, gone): see README
INTERRUPTED_EXIT = 130   # Ctrl-C, as shells report SIGINT (128 + 2)


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)
  cli.skip_absent_tpu()
  cli.use_compilation_cache()
  from lm.parallel import distributed  # after flag parsing: --help does not import JAX
  from lm.training import loop as train
  try:
    config = cli.load_config(_CONFIG)
    if _SHOW_CONFIG.value:
      from lm.config import reference
      print(reference.annotated(config_lib.resolve(config, None)))
      return
    cli.split_cpu(config.mesh.cpu_devices)
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    train.train(config, _WORKDIR.value, _PEER_TIMEOUT.value)
    distributed.done()
  except (config_lib.ConfigError, train.NonFiniteError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except distributed.PeerError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  except (train.Interrupted, KeyboardInterrupt) as e:
    print(str(e) if isinstance(e, train.Interrupted) else
          'interrupted before the first step: rerun the same command to start', file=sys.stderr)
    sys.exit(INTERRUPTED_EXIT)
  except Exception as e:  # noqa: BLE001 - a refused write is one line, anything else raises
    # a collective that failed because a peer died (gloo's connection reset): the watch
    # names the lost process and ends this one within the timeout
    distributed.await_lost_peer(e, _PEER_TIMEOUT.value)
    from lm.training import checkpoint
    problem = checkpoint.storage_problem(e, str(config_lib.RunDir(_WORKDIR.value).path))
    if isinstance(e, checkpoint.StorageError):
      message = str(e)
    elif problem:
      message = (f'writing to {_WORKDIR.value} failed: {problem} ({type(e).__name__}: '
                 f'{str(e).splitlines()[0]}); rerun the same command once it is writable: the '
                 'run resumes from its newest checkpoint')
    else:
      raise
    print(f'error: {message}', file=sys.stderr, flush=True)
    sys.stdout.flush()
    # Orbax's writer threads may still be failing: a normal shutdown prints their tracebacks
    os._exit(STORAGE_EXIT)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)

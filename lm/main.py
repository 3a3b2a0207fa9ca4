"""Command line: `python -m lm.main --config experiments/X.py --workdir DIR [--config.a.b=v]`
trains (or resumes) one run; `--show_config` prints its resolved config instead."""
import os
import sys

from absl import logging

from lm import cli
from lm import config as config_lib
from lm.config import arguments

STORAGE_EXIT = 3   # the workdir's storage refused a write (full, read-only, gone): see README
INTERRUPTED_EXIT = 130   # Ctrl-C, as shells report SIGINT (128 + 2)


def _parser():
  parser = arguments.parser('python -m lm.main', __doc__)
  arguments.add_config(parser)
  parser.add_argument('--workdir', help='run directory (resumes if it has checkpoints); '
                      'required unless --show_config')
  parser.add_argument('--show_config', action='store_true', help='print the resolved config, '
                      'every key with its value and meaning, and exit')
  hosts = parser.add_argument_group('several processes', 'a run over several hosts (Cloud TPU '
                                    'slices find these themselves)')
  hosts.add_argument('--coordinator', help='host:port of process 0')
  hosts.add_argument('--num_processes', type=int, help='processes in the run')
  hosts.add_argument('--process_id', type=int, help='this process, 0 .. num_processes - 1')
  hosts.add_argument('--peer_timeout', type=float, default=30.0,
                     help='seconds without a heartbeat from another process after which every '
                     'process ends (exit code 4), naming the lost one; 0: never (JAX then '
                     'aborts after its own 100 s)')
  return parser


def main(argv: list[str]) -> None:
  parser = _parser()
  args = arguments.parse(parser, argv)
  if not (args.workdir or args.show_config):
    arguments.fail('--workdir is required (the run directory; it resumes if it holds checkpoints)')
  logging.set_verbosity(logging.WARNING)
  cli.use_compilation_cache()
  from lm.parallel import distributed  # after the flags: a mistake does not wait for JAX
  from lm.training import loop as train
  config = args.config
  try:
    if args.show_config:
      from lm.config import reference
      print(reference.annotated(config_lib.resolve(config, None)))
      return
    cli.split_cpu(config.mesh.cpu_devices)
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    train.train(config, args.workdir, args.peer_timeout)
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
    distributed.await_lost_peer(e, args.peer_timeout)
    from lm.training import checkpoint
    problem = checkpoint.storage_problem(e, str(config_lib.RunDir(args.workdir).path))
    if isinstance(e, checkpoint.StorageError):
      message = str(e)
    elif problem:
      message = (f'writing to {args.workdir} failed: {problem} ({type(e).__name__}: '
                 f'{str(e).splitlines()[0]}); rerun the same command once it is writable: the '
                 'run resumes from its newest checkpoint')
    else:
      raise
    print(f'error: {message}', file=sys.stderr, flush=True)
    sys.stdout.flush()
    # Orbax's writer threads may still be failing: a normal shutdown prints their tracebacks
    os._exit(STORAGE_EXIT)


if __name__ == '__main__':
  cli.run(main)

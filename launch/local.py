"""Several local processes acting as the hosts of one run (CPU devices, gloo collectives).

    python -m launch.local --hosts 2 --config experiments/X.py --workdir DIR [--config.a.b=v]

Process 0 is the coordinator (on 127.0.0.1) and prints to the terminal; host i > 0 writes
to DIR/logs/host_i.log. Every host gets --devices_per_host CPU devices. If any host fails,
the others are stopped and the exit code is the failed host's.
"""
import os
import socket
import subprocess
import sys
import time

from lm.config import arguments


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def host_commands(hosts: int, port: int, workdir: str, passed: list[str]) -> list[list[str]]:
  """The `python -m lm.main` command line of every host."""
  return [[sys.executable, '-m', 'lm.main', f'--workdir={workdir}',
           f'--coordinator=127.0.0.1:{port}', f'--num_processes={hosts}', f'--process_id={i}',
           *passed] for i in range(hosts)]


def xla_flags_with_cpu_devices(devices: int, *flags: str | None) -> str:
  """XLA_FLAGS made of `flags` (empty ones left out) and a CPU device count, appended last:
  XLA takes the last of a repeated flag, so it replaces a count already in `flags`."""
  return ' '.join(filter(None, (*flags, f'--xla_force_host_platform_device_count={devices}')))


def run(hosts: int, devices_per_host: int, workdir: str, passed: list[str]) -> int:
  """Starts the hosts and waits for them; returns the run's exit code."""
  # the caller's XLA flags reach the hosts, with their own device count
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': xla_flags_with_cpu_devices(devices_per_host, os.environ.get('XLA_FLAGS'))}
  logs = os.path.join(workdir, 'logs')
  os.makedirs(logs, exist_ok=True)
  procs = []
  for i, command in enumerate(host_commands(hosts, _free_port(), workdir, passed)):
    out = None if i == 0 else open(os.path.join(logs, f'host_{i}.log'), 'w')
    procs.append(subprocess.Popen(command, env=env, stdout=out, stderr=out))
  while True:
    codes = [p.poll() for p in procs]
    failed = [c for c in codes if c not in (None, 0)]
    if failed or all(c == 0 for c in codes):
      break
    time.sleep(0.2)
  for p in procs:
    if p.poll() is None:
      p.kill()
  return failed[0] if failed else 0


def main(argv: list[str] | None = None) -> None:
  parser = arguments.parser('python -m launch.local', __doc__.split('\n')[0])
  parser.epilog = 'Other arguments (--config ...) go to every host.'
  parser.add_argument('--hosts', type=int, default=2, help='number of processes (fake hosts)')
  parser.add_argument('--devices_per_host', type=int, default=1, help='CPU devices per process')
  parser.add_argument('--workdir', required=True, help='run directory, shared by all hosts')
  args, passed = parser.parse_known_args(argv)
  if args.hosts < 1 or args.devices_per_host < 1:
    parser.error('--hosts and --devices_per_host must be at least 1')
  sys.exit(run(args.hosts, args.devices_per_host, args.workdir, passed))


if __name__ == '__main__':
  main()

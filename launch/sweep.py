"""A sweep: every point of an experiment's get_sweep(), locally or on Cloud TPU VMs.

    python -m launch.sweep --config experiments/X.py[:variant] --sweep_dir DIR \
        [--where local|tpu] [--parallel K] [--dry-run] [--delete] [TPU options]

Each point runs in DIR/<run name> (its overrides saved there as sweep_point.json). Locally,
K points run at a time, finished points (final.json present) are skipped, unfinished ones
resume from their checkpoints, and each running point shows one progress line. On TPU
(`--where tpu`, see launch/tpu.py) each point gets its own TPU VM or queued resource.
"""
import argparse
import importlib.util
import json
import subprocess
import sys
import time

import tqdm
from etils import epath

from launch import tpu
from lm import sweeps
from lm.config import ConfigError

WHERE = ('local', 'tpu')


def load_points(config_arg: str) -> tuple[str, list[dict]]:
  """(experiment file, validated sweep points) for a --config argument."""
  path, _, variant = config_arg.partition(':')
  if not epath.Path(path).exists():
    raise ConfigError(f'--config: file not found: {path}')
  spec = importlib.util.spec_from_file_location('experiment', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_sweep'):
    raise ConfigError(f'{path} has no get_sweep()')
  config = module.get_config(variant) if variant else module.get_config()
  points = module.get_sweep(variant) if variant else module.get_sweep()
  for point in points:
    sweeps.apply(config, point)          # unknown keys fail here, before anything runs
  names = [sweeps.run_name(p) for p in points]
  if len(set(names)) != len(names):
    raise ConfigError(f'{path}: get_sweep() repeats a point')
  return path, points


def main_command(config_arg: str, workdir: str, point: dict, extra: list[str],
                 python: str = sys.executable) -> list[str]:
  return [python, '-m', 'lm.main', f'--config={config_arg}', f'--workdir={workdir}',
          *sweeps.as_flags(point), *extra]


def _progress(workdir: epath.Path) -> int:
  path = workdir / 'metrics.jsonl'
  if not path.exists():
    return 0
  lines = path.read_text().strip().splitlines()
  return json.loads(lines[-1])['step'] if lines else 0


def run_local(config_arg: str, points: list[dict], sweep_dir: epath.Path, parallel: int,
              extra: list[str], dry_run: bool) -> int:
  """Runs the points, `parallel` at a time; returns the number that failed."""
  todo = []
  for point in points:
    workdir = sweep_dir / sweeps.run_name(point)
    if (workdir / 'final.json').exists():
      print(f'done already: {workdir.name}')
      continue
    todo.append((workdir, point))
  if dry_run:
    for workdir, point in todo:
      print(' '.join(main_command(config_arg, str(workdir), point, extra)))
    return 0
  running, failed = {}, []
  bars = {}
  while todo or running:
    while todo and len(running) < parallel:
      workdir, point = todo.pop(0)
      workdir.mkdir(parents=True, exist_ok=True)
      (workdir / 'sweep_point.json').write_text(json.dumps(point))
      log = (workdir / 'log.txt').open('a')
      running[workdir] = subprocess.Popen(main_command(config_arg, str(workdir), point, extra),
                                          stdout=log, stderr=subprocess.STDOUT)
      bars[workdir] = tqdm.tqdm(desc=workdir.name, position=len(bars), unit='step',
                                dynamic_ncols=True)
    time.sleep(0.5)
    for workdir, proc in list(running.items()):
      bar = bars[workdir]
      bar.update(_progress(workdir) - bar.n)
      if proc.poll() is not None:
        del running[workdir]
        status = 'done' if proc.returncode == 0 else f'failed ({workdir / "log.txt"})'
        bar.set_postfix_str(status)
        bar.close()
        if proc.returncode:
          failed.append(workdir.name)
  for name in failed:
    print(f'failed: {name}', file=sys.stderr)
  return len(failed)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog='python -m launch.sweep',
                                   description=__doc__.split('\n')[0])
  parser.add_argument('--config', required=True, help='experiments/X.py[:variant]')
  parser.add_argument('--sweep_dir', required=True, help='one directory for all points')
  parser.add_argument('--where', default='local', help=f'one of {WHERE}')
  parser.add_argument('--parallel', type=int, default=1, help='local points at a time')
  parser.add_argument('--dry-run', action='store_true', help='print the commands only')
  parser.add_argument('--delete', action='store_true', help='tpu: delete the sweep\'s VMs')
  tpu.add_arguments(parser)
  args, extra = parser.parse_known_args(argv)
  try:
    if args.where not in WHERE:
      raise ConfigError(f'--where={args.where!r} is not one of {list(WHERE)}')
    _, points = load_points(args.config)
    sweep_dir = epath.Path(args.sweep_dir)
    if args.where == 'local':
      sys.exit(1 if run_local(args.config, points, sweep_dir, max(args.parallel, 1), extra,
                              args.dry_run) else 0)
    plans = [tpu.Plan(f'{args.name}-{i}', str(sweep_dir / sweeps.run_name(p)),
                      main_command(args.config, str(sweep_dir / sweeps.run_name(p)), p, extra,
                                   python='python3'))
             for i, p in enumerate(points)]
    sys.exit(tpu.run(plans, args, delete=args.delete, dry_run=args.dry_run))
  except ValueError as e:   # ConfigError, and bad TPU arguments
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  main()

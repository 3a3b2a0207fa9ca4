"""A sweep: every point of an experiment's get_sweep(), through a queue that runners on local
processes, Cloud TPU slices or SkyPilot jobs work through.

    python -m launch.sweep --config experiments/X.py[:variant] --sweep_dir DIR \
        [--where local|tpu|skypilot] [--parallel K | --slices K] [--watch] [--dry-run]
    python -m launch.sweep --status --sweep_dir DIR
    python -m launch.sweep --delete --where tpu --sweep_dir gs://... [TPU options]

Each point runs in DIR/<run name> (its overrides in the queue, launch/queue.py; the code's
commit and diff in provenance.json / source.diff). Finished points (final.json) are skipped,
unfinished ones resume from their checkpoints. Locally K runners work through the queue and
this command watches them: a runner that dies is started again and its point resumes. On
TPU, K slices do (launch/tpu.py); `--watch` stays to recreate preempted slices and deletes
them all when the sweep is finished.
"""
import difflib
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

import fsspec
import tqdm
from etils import epath

from launch import provenance, skypilot, tpu
from launch import queue as queue_lib
from lm.config import ConfigError, arguments, sweeps

WHERE = ('local', 'tpu', 'skypilot')


def load_points(config_arg: str, passed: list[str] = (),
                options: tuple[str, ...] = ()) -> tuple[str, list[dict]]:
  """(experiment file, validated sweep points) for a --config argument; `passed`, the
  arguments every point's lm.main gets besides (checked by `check_passed` against this
  command's `options`)."""
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
  check_passed(passed, config, points, options)
  return path, points


# lm.main's flags that a sweep forwards to every point, beside --config.KEY=VALUE overrides
PASSED_FLAGS = ('--peer_timeout',)


def check_passed(passed: list[str], config, points: list[dict],
                 options: tuple[str, ...]) -> None:
  """Refuses, before any point starts, an argument that is not one of this command's flags
  nor one every lm.main takes (a --config.KEY=VALUE override of a key the sweep does not
  set, or one of PASSED_FLAGS): a typo would otherwise fail every point, and an override of
  a swept key would train every point alike under names that say otherwise."""
  keys = sweeps.flat_keys(config)
  swept = {key for point in points for key in point}
  for arg in passed:
    name, has_value, _ = arg.partition('=')
    if name in PASSED_FLAGS and has_value:
      continue
    key = name.removeprefix('--config.')
    if not name.startswith('--config.') or not has_value:
      close = difflib.get_close_matches(name, options + PASSED_FLAGS, n=1)
      raise ConfigError(f'unknown argument {arg!r}'
                        + (f" (did you mean '{close[0]}'?)" if close else '')
                        + '; besides this command\'s flags, only --config.KEY=VALUE overrides '
                        f'and {", ".join(f + "=..." for f in PASSED_FLAGS)} pass to every point')
    if key not in keys:
      close = difflib.get_close_matches(key, keys, n=1)
      raise ConfigError(f"{arg}: '{key}' is not a config key"
                        + (f"; did you mean '{close[0]}'?" if close else ''))
    if key in swept:
      raise ConfigError(f'{arg} overrides config.{key}, which the sweep sets per point: every '
                        'point would train alike under a name that says otherwise; change '
                        'get_sweep() instead')


def main_command(config_arg: str, workdir: str, point: dict, extra: list[str],
                 python: str = sys.executable) -> list[str]:
  return [python, '-m', 'lm.main', f'--config={config_arg}', f'--workdir={workdir}',
          *sweeps.as_flags(point), *extra]


def queue_points(config_arg: str, points: list[dict], sweep_dir: str, extra: list[str],
                 python: str) -> list[queue_lib.Point]:
  base = sweep_dir.rstrip('/')
  return [queue_lib.Point(name, f'{base}/{name}',
                          main_command(config_arg, f'{base}/{name}', p, extra, python), p)
          for name, p in ((sweeps.run_name(p), p) for p in points)]


def prepare(points: list[queue_lib.Point], snap: dict) -> None:
  """Each point's workdir: its overrides (sweep_point.json, read by lm.compare) and the code's
  provenance."""
  for point in points:
    provenance.record(point.workdir, snap)
    fs, root = fsspec.core.url_to_fs(point.workdir)
    fs.pipe_file(f'{root.rstrip("/")}/sweep_point.json', json.dumps(point.overrides).encode())


class LocalFleet:
  """Runner processes on this machine standing in for slices."""

  def __init__(self, sweep_dir: str, count: int, runner_flags: list[str]):
    self.sweep_dir, self.flags = sweep_dir, runner_flags
    self.names = [f'local-{i}' for i in range(count)]
    self.procs = {}

  def alive(self, name: str) -> bool:
    return name in self.procs and self.procs[name].poll() is None

  def start(self, name: str) -> None:
    logs = os.path.join(self.sweep_dir, 'runners')
    os.makedirs(logs, exist_ok=True)
    with open(os.path.join(logs, f'{name}.log'), 'ab') as log:
      self.procs[name] = subprocess.Popen(
          [sys.executable, '-m', 'launch.runner', f'--sweep_dir={self.sweep_dir}',
           f'--slice={name}', *self.flags], stdout=log, stderr=subprocess.STDOUT)

  def stop(self) -> None:
    """Lets each runner record its last point's end and find the queue empty."""
    for proc in self.procs.values():
      try:
        proc.wait(timeout=60)
      except subprocess.TimeoutExpired:
        proc.terminate()
        proc.wait()


def watch(queue: queue_lib.Queue, fleet, poll_s: float) -> list[queue_lib.PointState]:
  """Keeps a runner on every slice of the fleet while points are left to take or the slice
  held one (a dead or preempted one is started again), reports each point's changes, and
  stops the fleet once every point is done or failed."""
  seen = {}
  states = queue.states()
  bar = tqdm.tqdm(total=len(states), desc='points done', unit='point', dynamic_ncols=True)
  while True:
    bar.update(sum(s.state in ('done', 'failed') for s in states) - bar.n)
    for s in states:
      if seen.get(s.point.name) != (s.state, s.runner):
        seen[s.point.name] = (s.state, s.runner)
        bar.write(f'{s.point.name}: {s.state}' + (f' ({s.runner})' if s.runner else ''))
    if not queue.unfinished(states):
      break
    held = {s.runner for s in states if s.state in ('running', 'preempted')}
    for name in fleet.names:   # a runner that died holding a point takes it back at once
      if (queue.claimable(states) or name in held) and not fleet.alive(name):
        fleet.start(name)
    time.sleep(poll_s)
    states = queue.states()
  bar.close()
  fleet.stop()
  return states


def _age(seconds: float | None) -> str:
  if seconds is None:
    return '-'
  return f'{seconds:.0f}s' if seconds < 120 else f'{seconds / 60:.0f}m' if seconds < 7200 \
      else f'{seconds / 3600:.1f}h'


def status_rows(queue: queue_lib.Queue, now: float | None = None) -> list[dict]:
  """One row per point, read from the sweep directory alone: state, step of total, last
  validation loss (the run's heartbeat.json), slice, heartbeat age."""
  now = time.time() if now is None else now
  rows = []
  for s in (queue.state(p, now) for p in queue.points()):
    fs, root = fsspec.core.url_to_fs(s.point.workdir)
    try:   # written by lm.training.loop, which may be halfway through rewriting it
      beat = queue_lib.read_json(fs, f'{root.rstrip("/")}/heartbeat.json') or {}
    except json.JSONDecodeError:
      beat = {}
    ages = [a for a in (s.beat_age_s, now - beat['time'] if beat else None) if a is not None]
    rows.append({'point': s.point.name, 'state': s.state,
                 'step': f'{beat.get("step", 0)}/{beat.get("steps") or "?"}',
                 'val_loss': '-' if beat.get('val_loss') is None else f'{beat["val_loss"]:.4f}',
                 'slice': s.runner or '-', 'heartbeat': _age(min(ages) if ages else None),
                 'failures': s.failures})
  return rows


def status_table(rows: list[dict]) -> str:
  if not rows:
    return 'no points queued'
  keys = list(rows[0])
  widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in keys}
  lines = ['  '.join(k.ljust(widths[k]) for k in keys)]
  lines += ['  '.join(str(r[k]).ljust(widths[k]) for k in keys) for r in rows]
  counts = {state: sum(r['state'] == state for r in rows) for state in queue_lib.STATES}
  return '\n'.join(lines + [', '.join(f'{n} {state}' for state, n in counts.items() if n)])


def _runner_flags(args) -> list[str]:
  return [f'--max_failures={args.max_failures}', f'--heartbeat_s={args.heartbeat_s}',
          f'--heartbeat_timeout_s={args.heartbeat_timeout_s}']


def run_local(args, points: list[queue_lib.Point], queue: queue_lib.Queue) -> int:
  todo = [p for p in points if not queue.done(p)]
  for point in points:
    if point not in todo:
      print(f'done already: {point.name}')
  if args.dry_run:
    for point in todo:
      print(' '.join(point.command))
    return 0
  prepare(todo, provenance.snapshot(provenance.repo_root()))
  queue.add(points)
  fleet = LocalFleet(args.sweep_dir, max(args.parallel, 1), _runner_flags(args))
  states = watch(queue, fleet, args.poll_s)
  print(status_table(status_rows(queue)))
  return sum(s.state == 'failed' for s in states)


def _stage(args, points, queue, slices: tpu.Slices, dry_run: bool) -> None:
  """The working tree packed and uploaded, each point's provenance, the queue."""
  repo = provenance.repo_root()
  snap = provenance.snapshot(repo)
  tree = f'commit {snap["commit"]}' + (f' + {len(snap["changed"])} changed files'
                                       if snap['dirty'] else '')
  if dry_run:
    print(f'# code: the working tree ({tree}) packed and copied to '
          f'{args.sweep_dir.rstrip("/")}/{tpu.CODE}')
    print(f'# queue: {len(points)} points in {args.sweep_dir.rstrip("/")}/{queue_lib.QUEUE}/')
    return
  with tempfile.TemporaryDirectory() as tmp:
    archive = os.path.join(tmp, tpu.CODE)
    count = provenance.pack(repo, archive)
    subprocess.run(slices.upload(archive), check=True)
  print(f'code: {count} files of the working tree ({tree})')
  prepare([p for p in points if not queue.done(p)], snap)   # a finished run keeps its record
  queue.add(points)


def run_cloud(args, points: list[queue_lib.Point], queue: queue_lib.Queue) -> int:
  slices = tpu.Slices(args, args.sweep_dir, _runner_flags(args))
  tool = 'sky' if args.where == 'skypilot' else 'gcloud'
  if not args.dry_run and shutil.which(tool) is None:
    install = ('pip install skypilot[gcp]' if tool == 'sky' else
               'install the Google Cloud SDK and run `gcloud auth login`')
    raise ConfigError(f'{tool} not found: {install} (--dry-run prints the commands without it)')
  if args.delete:
    for name in slices.names:
      _do(slices.delete(name), args.dry_run)
    return 0
  _stage(args, points, queue, slices, args.dry_run)
  staging = tempfile.mkdtemp(prefix=f'{args.name}-')
  if args.where == 'skypilot':
    repo = provenance.repo_root() or os.getcwd()
    for name in slices.names:
      path = os.path.join(staging, f'{name}.yaml')
      text = skypilot.dump(skypilot.task(slices, name, repo))
      with open(path, 'w') as f:
        f.write(text)
      if args.dry_run and name == slices.names[0]:
        print(f'# {path}\n{text}', end='')
      _do(skypilot.launch_command(path, name), args.dry_run)
    return 0
  scripts = {}
  for name in slices.names:
    scripts[name] = os.path.join(staging, f'{name}-startup.sh')
    with open(scripts[name], 'w') as f:
      f.write(slices.startup_script(name))
  if args.dry_run:
    print(f'# {scripts[slices.names[0]]}\n{slices.startup_script(slices.names[0])}', end='')
    for name in slices.names:
      _do(slices.create(name, scripts[name]), True)
    return 0
  fleet = tpu.TpuFleet(slices, scripts)
  if not args.watch:
    for name in slices.names:
      if not fleet.alive(name):
        fleet.start(name)
    print(f'started; see: python -m launch.sweep --status --sweep_dir {args.sweep_dir}')
    return 0
  states = watch(queue, fleet, args.poll_s)
  print(status_table(status_rows(queue)))
  return sum(s.state == 'failed' for s in states)


def _do(command: list[str], dry_run: bool) -> None:
  if dry_run:
    print(shlex.join(command))
  else:
    subprocess.run(command, check=True)


def main(argv=None) -> None:
  parser = arguments.parser('python -m launch.sweep', __doc__.split('\n')[0])
  parser.add_argument('--config', help='experiments/X.py[:variant]')
  parser.add_argument('--sweep_dir', required=True, help='one directory for all points')
  parser.add_argument('--where', default='local', help=f'one of {WHERE}')
  parser.add_argument('--parallel', type=int, default=1, help='local runners (points at a time)')
  parser.add_argument('--watch', action='store_true',
                      help='tpu: stay, recreate preempted slices, delete them at the end')
  parser.add_argument('--status', action='store_true', help='print the sweep\'s table and exit')
  parser.add_argument('--dry_run', '--dry-run', action='store_true',
                      help='print the commands only')
  parser.add_argument('--delete', action='store_true', help='tpu: delete the sweep\'s slices')
  parser.add_argument('--max_failures', type=int, default=3,
                      help='failed attempts before a point is marked failed')
  parser.add_argument('--heartbeat_s', type=float, default=30.0, help='runner heartbeat period')
  parser.add_argument('--heartbeat_timeout_s', type=float, default=600.0,
                      help='a point whose runner is silent this long is taken by another')
  parser.add_argument('--poll_s', type=float, default=None,
                      help='watcher period (default 2 s locally, 60 s for slices)')
  tpu.add_arguments(parser)
  args, extra = parser.parse_known_args(argv)
  try:
    if args.where not in WHERE:
      raise ConfigError(f'--where={args.where!r} is not one of {list(WHERE)}')
    queue = queue_lib.Queue(args.sweep_dir, args.heartbeat_timeout_s, args.max_failures)
    if args.poll_s is None:
      args.poll_s = 2.0 if args.where == 'local' else 60.0
    if args.status:
      rows = status_rows(queue)
      if not rows:
        raise ConfigError(f'--sweep_dir={args.sweep_dir} holds no sweep (no queued points)')
      print(status_table(rows))
      return
    if args.delete:
      sys.exit(run_cloud(args, [], queue))
    if not args.config:
      raise ConfigError('--config is required (but for --status)')
    options = tuple(o for action in parser._actions for o in action.option_strings)
    _, points = load_points(args.config, extra, options)
    python = sys.executable if args.where == 'local' else 'python3'
    points = queue_points(args.config, points, args.sweep_dir, extra, python)
    run = run_local if args.where == 'local' else run_cloud
    sys.exit(1 if run(args, points, queue) else 0)
  except ValueError as e:   # ConfigError, and bad TPU arguments
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  main()

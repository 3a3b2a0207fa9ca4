"""lm against the PyTorch reference on nanoGPT's CPU recipe, side by side: prints one JSON
line per pair of runs and a last one with the medians.

    python benchmarks/vs_torch.py [--pairs 3] [--steps N] [--whole [--warm_cache]]
        [--reference benchmarks/torch_reference.py] [--config experiments/X.py]
        [--lm_flag=--config.a.b=v ...]

The two run in turn (lm, reference, lm, reference, ...) so that each pair sees the same
window of a noisy machine; only pairs compare. Both train on the corpus shipped in the
package. Steady step (the default, N = 300): `benchmarks/throughput.py --steps N` against
the reference's `--iters 2N` (its median skips the first tenth). `--whole` (N = 2000, the
recipe): the main command against the reference's whole script, each a fresh process timed
from start to exit, lm's steps from metrics.jsonl. lm starts each run with a new, empty
compilation cache, as a first run does; with `--warm_cache`, from one that an untimed run of
the same command filled first with every program it compiles, as a rerun finds it. Needs
torch (the `test` extra).

Keys per pair: lm_ms, torch_ms and step_ratio (lm / torch); with --whole also lm_s, torch_s,
wall_ratio, each side's val_loss, and lm_fixed_s / torch_fixed_s: the wall-clock beyond N
steps at the median step (lm: imports, compiles, evaluations, checkpoints, the sample), and
lm_eval_s, the part of it lm spent evaluating (metrics.jsonl's val_wall_s and test_wall_s); with
--warm_cache lm_programs_compiled, the programs the timed run compiled instead of loading
(0 when the cache held them all).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from etils import epath

from lm import cli
from lm.analysis import compare
from lm.config import arguments
from lm.data import sources

ROOT = epath.Path(__file__).parent.parent


def _parser() -> argparse.ArgumentParser:
  parser = arguments.parser('python benchmarks/vs_torch.py', __doc__)
  parser.add_argument('--pairs', type=int, default=3,
                      help='pairs of runs, lm then the reference in each')
  parser.add_argument('--steps', type=int, help='steps of each run (default: 300; --whole 2000)')
  parser.add_argument('--whole', action='store_true',
                      help='time the whole commands, not the steady step')
  parser.add_argument('--warm_cache', action='store_true', help="with --whole: lm's programs "
                      'come from a compilation cache filled by an untimed first run (a rerun)')
  parser.add_argument('--reference', default=str(ROOT / 'benchmarks' / 'torch_reference.py'),
                      help='the PyTorch reference script')
  parser.add_argument('--config', default='experiments/shakespeare_char.py',
                      help="lm's experiment (the recipe the reference trains)")
  parser.add_argument('--lm_flag', action='append', default=[], help="a flag of lm's commands "
                      '(repeatable), e.g. --lm_flag=--config.mesh.cpu_devices=1')
  return parser


def _last_json(stdout: str, what: str) -> dict:
  lines = [line for line in stdout.splitlines() if line.startswith('{')]
  if not lines:
    raise RuntimeError(f'{what} printed no JSON line:\n{stdout[-2000:]}')
  return json.loads(lines[-1])


def _run(command: list[str], what: str, env=None) -> tuple[str, float]:
  """(stdout, wall seconds) of a command, run where this one runs (paths in flags hold)."""
  start = time.perf_counter()
  result = subprocess.run(command, capture_output=True, text=True, env=env)
  wall = time.perf_counter() - start
  if result.returncode:
    raise RuntimeError(f'{what} failed (exit {result.returncode}):\n{result.stderr[-3000:]}')
  return result.stdout, wall


def _reference(args: argparse.Namespace, steps: int) -> tuple[dict, float]:
  stdout, wall = _run([sys.executable, args.reference, '--data', str(sources.SHAKESPEARE),
                       '--iters', str(steps)], 'the reference')
  return _last_json(stdout, 'the reference'), wall


def _programs(cache: str) -> int:
  """Compiled programs in a JAX compilation cache directory."""
  return sum(name.endswith('-cache') for name in os.listdir(cache))


def _main(args: argparse.Namespace, steps: int, workdir: str,
          cache: str) -> tuple[float, dict, int]:
  """(wall seconds, run, programs it added to the cache) of the main command with `cache` as
  its compilation cache; with --warm_cache every program is stored, whatever its compile
  time."""
  env = {**os.environ, 'JAX_COMPILATION_CACHE_DIR': cache}
  if args.warm_cache:
    env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  before = _programs(cache)
  _, wall = _run([sys.executable, '-m', 'lm.main', '--config', args.config, '--workdir',
                  workdir, f'--config.train.steps={steps}', *args.lm_flag],
                 'python -m lm.main', env=env)
  return wall, compare.load_run(epath.Path(workdir)), _programs(cache) - before


def _pair(args: argparse.Namespace, steps: int, cache: str | None) -> dict:
  if not args.whole:
    lm = _last_json(_run([sys.executable, str(ROOT / 'benchmarks' / 'throughput.py'), '--config',
                          args.config, '--steps', str(steps), *args.lm_flag],
                         'benchmarks/throughput.py')[0], 'benchmarks/throughput.py')
    torch = _reference(args, 2 * steps)[0]
    return {'lm_ms': lm['step_ms'], 'torch_ms': torch['ms_per_iter'],
            'step_ratio': round(lm['step_ms'] / torch['ms_per_iter'], 3)}
  with tempfile.TemporaryDirectory() as workdir, tempfile.TemporaryDirectory() as empty:
    lm_s, run, compiled = _main(args, steps, workdir, cache or empty)
    compiled = {'lm_programs_compiled': compiled} if cache else {}
  lm_ms = round(1e3 * run['tokens_per_step'] / run['tokens_per_s'], 2)   # at the median step
  torch, torch_s = _reference(args, steps)
  return {**compiled, 'lm_ms': lm_ms, 'torch_ms': torch['ms_per_iter'],
          'step_ratio': round(lm_ms / torch['ms_per_iter'], 3),
          'lm_s': round(lm_s, 2), 'torch_s': round(torch_s, 2),
          'wall_ratio': round(lm_s / torch_s, 3),
          'lm_fixed_s': round(lm_s - steps * lm_ms / 1e3, 2),
          'torch_fixed_s': round(torch_s - steps * torch['ms_per_iter'] / 1e3, 2),
          'lm_eval_s': run['eval_s'] and round(run['eval_s'], 2),
          'lm_val_loss': round(run['final_val_loss'], 4), 'torch_val_loss': torch['val_loss']}


def main(argv: list[str]) -> None:
  args = _parser().parse_args(argv)
  if not os.path.exists(args.reference):
    arguments.fail(f'--reference: no such file: {args.reference}')
  if args.warm_cache and not args.whole:
    arguments.fail('--warm_cache times the whole commands: add --whole')
  steps = args.steps or (2000 if args.whole else 300)
  cache = tempfile.mkdtemp(prefix='vs_torch_cache_') if args.whole and args.warm_cache else None
  if cache:   # the untimed first run, which fills the cache
    with tempfile.TemporaryDirectory() as workdir:
      _main(args, steps, workdir, cache)
  pairs = []
  for i in range(args.pairs):
    pairs.append(_pair(args, steps, cache))
    print(json.dumps({'pair': i + 1, 'steps': steps, **pairs[-1]}), flush=True)
  if cache:
    shutil.rmtree(cache)
  print(json.dumps({'median': True, 'pairs': len(pairs), 'steps': steps,
                    **{k: round(float(np.median([p[k] for p in pairs])), 3)
                       for k in pairs[0] if not k.endswith('val_loss')}}))


if __name__ == '__main__':
  cli.run(main)

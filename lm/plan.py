"""Plan a run for a Cloud TPU slice without one (`lm.planning.plan` says how):

    python -m lm.plan --config experiments/X.py --topology v5p-64 [--config.a.b=v ...]
        [--sweep model.remat=none,full ...] [--no_unroll] [--breakdown 20]

Prints one JSON line per planned config, then a table."""
import argparse
import json
import sys

import jax

from lm import cli
from lm.config import arguments, sweeps
from lm.parallel import tpus
from lm.planning import plan


def command_line(prog: str = 'python -m lm.plan') -> argparse.ArgumentParser:
  """lm.plan's flags (benchmarks/state_layouts.py takes them too)."""
  parser = arguments.parser(prog, __doc__)
  arguments.add_config(parser, lock=False)
  parser.add_argument('--topology', required=True,
                      help='Cloud TPU slice: v4-32, v5e-16, v5p-64, ... or GENERATION:AxBxC')
  parser.add_argument('--sweep', action='append', default=[], metavar='KEY=V1,V2,...',
                      help='plan each value (several flags: every combination)')
  parser.add_argument('--no_unroll', '--nounroll', dest='unroll', action='store_false',
                      help='FLOPs and step time from the program as compiled, not from its '
                      'loop-free twins (XLA counts a loop body once)')
  parser.add_argument('--breakdown', type=int, default=0, metavar='N',
                      help='N > 0: also where the estimated step goes, the N largest '
                      'operations per layer and of the rest')
  return parser


def main(argv: list[str]) -> None:
  args = arguments.parse(command_line(), argv)
  jax.config.update('jax_platforms', 'cpu')   # compiles for TPU, runs nothing: never take one
  # a ConfigError (a bad topology, sweep or config) is one line: cli.run
  topology = tpus.parse(args.topology)
  points = sweeps.sweep_points(args.sweep)
  rows = []
  for i, point in enumerate(points):
    print(f'planning {i + 1}/{len(points)} {sweeps.run_name(point)} on {topology.name} '
          f'({topology.chips} chips): compiling (minutes for billions of parameters)',
          file=sys.stderr, flush=True)
    config = sweeps.apply(args.config, point)
    row = {**point, **plan.plan(config, topology, args.unroll, args.breakdown)}
    print(json.dumps(row), flush=True)
    rows.append(row)
  print(plan.table(rows, list(points[0])))


if __name__ == '__main__':
  cli.run(main)

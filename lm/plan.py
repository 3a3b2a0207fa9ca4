"""Plan a run for a Cloud TPU slice without one (`lm.planning.plan` says how):

    python -m lm.plan --config experiments/X.py --topology v5p-64 [--config.a.b=v ...]
        [--sweep model.remat=none,full ...] [--nounroll] [--breakdown 20]

Prints one JSON line per planned config, then a table."""
import json
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from lm import cli
from lm.config import ConfigError, sweeps
from lm.parallel import tpus
from lm.planning import plan

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment file with get_config().',
                                          lock_config=False)
_TOPOLOGY = flags.DEFINE_string('topology', None, 'Cloud TPU slice: v4-32, v5e-16, v5p-64, ...')
_SWEEP = flags.DEFINE_multi_string('sweep', [], 'KEY=V1,V2,...: plan each value (several '
                                   'flags: every combination).')
_UNROLL = flags.DEFINE_bool('unroll', True, 'FLOPs and step time from loop-free twins of the '
                            'program (XLA counts a loop body once).')
_BREAKDOWN = flags.DEFINE_integer('breakdown', 0, 'N > 0: also where the estimated step goes, '
                                  'the N largest operations per layer and of the rest.')
flags.mark_flags_as_required(['config', 'topology'])


def main(argv) -> None:
  del argv
  jax.config.update('jax_platforms', 'cpu')   # compiles for TPU, runs nothing: never take one
  try:
    topology = tpus.parse(_TOPOLOGY.value)
    points = sweeps.sweep_points(_SWEEP.value)
    rows = []
    for i, point in enumerate(points):
      print(f'planning {i + 1}/{len(points)} {sweeps.run_name(point)} on {topology.name} '
            f'({topology.chips} chips): compiling (minutes for billions of parameters)',
            file=sys.stderr, flush=True)
      config = sweeps.apply(cli.load_config(_CONFIG), point)
      row = {**point, **plan.plan(config, topology, _UNROLL.value, _BREAKDOWN.value)}
      print(json.dumps(row), flush=True)
      rows.append(row)
  except ConfigError as e:
    cli.fail(str(e))
  print(plan.table(rows, list(points[0])))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)

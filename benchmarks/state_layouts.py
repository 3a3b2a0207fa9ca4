"""What layouts of the train state chosen by the compiler would save on a TPU slice: the one-
and two-layer twins that `lm.plan` extrapolates from, compiled by libtpu with the state in
the default layouts and in `Layout.AUTO` (runs keep the default ones). Prints one JSON line:
XLA's estimate of each twin, per layer, the step as `lm.plan` extrapolates it, the cycles
libtpu spends on copies, and the state's layouts that differ from the default. Needs the `tpu`
extra; no TPU.

    python benchmarks/state_layouts.py --config experiments/llama3_8b_lm1b.py \
        --topology v5p-8 --config.train.batch_size=8 --config.model.remat=full
"""
import json
import sys

import jax
from jax.experimental.layout import Layout

from lm import cli
from lm import plan as plan_command
from lm.config import arguments
from lm.config.checks import ConfigError
from lm.parallel import tpus
from lm.planning import plan


def main(argv: list[str]) -> None:
  # lm.plan's flags (--sweep unused)
  args = arguments.parse(plan_command.command_line('python benchmarks/state_layouts.py'), argv)
  jax.config.update('jax_platforms', 'cpu')   # compiles for TPU, runs nothing
  try:   # bad input is one line, as lm.plan's
    devices = tpus.parse(args.topology).devices()
    config = plan.resolved(args.config, len(devices))
  except ConfigError as e:
    arguments.fail(str(e))
  row = {}
  for name, layout in (('default', None), ('auto', Layout.AUTO)):
    print(f'compiling the twins, {name} layouts', file=sys.stderr, flush=True)
    cost, twins = plan.extrapolated(config, devices, layout)   # as lm.plan estimates the step
    seconds = {n: t.cost_analysis()['optimal_seconds'] for n, t in twins.items()}
    row.update({f'{name}_twins_s': list(seconds.values()),
                f'{name}_est_step_s': cost['optimal_seconds']})
    if len(twins) == 2:   # one and two layers (periods of attention_global_every)
      (n, one), (_, two) = seconds.items()
      row[f'{name}_per_layer_ms'] = 1e3 * (two - one) / n
    for n, compiled in twins.items():
      row[f'{name}_copy_cycles_{n}_layers'] = (plan.operation_cycles(compiled) or {}).get(
          'copy', 0)
    if layout is not None:   # the largest twin's choices, where they are not the default
      largest = twins[max(twins)]
      state = jax.tree_util.tree_flatten_with_path(largest.input_formats[0][0])[0]
      row['auto_layouts'] = {jax.tree_util.keystr(path): str(f.layout.major_to_minor)
                             for path, f in state
                             if f.layout is not None and list(f.layout.major_to_minor)
                             != sorted(f.layout.major_to_minor)}
  row['saved'] = 1 - row['auto_est_step_s'] / row['default_est_step_s']
  print(json.dumps(row))


if __name__ == '__main__':
  cli.run(main)

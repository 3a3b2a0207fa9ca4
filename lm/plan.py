"""Plan a run for a Cloud TPU slice without one: the real train step (the `lm.steps` program a
run compiles, on the config's mesh over the slice's chips) lowered with abstract state and
batch and compiled by libtpu on this machine, then read back: memory per chip, FLOPs, the
compiler's own estimate of the step time, and the collectives.

    python -m lm.plan --config experiments/X.py --topology v5p-64 [--config.a.b=v ...]
        [--sweep model.remat=none,full ...] [--nounroll]

Prints a table and one JSON line per planned config. XLA's cost analysis counts the body of a
scanned loop once, so with scan_layers=True the FLOPs and the step estimate come from a twin
of the program with the layers unrolled (`cost_from`: 'unrolled'); memory and collectives
always come from the real program. Pipelined configs keep their scan (`cost_from`: 'scanned',
an underestimate).
"""
import ast
import json
import math
import re
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from lm import cli, config_post, sharding, steps, sweeps, tpus
from lm import config as config_lib
from lm.checks import ConfigError
from lm.data import sources, tokenizers

COLLECTIVES = ('all-gather', 'all-reduce', 'reduce-scatter', 'all-to-all', 'collective-permute')
GB = 1e9


def _vocab_size(config: ml_collections.ConfigDict) -> int | None:
  """The tokenizer's vocabulary size without building it from a large corpus: spm_* from
  config.data.spm_vocab_size, char from the shipped Shakespeare; None where the config fixes
  model.vocab_size itself."""
  d = config.data
  if config.model.vocab_size > 0:
    return None
  if d.tokenizer.startswith('spm_'):
    return d.spm_vocab_size
  if d.tokenizer == 'byte':
    return tokenizers.ByteTokenizer.vocab_size
  if d.tokenizer == 'char' and d.source == 'shakespeare':
    return tokenizers.CharTokenizer.build([sources.SHAKESPEARE.read_text()]).vocab_size
  raise ConfigError(f'config.data.tokenizer={d.tokenizer!r} on {d.source!r}: the vocabulary '
                    'is built from the corpus; set config.model.vocab_size to plan')


def _bytes_per_chip(tree) -> int:
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


def collectives(hlo: str) -> dict[str, int]:
  """Collective instructions of a compiled HLO module by kind (async pairs counted once; a
  loop body's once)."""
  counts = {kind: len(re.findall(rf'\s{kind}(?:-start)?\(', hlo)) for kind in COLLECTIVES}
  return {k: v for k, v in counts.items() if v}


def compile_train_step(config: ml_collections.ConfigDict, devices: list):
  """(compiled train step, its program, seconds to lower and compile) of a resolved config on
  a mesh over `devices`."""
  if config_post.OBJECTIVE_FORMATS[config.train.objective] != 'text':
    raise ConfigError(f'config.train.objective={config.train.objective!r}: lm.plan plans '
                      'objectives that read text (lm, mlm)')
  mesh = sharding.make_mesh(config_lib.mesh_shape(config, len(devices)), devices)
  program = steps.build(config, mesh)
  batch = {k: jax.ShapeDtypeStruct((config.train.batch_size, config.data.seq_len), jnp.int32,
                                   sharding=program.batch_sharding)
           for k in ('inputs', 'targets')}
  start = time.perf_counter()
  with jax.set_mesh(mesh), nn.logical_axis_rules(program.rules):
    compiled = program.jitted_train_step.__wrapped__.lower(
        program.abstract_state, batch, program.abstract_frozen).compile()
  return compiled, program, time.perf_counter() - start


def plan(config: ml_collections.ConfigDict, topology: tpus.Topology, unroll: bool = True) -> dict:
  """The plan of one config on one slice (the keys of the command's JSON line)."""
  devices = topology.devices()
  config_lib.validate(config_lib.resolve(config, None), len(devices))
  config = config_lib.resolve(config, _vocab_size(config))
  config_lib.validate(config, len(devices))
  compiled, program, compile_s = compile_train_step(config, devices)
  memory = compiled.memory_analysis()
  cost, cost_from = compiled.cost_analysis(), 'unrolled'
  if config.model.scan_layers and program.mesh.shape['stage'] > 1:
    cost_from = 'scanned'
  elif config.model.scan_layers and unroll:
    twin = config.unlock().copy_and_resolve_references()
    twin.model.scan_layers = False
    cost = compile_train_step(twin, devices)[0].cost_analysis()
  elif config.model.scan_layers:
    cost_from = 'scanned'
  chips, spec = topology.chips, topology.spec
  tokens = config.train.batch_size * config.data.seq_len
  model_flops = program.model_config.flops_per_token(config.data.seq_len) * tokens
  state = program.abstract_state
  state_gb = _bytes_per_chip((state.params, state.opt_state)) / GB
  live = (memory.argument_size_in_bytes + memory.output_size_in_bytes
          - memory.alias_size_in_bytes)   # the donated state's outputs reuse its buffers
  # the larger of XLA's temporary allocation and its peak heap less the arguments: libtpu
  # 0.0.42 reports a temp_size of 0, or less than the peak, for some programs
  temp = max(memory.temp_size_in_bytes, memory.peak_memory_in_bytes - live)
  step_s = cost['optimal_seconds']
  return {
      'topology': topology.name, 'chips': chips, 'hbm_gb': spec.hbm_gb,
      'mesh': dict(program.mesh.shape),
      'params': program.model_config.param_counts()['total'], 'state_gb': state_gb,
      'frozen_gb': _bytes_per_chip(program.abstract_frozen) / GB,
      'temp_gb': temp / GB, 'total_gb': (live + temp) / GB,
      'fits': (live + temp) / GB <= spec.hbm_gb, 'step_flops': cost['flops'],
      'model_flops_per_chip': model_flops / chips, 'est_step_s': step_s,
      'est_mfu': model_flops / (step_s * chips * spec.peak_flops),
      'tokens_per_s_per_chip': tokens / step_s / chips, 'cost_from': cost_from,
      'collectives': collectives(compiled.as_text()), 'compile_s': compile_s,
  }


def table(rows: list[dict], swept: list[str]) -> str:
  """The plans as a Markdown table, one row each (the swept keys first)."""
  head = [k.split('.')[-1] for k in swept] + [
      'mesh', 'state GB', 'temp GB', 'total / HBM GB', 'fits', 'est step s', 'est MFU',
      'tok/s/chip', 'compile s']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + ' --- |' * len(head)]
  for r in rows:
    mesh = 'x'.join(str(v) for v in r['mesh'].values())
    fits = 'yes' if r['fits'] else f'no (+{r["total_gb"] - r["hbm_gb"]:.1f} GB)'
    cells = [str(r[k]) for k in swept] + [
        mesh, f'{r["state_gb"]:.2f}', f'{r["temp_gb"]:.2f}',
        f'{r["total_gb"]:.1f} / {r["hbm_gb"]:.0f}', fits, f'{r["est_step_s"]:.4g}',
        f'{r["est_mfu"]:.1%}', f'{r["tokens_per_s_per_chip"]:,.0f}', f'{r["compile_s"]:.1f}']
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def sweep_points(specs: list[str]) -> list[dict]:
  """`--sweep KEY=V1,V2,...` flags as points (their product): values as Python literals
  where they parse ((1,4,1,1),(4,1,1,1); 8,16), else strings (none,full)."""
  axes = []
  for spec in specs:
    key, sep, values = spec.partition('=')
    if not sep or not values:
      raise ConfigError(f'--sweep={spec!r} must be KEY=V1,V2,...')
    try:
      parsed = list(ast.literal_eval(f'[{values}]'))
    except (ValueError, SyntaxError):
      parsed = [v.strip() for v in values.split(',')]
    axes.append([{key: v} for v in parsed])
  return sweeps.product(*axes) if axes else [{}]


_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment file with get_config().',
                                          lock_config=False)
_TOPOLOGY = flags.DEFINE_string('topology', None, 'Cloud TPU slice: v4-32, v5e-16, v5p-64, ...')
_SWEEP = flags.DEFINE_multi_string('sweep', [], 'KEY=V1,V2,...: plan each value (several '
                                   'flags: every combination).')
_UNROLL = flags.DEFINE_bool('unroll', True, 'FLOPs and step time from an unrolled twin of a '
                            'scanned program (XLA counts a loop body once).')
flags.mark_flags_as_required(['config', 'topology'])


def main(argv) -> None:
  del argv
  jax.config.update('jax_platforms', 'cpu')   # compiles for TPU, runs nothing: never take one
  try:
    topology = tpus.parse(_TOPOLOGY.value)
    points = sweep_points(_SWEEP.value)
    rows = []
    for point in points:
      config = sweeps.apply(cli.load_config(_CONFIG), point)
      row = {**point, **plan(config, topology, _UNROLL.value)}
      print(json.dumps(row), flush=True)
      rows.append(row)
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(table(rows, list(points[0])))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)

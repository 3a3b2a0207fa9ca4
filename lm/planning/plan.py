"""Plan a run for a Cloud TPU slice without one: the real train step (the `lm.training.steps`
program a run compiles, on the config's mesh over the slice's chips) lowered with abstract
state and batch and compiled by libtpu on this machine, then read back: memory per chip,
FLOPs, the compiler's own estimate of the step time, and the collectives.

    python -m lm.plan --config experiments/X.py --topology v5p-64 [--config.a.b=v ...]
        [--sweep model.remat=none,full ...] [--no_unroll] [--breakdown 20]

Prints a table and one JSON line per planned config. XLA's cost analysis counts the body of a
loop once (scanned layers, gradient accumulation, the compiler's windowed einsums), so the
FLOPs and the step estimate come from twins of the program without loops, of one and two
layers, extrapolated to all (`cost_from`: 'unrolled'; see `_cost`); memory and collectives
always come from the real program. Pipelined configs keep their loops (`cost_from`:
'scanned', an underestimate). Pallas kernels (splash attention) are custom calls that XLA
costs only by the estimate they carry (tokamax's do: `lm.model.attention`); `pallas_kernels` says
how many the program has. `--breakdown N` adds where the estimate goes (`breakdown`): the N
largest JAX operations per layer and of the rest of the step.
"""
import collections
import math
import re
import time

import jax
import jax.numpy as jnp
import ml_collections

from lm import config as config_lib
from lm.config import objective_traits
from lm.config.checks import ConfigError
from lm.data import sources, tokenizers
from lm.parallel import sharding, tpus
from lm.planning import hlo
from lm.training import steps

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
  loop body's once). libtpu writes a reduce-scatter as an all-reduce inside a fusion whose
  computation is named all-reduce-scatter* (its output the chip's shard): counted as one."""
  counts = dict.fromkeys(COLLECTIVES, 0)
  computation = ''
  for line in hlo.splitlines():
    if line[:1] not in ('', ' ', '}'):   # a computation's header: '%name (params) -> ... {'
      computation = line.split(' ', 1)[0]
    for kind in COLLECTIVES:
      if re.search(rf'\s{kind}(?:-start)?\(', line):
        scatter = kind == 'all-reduce' and computation.startswith('%all-reduce-scatter')
        counts['reduce-scatter' if scatter else kind] += 1
  return {k: v for k, v in counts.items() if v}


def program_on(config: ml_collections.ConfigDict, devices: list,
               state_layout=None) -> steps.Program:
  """The program a run of a resolved config builds, on a mesh over `devices` (`state_layout`:
  see `steps.build`)."""
  if objective_traits.of(config).data_format != 'text':
    raise ConfigError(f'config.train.objective={config.train.objective!r}: lm.plan plans '
                      'objectives that read text (lm, mlm)')
  return steps.build(config, sharding.make_mesh(config_lib.mesh_shape(config, len(devices)),
                                                devices), state_layout)


def lower_train_step(program: steps.Program, config: ml_collections.ConfigDict):
  """The program's train step lowered for its mesh's devices, from abstract state and batch."""
  batch = {k: jax.ShapeDtypeStruct((config.train.batch_size, config.data.seq_len), jnp.int32,
                                   sharding=program.batch_sharding)
           for k in ('inputs', 'targets')}
  return program.lower_train_step(program.abstract_state, batch, program.abstract_frozen)


def compile_train_step(program: steps.Program, config: ml_collections.ConfigDict,
                       compiler_options: dict | None = None):
  """The program's train step compiled for its mesh's devices, from abstract state and batch."""
  return lower_train_step(program, config).compile(compiler_options)


def _out_of_memory(error: Exception) -> dict:
  """The plan's memory fields from XLA's refusal of a program larger than HBM ('Ran out of
  memory on HBM, the total memory required for HLO temporaries (172.77G) exceeds available
  HBM (95.74G)'; G: 2^30 bytes). Other compile errors are raised. libtpu 0.0.52 puts an error
  code and name before the message ('E1000: CompileTimeHbmOom: Ran out of ...'): left out."""
  text = str(error)
  if 'RESOURCE_EXHAUSTED' not in text:
    raise error
  needed = re.search(r'HLO temporaries \(([\d.]+)G\)', text)
  message = text.splitlines()[0].partition('RESOURCE_EXHAUSTED: ')[2]
  return {'temp_gb': float(needed[1]) * 2**30 / GB if needed else None, 'fits': False,
          'error': re.sub(r'^E\d+: \w+: ', '', message)}


# libtpu splits a matmul whose operand is being all-gathered or reduce-scattered into a loop
# over the shards with collective permutes ("windowed einsum"): a loop, counted once
NO_WINDOWED_EINSUM = {'xla_tpu_enable_windowed_einsum_for_all_gather': False,
                      'xla_tpu_enable_windowed_einsum_for_reduce_scatter': False}


def compile_twin(config: ml_collections.ConfigDict, devices: list, n_layers: int,
                 state_layout=None):
  """The train step of a twin of a resolved config without loops, compiled: `n_layers` layers
  unrolled, one microbatch, no windowed einsums (`state_layout`: see `steps.build`)."""
  twin = config.unlock().copy_and_resolve_references()
  twin.model.update(scan_layers=False, n_layers=n_layers)
  twin.train.update(batch_size=twin.train.batch_size // twin.train.grad_accum_steps,
                    grad_accum_steps=1)
  return compile_train_step(program_on(twin, devices, state_layout), twin, NO_WINDOWED_EINSUM)


def _flops_and_seconds(compiled) -> dict:
  cost = compiled.cost_analysis()
  return {k: cost[k] for k in ('flops', 'optimal_seconds')}


def operation_cycles(compiled) -> collections.Counter | None:
  """libtpu's own estimate (`estimated_cycles`, written into each instruction of the entry
  computation it schedules) by the JAX operation the instructions came from
  (`lm.planning.hlo.operation_name`). None where the HLO text cannot be read back."""
  try:
    text = compiled.as_text()
  except jax.errors.JaxRuntimeError:   # a libtpu newer than jaxlib
    return None
  cycles = collections.Counter()
  for line in text[text.index('\nENTRY'):].splitlines():
    estimate = re.search(r'"estimated_cycles":"(\d+)"', line)
    if estimate:
      cycles[hlo.operation_name(line)] += int(estimate[1])
  return cycles


def breakdown(config: ml_collections.ConfigDict, devices: list, top: int,
              twins: dict | None = None) -> dict | None:
  """Where the estimated step of one microbatch goes, in milliseconds: per layer (the two-layer
  twin's `operation_cycles` less the one-layer twin's, operation by operation) and the rest
  (the one-layer twin less a layer), the `top` largest operations of each. Each part is
  scaled to XLA's estimate of it (`optimal_seconds`: two-layer less one-layer twin, and
  one-layer twin less that), which is not exactly the instructions' sum (1% apart for the
  Llama-3-8B shape): rest + n_layers x per layer is `lm.plan`'s extrapolation where every
  layer is alike. `twins`: those already compiled, by number of layers (`_cost`'s); the
  others are compiled here."""
  compiled = [(twins or {}).get(n) or compile_twin(config, devices, n) for n in (1, 2)]
  (one, two), (one_s, two_s) = ([operation_cycles(t) for t in compiled],
                                [t.cost_analysis()['optimal_seconds'] for t in compiled])
  if one is None or two is None:
    return None
  layer = {k: two[k] - one[k] for k in set(two) | set(one)}
  rest = {k: one[k] - layer[k] for k in layer}

  def largest(part: dict, seconds: float) -> list:
    ms = 1e3 * seconds / sum(part.values())
    return [[k, round(v * ms, 4)] for k, v in sorted(part.items(), key=lambda kv: -kv[1])[:top]]
  return {'per_layer_ms': 1e3 * (two_s - one_s), 'rest_ms': 1e3 * (2 * one_s - two_s),
          'per_layer': largest(layer, two_s - one_s), 'rest': largest(rest, 2 * one_s - two_s)}


def extrapolated(config: ml_collections.ConfigDict, devices: list,
                 state_layout=None) -> tuple[dict, dict]:
  """(FLOPs and XLA's step-time estimate of a resolved config's train step, the twins
  compiled for it by number of layers). XLA counts a loop body once, and loops come from
  scanned layers, gradient accumulation and the compiler's own windowed einsums, so the cost
  comes from twins without loops: one microbatch, its cost times config.train.grad_accum_steps
  (which counts the optimizer update that many times: about 1% more at these sizes); no
  windowed einsums; and layers unrolled, of which two twins, of one and of two layers (of one
  and two periods of attention_global_every), are compiled and the cost extrapolated linearly
  to n_layers: unrolling every layer of a large model takes libtpu many minutes on a CPU.
  `state_layout`: see `steps.build`."""
  m, k = config.model, config.train.grad_accum_steps
  period = m.attention_global_every or 1
  whole = m.n_layers % period or m.n_layers < 2 * period
  twins = {n: compile_twin(config, devices, n, state_layout)
           for n in ((m.n_layers,) if whole else (period, 2 * period))}
  if whole:
    cost = _flops_and_seconds(twins[m.n_layers])
  else:
    one, two = (_flops_and_seconds(twins[n]) for n in (period, 2 * period))
    cost = {key: one[key] + (m.n_layers // period - 1) * (two[key] - one[key]) for key in one}
  return {key: k * value for key, value in cost.items()}, twins


def _cost(config: ml_collections.ConfigDict, program: steps.Program, compiled,
          unroll: bool) -> tuple[dict, str, dict]:
  """(FLOPs and XLA's step-time estimate, 'unrolled' | 'scanned', the twins compiled for it by
  number of layers): `extrapolated` (not with pipeline stages), else the compiled program's
  own, which counts each loop body once."""
  if not unroll or program.mesh.shape['stage'] > 1:
    return compiled.cost_analysis(), 'scanned', {}
  try:
    cost, twins = extrapolated(config, program.mesh.devices.flatten().tolist())
  except jax.errors.JaxRuntimeError as e:
    _out_of_memory(e)   # the twin outgrew HBM: the loops' own (under)estimate
    return compiled.cost_analysis(), 'scanned', {}
  return cost, 'unrolled', twins


def resolved(config: ml_collections.ConfigDict, chips: int) -> ml_collections.ConfigDict:
  """The config resolved (and validated) as a run on `chips` chips would resolve it."""
  config_lib.validate(config_lib.resolve(config, None), chips)
  config = config_lib.resolve(config, _vocab_size(config))
  config_lib.validate(config, chips)
  return config


def plan(config: ml_collections.ConfigDict, topology: tpus.Topology, unroll: bool = True,
         top: int = 0) -> dict:
  """The plan of one config on one slice (the keys of the command's JSON line); with `top` > 0
  also its `breakdown`."""
  devices = topology.devices()
  config = resolved(config, len(devices))
  program = program_on(config, devices)
  chips, spec = topology.chips, topology.spec
  state = program.abstract_state
  row = {'topology': topology.name, 'chips': chips, 'hbm_gb': spec.hbm_gb,
         'mesh': dict(program.mesh.shape),
         'params': program.model_config.param_counts()['total'],
         'state_gb': _bytes_per_chip((state.params, state.opt_state)) / GB,
         'frozen_gb': _bytes_per_chip(program.abstract_frozen) / GB}
  tokens = config.train.batch_size * config.data.seq_len
  model_flops = program.model_config.flops_per_token(config.data.seq_len) * tokens
  row['model_flops_per_chip'] = model_flops / chips
  start = time.perf_counter()
  try:
    compiled = compile_train_step(program, config)
  except jax.errors.JaxRuntimeError as e:
    row.update(_out_of_memory(e))
    live = row['state_gb'] + row['frozen_gb']
    return {**row, 'total_gb': row['temp_gb'] and live + row['temp_gb'], 'step_flops': None,
            'est_step_s': None, 'est_mfu': None, 'tokens_per_s_per_chip': None,
            'cost_from': None, 'pallas_kernels': None, 'collectives': {},
            'compile_s': time.perf_counter() - start}
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  live = (memory.argument_size_in_bytes + memory.output_size_in_bytes
          - memory.alias_size_in_bytes)   # the donated state's outputs reuse its buffers
  # the larger of XLA's temporary allocation and its peak heap less the arguments: libtpu
  # 0.0.42 reports a temp_size of 0, or less than the peak, for some programs
  temp = max(memory.temp_size_in_bytes, memory.peak_memory_in_bytes - live)
  cost, cost_from, twins = _cost(config, program, compiled, unroll)
  # XLA's estimate comes out negative for some loops (seen with --no_unroll): no estimate
  step_s = cost['optimal_seconds'] if cost['optimal_seconds'] > 0 else None
  try:
    hlo = compiled.as_text()
  except jax.errors.JaxRuntimeError:   # a libtpu newer than jaxlib reads back no HLO text
    hlo = None
  return {**row, 'temp_gb': temp / GB, 'total_gb': (live + temp) / GB,
          'fits': (live + temp) / GB <= spec.hbm_gb, 'step_flops': cost['flops'],
          'est_step_s': step_s,
          'est_mfu': step_s and model_flops / (step_s * chips * spec.peak_flops),
          'tokens_per_s_per_chip': step_s and tokens / step_s / chips, 'cost_from': cost_from,
          'pallas_kernels': hlo and hlo.count('tpu_custom_call'),
          'collectives': hlo and collectives(hlo), 'compile_s': compile_s,
          **({'breakdown': breakdown(config, devices, top, twins)
                           if cost_from == 'unrolled' else None}
             if top else {})}


def table(rows: list[dict], swept: list[str]) -> str:
  """The plans as a Markdown table, one row each (the swept keys first)."""
  head = [k.split('.')[-1] for k in swept] + [
      'mesh', 'state GB', 'temp GB', 'total / HBM GB', 'fits', 'est step s', 'est MFU',
      'tok/s/chip', 'compile s']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + ' --- |' * len(head)]
  show = lambda value, form: '-' if value is None else format(value, form)
  for r in rows:
    over = r['total_gb'] and r['total_gb'] - r['hbm_gb']
    fits = 'yes' if r['fits'] else f'no (+{show(over, ".1f")} GB)'
    cells = [str(r[k]) for k in swept] + [
        'x'.join(str(v) for v in r['mesh'].values()), show(r['state_gb'], '.2f'),
        show(r['temp_gb'], '.2f'), f'{show(r["total_gb"], ".1f")} / {r["hbm_gb"]:.0f}', fits,
        show(r['est_step_s'], '.4g'), show(r['est_mfu'], '.1%'),
        show(r['tokens_per_s_per_chip'], ',.0f'), show(r['compile_s'], '.1f')]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)

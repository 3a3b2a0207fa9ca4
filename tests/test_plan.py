"""lm.plan: the real train step compiled for a TPU slice by libtpu (the `tpu` extra), no TPU
needed; memory, FLOPs and collectives read back from the compiled program."""
import dataclasses
import json
import re
import subprocess
import sys

import jax
import pytest

from lm import config as config_lib
from lm.config import objective_traits, sweeps
from lm.config.checks import ConfigError
from lm.parallel import tpus
from lm.planning import plan
from tests.conftest import tiny_config

V5E_4 = tpus.parse('v5e:2x2')


@pytest.fixture(scope='module', autouse=True)
def each_program_compiled_once():
  """libtpu takes 10-20 s a program on this CPU: plans that compile the same one (the same
  resolved config on as many chips of one kind, with the same options) in one test process
  share it."""
  compile_train_step, compiled = plan.compile_train_step, {}

  def once(program, config, compiler_options=None):
    devices = program.mesh.devices
    key = (config.to_json_best_effort(), devices.shape, devices.flat[0].device_kind,
           repr(compiler_options))
    if key not in compiled:
      compiled[key] = compile_train_step(program, config, compiler_options)
    return compiled[key]

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(plan, 'compile_train_step', once)
    yield


def _config(mesh=(1, 4, 1, 1), batch=8, seq_len=128, **model):
  """A model large enough that parameters, not constants, dominate the memory figures."""
  config = tiny_config(**{**dict(d_model=256, n_heads=4, n_kv_heads=4, d_ff=1024,
                                 vocab_size=512, dtype='bfloat16'), **model})
  config.data.seq_len = seq_len
  config.train.update(batch_size=batch, eval_batch_size=batch)
  config.mesh.shape = mesh
  return config


@pytest.fixture(scope='module')
def fsdp_plan():
  """The default _config (FSDP over 4 chips) planned without twins: one compile, shared."""
  return plan.plan(_config(), V5E_4, unroll=False)


def test_fsdp_holds_a_quarter_of_the_data_parallel_state_per_chip(fsdp_plan):
  fsdp = fsdp_plan
  replicated = plan.plan(_config((4, 1, 1, 1)), V5E_4, unroll=False)
  # parameters + AdamW's two moments in float32: 12 bytes per parameter, all on each chip
  assert replicated['state_gb'] == pytest.approx(12 * replicated['params'] / 1e9, rel=1e-3)
  assert fsdp['state_gb'] == pytest.approx(replicated['state_gb'] / 4, rel=0.10)
  assert fsdp['collectives']['all-gather'] > 0 and 'all-gather' not in replicated['collectives']
  # gradients: each chip keeps the sum of its own shard (libtpu's all-reduce-scatter fusions)
  # under FSDP, the whole sum when replicated
  assert fsdp['collectives']['reduce-scatter'] > 0
  assert replicated['collectives']['all-reduce'] > 0
  assert 'reduce-scatter' not in replicated['collectives']
  for row in (fsdp, replicated):
    assert row['fits'] and row['total_gb'] >= row['state_gb'] > 0 and row['temp_gb'] > 0
    assert row['chips'] == 4 and row['hbm_gb'] == tpus.GENERATIONS['v5e'].hbm_gb


def test_full_remat_needs_fewer_temporary_bytes_than_none():
  # activations (attention scores above all) outweigh the gradients here
  shape = dict(batch=32, seq_len=256, d_model=128, d_ff=512)
  none = plan.plan(_config(remat='none', **shape), V5E_4, unroll=False)
  full = plan.plan(_config(remat='full', **shape), V5E_4, unroll=False)
  assert full['temp_gb'] < 0.5 * none['temp_gb']


def test_planned_flops_agree_with_the_model_count():
  """With the loops unrolled (twins of the scanned, accumulating program, without the
  compiler's windowed einsums, which FSDP over 16 chips brings), the compiler's FLOPs per
  chip are the model's within 10%: it also counts the softmax, norms, loss and optimizer
  (elementwise), and the masked half of causal attention that flops_per_token counts too."""
  config = _config((1, 16, 1, 1), batch=128, scan_layers=True)
  config.train.grad_accum_steps = 2
  v5e_16 = tpus.parse('v5e-16')
  row = plan.plan(config, v5e_16)
  assert row['cost_from'] == 'unrolled' and row['pallas_kernels'] == 0
  assert row['step_flops'] == pytest.approx(row['model_flops_per_chip'], rel=0.10)
  assert row['est_step_s'] > 0 and 0 < row['est_mfu'] < 1
  assert row['tokens_per_s_per_chip'] == pytest.approx(128 * 128 / row['est_step_s'] / 16)
  scanned = plan.plan(config, v5e_16, unroll=False)
  assert scanned['cost_from'] == 'scanned'   # one of two layers, one of two microbatches
  assert scanned['step_flops'] < 0.4 * row['step_flops']


def test_the_cost_of_all_layers_is_extrapolated_from_twins_of_one_and_two(monkeypatch):
  """The plan's FLOPs and step estimate of a scanned 4-layer model (from unrolled twins of 1
  and 2 layers, each compiled once) are those of the same model compiled with its 4 layers
  unrolled; its breakdown splits the same twins' estimates over the model's operations, per
  layer and the rest."""
  config = _config(scan_layers=True, n_layers=4)
  compiled_twins = []
  compile_twin = plan.compile_twin
  monkeypatch.setattr(plan, 'compile_twin', lambda config, devices, n_layers, *layout: (
      compiled_twins.append(n_layers) or compile_twin(config, devices, n_layers, *layout)))
  row = plan.plan(config, V5E_4, top=1000)
  assert sorted(compiled_twins) == [1, 2]
  unrolled = config_lib.resolve(config, None).unlock()
  unrolled.model.scan_layers = False
  cost = plan.compile_train_step(plan.program_on(unrolled, V5E_4.devices()),
                                 unrolled).cost_analysis()
  assert row['step_flops'] == pytest.approx(cost['flops'], rel=1e-3)
  assert row['est_step_s'] == pytest.approx(cost['optimal_seconds'], rel=0.02)

  split = row['breakdown']
  assert 1e3 * row['est_step_s'] == pytest.approx(split['rest_ms'] + 4 * split['per_layer_ms'])
  per_layer, rest = dict(split['per_layer']), dict(split['rest'])
  assert sum(per_layer.values()) == pytest.approx(split['per_layer_ms'], abs=1e-3)
  # a layer is its own operations (whatever its index), the output head is in the rest
  layer_ops = [k for k, v in per_layer.items() if v > 0.01 * split['per_layer_ms']]
  assert layer_ops and all('layers_N/' in k and not re.search(r'layers_\d', k)
                           for k in layer_ops if 'dot_general' in k)
  assert {'layers_N/mlp/wi/dot_general', 'layers_N/mlp/wo/dot_general',
          'layers_N/attn/q/dot_general'} <= {k.rpartition('checkpoint/')[2].partition(
              'jvp(Transformer)/')[2] or k for k in layer_ops}
  head = [k for k in rest if 'bld,vd->blv' in k]
  assert head and all(abs(per_layer.get(k, 0.0)) < 1e-6 for k in head)
  assert all(rest[k] > 0 for k in head)


def test_a_pipelined_config_compiles_with_collective_permutes():
  config = _config((1, 2, 1, 2), n_layers=4)
  config.model.pipeline_microbatches = 2
  row = plan.plan(config, V5E_4)
  assert row['collectives']['collective-permute'] > 0
  assert row['mesh'] == {'data': 1, 'fsdp': 2, 'tensor': 1, 'stage': 2}
  assert row['cost_from'] == 'scanned'


def test_a_libtpu_newer_than_jaxlib_still_plans(monkeypatch, fsdp_plan):
  """jax 0.10.2 compiles through libtpu 0.0.52 (MaxText's compiler) but cannot read back the
  compiled HLO text: the plan keeps its memory and cost figures, without collectives."""
  def unreadable(compiled):
    raise jax.errors.JaxRuntimeError('INTERNAL: RET_CHECK failure: async-update instruction '
                                     'should have 1 operands but sees 3')
  readable = fsdp_plan
  monkeypatch.setattr(jax.stages.Compiled, 'as_text', unreadable)
  row = plan.plan(_config(), V5E_4, unroll=False)
  assert row['collectives'] is None and row['pallas_kernels'] is None
  for key in ('state_gb', 'temp_gb', 'step_flops', 'est_step_s'):
    assert row[key] == readable[key] and row[key] > 0
  assert readable['collectives']['all-gather'] > 0


def test_a_config_that_does_not_fit_says_by_how_much(monkeypatch):
  # XLA refuses to compile it: 64 x 4096 tokens' attention scores outgrow a v5e's 16 GiB
  row = plan.plan(_config(batch=64, seq_len=4096, d_model=128, d_ff=512, vocab_size=256),
                  V5E_4)
  assert not row['fits'] and row['est_step_s'] is None
  assert row['error'].startswith('Ran out of memory on HBM')
  assert row['temp_gb'] > row['hbm_gb'] and row['total_gb'] > row['temp_gb']
  assert f'no (+{row["total_gb"] - row["hbm_gb"]:.1f} GB) | - | - | - |' in plan.table([row], [])
  # compiled, but over the table's HBM
  small = dataclasses.replace(tpus.GENERATIONS['v5e'], hbm_gb=0.001)
  monkeypatch.setitem(tpus.GENERATIONS, 'v5e', small)
  row = plan.plan(_config(), V5E_4, unroll=False)
  assert not row['fits'] and row['hbm_gb'] == 0.001 and row['est_step_s'] > 0
  assert f'no (+{row["total_gb"] - 0.001:.1f} GB)' in plan.table([row], [])


@pytest.mark.parametrize('name, generation, shape', [
    ('v4-32', 'v4', (2, 2, 4)), ('v5e-16', 'v5e', (4, 4)), ('v5litepod-16', 'v5e', (4, 4)),
    ('v5p-64', 'v5p', (2, 4, 4)), ('v5p-8', 'v5p', (2, 2, 1)), ('v6e-8', 'v6e', (2, 4)),
    ('v5e-1', 'v5e', (1, 1)), ('v5e:2x2', 'v5e', (2, 2))])
def test_slice_names(name, generation, shape):
  topology = tpus.parse(name)
  assert (topology.generation, topology.shape) == (generation, shape)
  devices = topology.devices()
  assert len(devices) == topology.chips
  assert devices[0].device_kind == topology.spec.device_kind


def test_bad_input(monkeypatch):
  with pytest.raises(ConfigError, match=r"'v5p-7' is not a known TPU slice; known: v4-8"):
    tpus.parse('v5p-7')
  with pytest.raises(ConfigError, match=r'needs 8 devices but 4 are available'):
    plan.plan(_config((1, 8, 1, 1)), V5E_4)
  objective = next(k for k, v in objective_traits.TRAITS.items() if v.data_format != 'text')
  config = _config()
  config.train.objective = objective
  with pytest.raises(ConfigError, match='lm.plan plans objectives that read text'):
    plan.program_on(config, V5E_4.devices())
  monkeypatch.setattr(tpus.importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(ConfigError, match=r"needs libtpu: pip install -e '.\[tpu\]'"):
    V5E_4.devices()


def test_sweep_values_parse_as_literals_or_strings():
  assert sweeps.sweep_points(['model.remat=none,full']) == [
      {'model.remat': 'none'}, {'model.remat': 'full'}]
  assert sweeps.sweep_points(['mesh.shape=(1,4,1,1),(4,1,1,1)', 'train.batch_size=8,16']) == [
      {'mesh.shape': m, 'train.batch_size': b} for m in [(1, 4, 1, 1), (4, 1, 1, 1)]
      for b in (8, 16)]
  with pytest.raises(ConfigError, match='must be KEY=V1,V2'):
    sweeps.sweep_points(['model.remat'])


def test_command_prints_a_json_line_per_point_and_a_table():
  args = [sys.executable, '-m', 'lm.plan', '--config', 'experiments/shakespeare_char.py',
          '--topology', 'v5e-4', '--sweep', 'model.remat=none,full', '--no_unroll',
          '--config.train.batch_size=8', '--config.model.n_layers=2']
  out = subprocess.run(args, capture_output=True, text=True, check=True).stdout.splitlines()
  rows = [json.loads(line) for line in out if line.startswith('{')]
  assert [r['model.remat'] for r in rows] == ['none', 'full']
  for row in rows:
    assert {'topology', 'chips', 'hbm_gb', 'state_gb', 'temp_gb', 'fits', 'step_flops',
            'est_step_s', 'est_mfu', 'tokens_per_s_per_chip', 'collectives',
            'compile_s'} <= set(row)
    assert row['topology'] == 'v5e-4' and row['chips'] == 4
  assert out[-4].startswith('| remat | mesh | state GB') and out[-1].startswith('| full | 4x1')
  bad = subprocess.run(args[:5] + ['--topology', 'v9-8'], capture_output=True, text=True)
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines()[-1].startswith("error: --topology='v9-8' is not")


def test_the_state_layouts_benchmark_compiles_both_layouts_of_the_twins(capsys):
  """benchmarks/state_layouts.py, with lm.plan's flags, on a small config."""
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).resolve().parent.parent / 'benchmarks' / 'state_layouts.py'
  spec = importlib.util.spec_from_file_location('state_layouts', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  module.main(['--config', 'experiments/shakespeare_char.py', '--topology', 'v5e-4',
               '--config.train.batch_size=8', '--config.model.n_layers=2'])
  row = json.loads(capsys.readouterr().out.splitlines()[-1])
  for layouts in ('default', 'auto'):
    one, two = row[f'{layouts}_twins_s']
    assert 0 < one < two and row[f'{layouts}_per_layer_ms'] == pytest.approx(1e3 * (two - one))
  assert row['saved'] == pytest.approx(1 - row['auto_est_step_s'] / row['default_est_step_s'])

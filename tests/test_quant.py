"""Weight-only quantization (lm/compress/quant.py, `python -m lm.quantize`): each scheme's
round-trip error within half a quantization step, 4-bit packing, the quantized model against
the float model with the dequantized kernels (one device and sharded), and the command end
to end."""
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import cli, quantize
from lm.compress import quant
from lm.tools import evaluation
from lm.training import runs
from tests.conftest import build_program, command_env, random_batch, tiny_config
from tests.test_train import ROOT

# NF4's 16 levels (Dettmers et al. 2023, appendix E), written out here independently of qwix
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0])


def _program(scheme, group_size=0, shape=(1, 1, 1, 1), **model):
  config = tiny_config(**model)
  config.quant.update(scheme=scheme, group_size=group_size)
  return build_program(config, shape)


HEADS = dict(n_heads=2, n_kv_heads=2)   # head_dim 16, an axis the groups run along


def _float_params(seed=0, **model):
  program = build_program(tiny_config(**model))
  return jax.device_get(program.init(jax.random.PRNGKey(seed)).params)


@pytest.mark.parametrize('scheme,group_size', [('int8', 0), ('int8', 16), ('int4', 16),
                                               ('nf4', 8)])
def test_round_trip_error_is_within_half_a_step(scheme, group_size):
  program = _program(scheme, group_size, **HEADS)
  params = _float_params(**HEADS)
  quantized = quant.quantize_like(params, program.abstract_state.params)
  kernel = quantized['layers']['mlp']['wi']['kernel']   # [layers, d_model 32, d_ff 64]
  assert quant.is_quantized(kernel)
  scale = np.asarray(kernel.array.scale, np.float32)
  groups = 32 // (group_size or 32)
  assert scale.shape == (2, groups, 64)   # one per output channel, per group of inputs
  original = np.asarray(params['layers']['mlp']['wi']['kernel'])
  if scheme != 'int8':   # 4-bit kernels are quantized from bfloat16 (bfloat16 scales)
    original = np.asarray(original.astype(jnp.bfloat16), np.float32)
  restored = np.asarray(quant.dequantize(kernel), np.float32)
  step = np.repeat(scale, group_size or 32, axis=1)   # each weight's scale
  if scheme == 'nf4':   # levels scale * NF4: half the widest gap between neighbours
    step = step * np.diff(NF4).max()
    levels = restored / np.repeat(scale, group_size, axis=1)
    assert np.abs(levels[..., None] - NF4).min(-1).max() < 1e-2   # every value is a level
  rounding = 0 if scheme == 'int8' else np.abs(restored) * 2 ** -8   # bfloat16 product
  error = np.abs(restored - original)
  assert (error <= step / 2 + rounding + 1e-7).all(), (error - step / 2).max()
  assert error.max() > step.max() / 8   # it did quantize
  # the scale maps the group's absmax to the end of the range: qwix's integer range is
  # qmax + 1/2, so the largest bucket is a full step wide
  absmax = np.abs(original).reshape(2, groups, -1, 64).max(2)
  qmax = {'int8': 127.5, 'int4': 7.5, 'nf4': 1}[scheme]
  np.testing.assert_allclose(scale, absmax / qmax, rtol=1e-2 if scheme != 'int8' else 1e-6)


@pytest.mark.parametrize('scheme', ['int4', 'nf4'])
def test_four_bit_values_are_stored_two_per_byte_and_restored_exactly(scheme):
  program = _program(scheme, 8, **HEADS)
  quantized = quant.quantize_like(_float_params(**HEADS), program.abstract_state.params)
  stored = quant.to_stored(quantized)
  kernel = quantized['layers']['attn']['o']['kernel']
  packed = stored['layers']['attn']['o']['kernel']
  assert packed['qvalue'].dtype == jnp.uint8
  assert packed['qvalue'].shape == (*kernel.shape[:-1], kernel.shape[-1] // 2)
  values = np.asarray(kernel.array.qvalue.astype(jnp.int8))
  assert values.min() < 0 if scheme == 'int4' else values.max() > 7   # signs and high nibbles
  back = quant.from_stored(stored, program.abstract_state.params)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(quantized)):
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a.astype(jnp.float32)),
                                                 np.asarray(b.astype(jnp.float32)))
  assert quant.stored_bytes(stored) < quant.stored_bytes(quant.to_stored(
      quant.quantize_like(_float_params(**HEADS), _program('int8', **HEADS).abstract_state.params)))


@pytest.mark.parametrize('scheme', ['int8', 'nf4'])
def test_quantized_model_equals_float_model_with_dequantized_kernels_sharded(scheme):
  """qwix's quantized matmuls against plain matmuls of the dequantized kernels, on one
  device and on fsdp 2 x tensor 4 (n_kv_heads 8 and d_ff split over tensor)."""
  params = _float_params()
  batch = random_batch(8, 16)
  float_program = build_program(tiny_config())
  logits = {}
  for shape in ((1, 1, 1, 1), (1, 2, 4, 1)):
    program = _program(scheme, 4, shape)   # groups of 4 (head_dim is 4)
    quantized = quant.quantize_like(params, program.abstract_state.params)
    placed = jax.device_put(quantized, jax.tree.map(lambda a: a.sharding,
                                                    program.abstract_state.params))
    apply = program.in_mesh(jax.jit(lambda p, t, m=program.model: m.apply({'params': p}, t)))
    logits[shape] = np.asarray(apply(placed, batch['inputs']))
  reference = np.asarray(jax.jit(float_program.model.apply)(
      {'params': quant.dequantize(quantized)}, batch['inputs']))
  unquantized = np.asarray(jax.jit(float_program.model.apply)({'params': params},
                                                              batch['inputs']))
  moved = np.abs(logits[(1, 1, 1, 1)] - unquantized).max()   # what quantizing changed
  assert moved > 1e-4
  assert np.abs(logits[(1, 1, 1, 1)] - reference).max() < 0.02 * moved
  np.testing.assert_allclose(logits[(1, 2, 4, 1)], logits[(1, 1, 1, 1)], atol=1e-5)


def _quantize(capsys, *args):
  """`python -m lm.quantize ARGS` in this process: (exit code, stdout, stderr)."""
  code = 0
  try:
    cli.run(quantize.main, [str(a) for a in args])
  except SystemExit as e:
    code = e.code
  out = capsys.readouterr()
  return code, out.out, out.err


def _val_loss(workdir) -> float:
  return evaluation.evaluate(str(workdir), ('validation',), eval_batches=20)['val_loss']


def test_quantize_command_evaluates_samples_and_refuses_bad_input(char_run, tmp_path, capsys):
  """The default experiment (100 steps): int8 moves validation loss by < 1% relative, 4-bit
  kernels take under 30% of their bfloat16 bytes; quantized runs sample."""
  before = _val_loss(char_run)
  for scheme in ('int8', 'int4', 'nf4'):
    code, out, err = _quantize(capsys, '--workdir', char_run, '--scheme', scheme, '--out',
                               tmp_path / scheme)
    assert code == 0, err[-2000:]
    summary = json.loads(out.strip().splitlines()[-1])
    after = _val_loss(tmp_path / scheme)
    ratio = summary['kernel_bytes_quantized'] / summary['kernel_bytes_bfloat16']
    if scheme == 'int8':
      assert abs(after - before) / before < 0.01, (before, after)
      assert 0.5 < ratio < 0.55   # a byte per weight, a float32 scale per output channel
    else:
      assert abs(after - before) / before < 0.05, (scheme, before, after)
      assert ratio <= 0.30, ratio   # half a byte per weight, a bfloat16 scale per 32
    assert after != before
    assert summary['disk_bytes'] < summary['bytes_before']
  run = runs.load(str(tmp_path / 'nf4'), 'run')
  assert quant.kernels(run.variables['params'])   # read back quantized
  env = command_env()
  sampled = subprocess.run([sys.executable, '-m', 'lm.sample', '--workdir', str(tmp_path / 'nf4'),
                            '--prompt', 'ROMEO:', '--max_new_tokens', '20', '--greedy'],
                           capture_output=True, text=True, env=env, cwd=ROOT)
  assert sampled.returncode == 0 and sampled.stdout.startswith('ROMEO:'), sampled.stderr[-2000:]

  for args, message in (
      (('--workdir', tmp_path / 'nowhere', '--scheme', 'int8'), 'nowhere'),
      (('--workdir', char_run, '--scheme', 'int3'), "--scheme='int3'"),
      (('--workdir', char_run, '--scheme', 'int4', '--group_size', '48'),
       'group_size=48 does not divide model.d_model=128'),
      (('--workdir', tmp_path / 'int8', '--scheme', 'int4'), 'already quantized')):
    code, _, err = _quantize(capsys, *args, '--out', tmp_path / 'bad')
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err[-2000:]

"""Low-rank compression (`python -m lm.lowrank`): the factors are NumPy's truncated SVD of
each kernel, full rank reproduces the model, the energy rule picks the smallest rank, and a
factored run fine-tunes from init_from."""
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from lm import config as config_lib
from lm.compress import svd
from lm.config import ConfigError
from lm.data import tokenizers
from lm.tools import lowrank
from lm.training import runs
from tests.conftest import build_program, command_env, random_batch, tiny_config
from tests.test_train import ROOT, run_main


def _run(tmp_path, **model) -> str:
  """A run directory holding a random model (2 layers, d 32, 8 heads of 4, d_ff 64)."""
  config = config_lib.resolve(tiny_config(**model), None)
  params = jax.device_get(build_program(config).init(jax.random.PRNGKey(0)).params)
  params = jax.tree.map(lambda x: x * 4, params)   # logits that differ clearly
  tokenizer = tokenizers.CharTokenizer(''.join(chr(65 + i) for i in range(64)))
  runs.write(tmp_path / 'dense', config, params, tokenizer, step=0)
  return str(tmp_path / 'dense')


def _logits(run_dir, tokens):
  run = runs.load(run_dir, 'run')
  return np.asarray(jax.jit(run.model.apply)(run.variables, tokens))


@pytest.mark.parametrize('scan_layers', [True, False])
def test_full_rank_reproduces_the_model_and_truncation_is_numpys_svd(tmp_path, scan_layers):
  dense = _run(tmp_path, scan_layers=scan_layers)
  tokens = random_batch(4, 16)['inputs']
  full = lowrank.compress(dense, str(tmp_path / 'full'), 32, None, 'attn/(q|kv|o)|mlp/(wi|wo)')
  np.testing.assert_allclose(_logits(str(tmp_path / 'full'), tokens), _logits(dense, tokens),
                             atol=2e-4, rtol=1e-4)
  dense_params = runs.load(dense, 'run').variables['params']
  for a, b in zip(jax.tree.leaves(svd.folded(runs.load(str(tmp_path / 'full'), 'run')
                                                 .variables['params'])),
                  jax.tree.leaves(dense_params)):   # u @ v multiplied back out
    np.testing.assert_allclose(a, b, atol=1e-5)
  assert full['kernels'] == (5 if scan_layers else 10)   # a scanned kernel holds both layers
  assert full['min_energy_kept'] == pytest.approx(1.0)

  summary = lowrank.compress(dense, str(tmp_path / 'r3'), 3, None, 'attn/o|mlp/wo')
  before = runs.load(dense, 'run').variables['params']
  after = runs.load(str(tmp_path / 'r3'), 'run').variables['params']
  layer = (lambda t: t['layers']) if scan_layers else (lambda t: t)
  for i in range(2):
    pick = (lambda t, i=i: jax.tree.map(lambda x: x[i], layer(t))) if scan_layers else (
        lambda t, i=i: t[f'layers_{i}'])
    o_kernel = np.asarray(pick(before)['attn']['o']['kernel'])          # [heads 8, 4, d 32]
    u, v = (np.asarray(pick(after)['attn']['o'][k]) for k in ('u', 'v'))
    assert u.shape == (8, 4, 3) and v.shape == (3, 32)
    U, S, Vt = np.linalg.svd(o_kernel.reshape(32, 32).astype(np.float64))
    best = (U[:, :3] * S[:3]) @ Vt[:3]   # Eckart-Young: the best rank-3 approximation
    np.testing.assert_allclose(u.reshape(32, 3) @ v, best, atol=1e-4)
    assert 'kernel' in pick(after)['attn']['q']   # not a target: untouched
  assert summary['kernel_params_after'] == 2 * (32 * 3 + 3 * 32 + 64 * 3 + 3 * 32)   # o, wo
  assert summary['params_before'] - summary['params_after'] == (
      summary['kernel_params_before'] - summary['kernel_params_after'])


def test_energy_picks_the_smallest_rank_that_keeps_it():
  s = np.array([[4.0, 2.0, 1.0, 1.0], [3.0, 3.0, 1.0, 0.0]])   # S^2: 22 and 19 in all
  assert svd.energy_rank(s[:1], 16 / 22) == 1
  assert svd.energy_rank(s[:1], 16.01 / 22) == 2
  assert svd.energy_rank(s, 0.9) == 2    # 20/22 and 18/19 at rank 2
  assert svd.energy_rank(s, 0.95) == 3   # 21/22 at rank 3; the second row's 18/19 short
  assert svd.energy_rank(s, 1.0) == 4


def test_bad_requests_are_refused(tmp_path):
  dense = _run(tmp_path)
  for kwargs, message in ((dict(rank=None, energy=None), 'one of --rank'),
                          (dict(rank=4, energy=0.9), 'one of --rank'),
                          (dict(rank=None, energy=1.5), 'must be in (0, 1]'),
                          (dict(rank=33, energy=None), '--rank=33 must be in 1 .. 32'),
                          (dict(rank=2, energy=None, targets='nothing'), 'matches no Linear')):
    args = {'targets': 'attn/(q|kv|o)|mlp/(wi|wo)', **kwargs}
    with pytest.raises(ConfigError, match=message.replace('(', r'\(').replace(']', r'\]')):
      lowrank.compress(dense, str(tmp_path / 'x'), args['rank'], args['energy'], args['targets'])


def test_lowrank_command_then_fine_tune_from_it(char_run, tmp_path, tfds_dir):
  flags = ('--config.train.eval_batches=4', '--config.sample.num_tokens=0',
           f'--config.data.dir={tfds_dir}')
  env = command_env()
  command = [sys.executable, '-m', 'lm.lowrank', '--workdir', str(char_run)]
  done = subprocess.run([*command, '--rank', '8', '--out', str(tmp_path / 'r8')],
                        capture_output=True, text=True, env=env, cwd=ROOT)
  summary = json.loads(done.stdout.strip().splitlines()[-1])
  assert summary['params_after'] < summary['params_before']
  refused = subprocess.run([*command, '--rank', '0', '--out', str(tmp_path / 'r0')],
                           capture_output=True, text=True, env=env, cwd=ROOT)
  assert refused.returncode == 2 and refused.stderr.strip() == (
      'error: --rank=0 must be in 1 .. 128 (the smallest targeted kernel dimension)')
  run_main(tmp_path / 'tuned', *flags, '--config.train.steps=10', '--config.optim.warmup_steps=2',
           '--config.train.checkpoint_every=10', '--config.train.eval_every=10',
           f'--config.train.init_from={tmp_path / "r8"}', '--config.model.from_init_from=True',
           '--config.train.log_every=1', config='experiments/shakespeare_char.py:smoke')
  saved = json.loads((tmp_path / 'tuned' / 'config.json').read_text())
  assert saved['model']['lowrank_rank'] == 8
  tuned = runs.load(str(tmp_path / 'tuned'), 'run').variables['params']
  assert tuned['layers_0']['mlp']['wi']['u'].shape == (128, 8)
  first = json.loads((tmp_path / 'tuned' / 'metrics.jsonl').read_text().splitlines()[0])
  assert first['step'] == 1 and np.isfinite(first['loss'])

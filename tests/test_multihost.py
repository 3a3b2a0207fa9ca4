"""Two local processes acting as hosts train exactly like one process with the same batch."""
import subprocess
import sys

import jax
import numpy as np
import pytest

from launch import local
from tests.test_train import ROOT, SMALL, load_params, read_metrics, run_main

FLAGS = [*SMALL, '--config.train.steps=30', '--config.train.checkpoint_every=10',
         '--config.train.eval_every=10', '--config.optim.decay_steps=30']


def run_hosts(workdir, *flags, hosts=2):
  result = subprocess.run([sys.executable, '-m', 'launch.local', f'--hosts={hosts}',
                           '--workdir', str(workdir), '--config',
                           'experiments/shakespeare_char.py', *flags],
                          capture_output=True, text=True, cwd=ROOT)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  return result


def _curve(workdir):
  """Training and validation losses by step, and the final test loss (a run extended after
  it finished keeps the test loss it measured then)."""
  metrics = read_metrics(workdir)
  return [(m['step'], name, m[name]) for m in metrics for name in ('loss', 'val_loss')
          if name in m] + [metrics[-1]['test_loss']]


def test_two_hosts_match_one_and_resume(tmp_path, tfds_dir):
  data_dir = f'--config.data.dir={tfds_dir}'
  one, two = tmp_path / 'one', tmp_path / 'two'
  run_main(one, *FLAGS, data_dir)
  run_hosts(two, *FLAGS, data_dir, '--config.train.steps=20')      # then "preempted"
  resumed = run_hosts(two, *FLAGS, data_dir)
  assert 'resuming at step 20' in resumed.stdout
  assert "mesh {'data': 2" in resumed.stdout

  curve_one, curve_two = _curve(one), _curve(two)
  assert [c[:2] for c in curve_two[:-1]] == [c[:2] for c in curve_one[:-1]]
  np.testing.assert_allclose([c[-1] for c in curve_two[:-1]] + curve_two[-1:],
                             [c[-1] for c in curve_one[:-1]] + curve_one[-1:], rtol=1e-5)
  # Adam turns reduction-order noise in near-zero gradients into differences of up to
  # ~1e-6 in near-zero parameters; 1e-5 is 1% of one update at lr 1e-3.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               load_params(two, 30), load_params(one, 30))


def test_host_commands_and_bad_arguments(tmp_path):
  commands = local.host_commands(2, 1234, 'runs/x', ['--config', 'experiments/a.py'])
  assert commands[1][2:] == ['lm.main', '--workdir=runs/x', '--coordinator=127.0.0.1:1234',
                             '--num_processes=2', '--process_id=1', '--config',
                             'experiments/a.py']
  with pytest.raises(SystemExit):
    sys.argv = ['launch.local', '--hosts', '0', '--workdir', str(tmp_path)]
    local.main()

"""Two local processes acting as hosts train exactly like one process with the same batch."""
import subprocess
import sys

import jax
import numpy as np
import pytest

from launch import local
from tests.conftest import command_env
from tests.test_train import ROOT, SMALL, load_params, read_metrics, run_main

FLAGS = [*SMALL, '--config.train.steps=30', '--config.train.checkpoint_every=10',
         '--config.train.eval_every=10', '--config.optim.decay_steps=30']


def run_hosts(workdir, *flags, hosts=2):
  result = subprocess.run([sys.executable, '-m', 'launch.local', f'--hosts={hosts}',
                           '--workdir', str(workdir), '--config',
                           'experiments/shakespeare_char.py', *flags],
                          capture_output=True, text=True, cwd=ROOT, env=command_env(),
                          timeout=600)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  return result


def _curve(workdir):
  """Training and validation losses by step, and the final test loss (a run extended after
  it finished keeps the test loss it measured then)."""
  metrics = read_metrics(workdir)
  return [(m['step'], name, m[name]) for m in metrics for name in ('loss', 'val_loss')
          if name in m] + [metrics[-1]['test_loss']]


def _assert_same_curve(curve, expected):
  assert [c[:2] for c in curve[:-1]] == [c[:2] for c in expected[:-1]]
  np.testing.assert_allclose([c[-1] for c in curve[:-1]] + curve[-1:],
                             [c[-1] for c in expected[:-1]] + expected[-1:], rtol=1e-5)


def test_two_hosts_match_one_and_resume(tmp_path, tfds_dir):
  data_dir = f'--config.data.dir={tfds_dir}'
  one, two = tmp_path / 'one', tmp_path / 'two'
  run_main(one, *FLAGS, data_dir)
  run_hosts(two, *FLAGS, data_dir, '--config.train.steps=20')      # then "preempted"
  resumed = run_hosts(two, *FLAGS, data_dir)
  assert 'resuming at step 20' in resumed.stdout
  assert "mesh {'data': 2" in resumed.stdout

  _assert_same_curve(_curve(two), _curve(one))
  # Adam turns reduction-order noise in near-zero gradients into differences of up to
  # ~1e-6 in near-zero parameters; 1e-5 is 1% of one update at lr 1e-3.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               load_params(two, 30), load_params(one, 30))
  # the data iterator was saved per process: one process cannot take the run over
  refused = run_main(two, *FLAGS, data_dir, '--config.train.steps=40', check=False)
  assert refused.returncode == 2
  assert 'process count was 2, now 1' in refused.stderr.strip().splitlines()[-1]


def test_tensor_axis_across_hosts_matches_one_process(tmp_path, tfds_dir):
  """Mesh (1, 1, 2, 1) over 2 hosts: the batch is replicated over the tensor axis, so both
  hosts read every row (not half each) and train like one process."""
  flags = [*FLAGS, f'--config.data.dir={tfds_dir}', '--config.train.steps=10',
           '--config.optim.decay_steps=10', '--config.optim.warmup_steps=2',
           '--config.model.vocab_multiple=2']   # 65 characters: pad to split over 2
  one, two = tmp_path / 'one', tmp_path / 'two'
  run_main(one, *flags)
  run_hosts(two, *flags, '--config.mesh.shape=(1,1,2,1)')
  _assert_same_curve(_curve(two), _curve(one))


def test_pack_evaluation_and_sample_on_fsdp_hosts_match_one_process(tmp_path, tfds_dir):
  """'pack' evaluation batches are global (every process runs the same number), so with the
  parameters held fixed (lr 0) the losses equal one process's; the end-of-run sample runs on
  parameters sharded over both hosts and is the same text."""
  flags = [*SMALL, f'--config.data.dir={tfds_dir}', '--config.data.packing=pack',
           '--config.train.steps=4', '--config.train.eval_every=2',
           '--config.train.checkpoint_every=4', '--config.optim.warmup_steps=0',
           '--config.optim.lr=0', '--config.optim.min_lr=0', '--config.sample.num_tokens=24']
  one, two = tmp_path / 'one', tmp_path / 'two'
  single = run_main(one, *flags)
  hosts = run_hosts(two, *flags, '--config.mesh.shape=(1,2,1,1)')
  assert "'fsdp': 2" in hosts.stdout
  losses = lambda w: [m[k] for m in read_metrics(w) for k in ('val_loss', 'test_loss') if k in m]
  assert len(losses(two)) == 3
  np.testing.assert_allclose(losses(two), losses(one), rtol=1e-6)
  sample = lambda out: out.split('sample:\n', 1)[1].split('\ndone:', 1)[0]
  assert len(sample(hosts.stdout)) >= 24 and sample(hosts.stdout) == sample(single.stdout)


def test_failure_on_process_0_while_preparing_data_ends_every_process(tmp_path, tfds_dir):
  """Process 0 fails before the others can read the data: they stop at once, naming the
  cause, instead of waiting for JAX's timeout."""
  corpus = tmp_path / 'bad.txt'
  corpus.write_bytes(b'fine text\n' * 100 + b'\xff\xfe')
  commands = local.host_commands(2, local._free_port(), str(tmp_path / 'run'), [
      '--config', 'experiments/shakespeare_char.py', f'--config.data.source=text:{corpus}',
      f'--config.data.dir={tfds_dir}'])
  env = command_env(JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=1')
  procs = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for c in commands]
  try:
    outputs = [p.communicate(timeout=120)[1] for p in procs]
  finally:
    for p in procs:
      p.kill()
  cause = f'config.data.source: {corpus} is not UTF-8 text (bad byte at offset 1000)'
  assert [p.returncode for p in procs] == [2, 2], outputs
  assert outputs[0].strip().splitlines()[-1] == f'error: {cause}'
  assert outputs[1].strip().splitlines()[-1] == (
      f'error: process 0 failed while preparing the data: {cause}')


def test_host_commands_and_bad_arguments(tmp_path):
  commands = local.host_commands(2, 1234, 'runs/x', ['--config', 'experiments/a.py'])
  assert commands[1][2:] == ['lm.main', '--workdir=runs/x', '--coordinator=127.0.0.1:1234',
                             '--num_processes=2', '--process_id=1', '--config',
                             'experiments/a.py']
  with pytest.raises(SystemExit):
    sys.argv = ['launch.local', '--hosts', '0', '--workdir', str(tmp_path)]
    local.main()


def test_hosts_get_the_callers_xla_flags_then_their_device_count(tmp_path, monkeypatch):
  """A device count already in XLA_FLAGS is overridden: XLA takes the last of a repeated flag."""
  started = []

  class Finished:
    def __init__(self, command, env, **_):
      started.append(env['XLA_FLAGS'])

    def poll(self):
      return 0

  monkeypatch.setattr(local.subprocess, 'Popen', Finished)
  monkeypatch.setenv('XLA_FLAGS', '--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=8')
  assert local.run(2, 3, str(tmp_path), []) == 0
  assert started == ['--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=8 '
                     '--xla_force_host_platform_device_count=3'] * 2

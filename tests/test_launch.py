"""Local sweeps end to end, comparing their runs, and the Cloud TPU commands."""
import argparse
import json
import os
import subprocess
import sys

from etils import epath

from launch import tpu
from tests.test_train import ROOT

EXPERIMENT = '''
from lm import sweeps
from experiments import shakespeare_char

def get_config():
  c = shakespeare_char.get_config('smoke')
  c.model.update(n_layers=1, d_model=32)
  c.train.update(steps=12, eval_every=6, checkpoint_every=6, log_every=3, eval_batches=2)
  c.optim.warmup_steps = 2
  c.sample.num_tokens = 0
  c.data.dir = {tfds_dir!r}
  return c

def get_sweep():
  return sweeps.grid(**{{'model.d_model': [16, 32], 'optim.lr': [1e-3]}})
'''


def sweep(*args, check=True):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}   # one CPU device per run
  result = subprocess.run([sys.executable, '-m', 'launch.sweep', *args], capture_output=True,
                          text=True, cwd=ROOT, env=env)
  if check:
    assert result.returncode == 0, result.stderr[-3000:]
  return result


def test_local_sweep_runs_skips_and_resumes_then_compares(tmp_path, tfds_dir):
  experiment = tmp_path / 'tiny_sweep.py'
  experiment.write_text(EXPERIMENT.format(tfds_dir=tfds_dir))
  sweep_dir = tmp_path / 'sweep'
  sweep('--config', str(experiment), '--sweep_dir', str(sweep_dir), '--parallel', '2')
  runs = sorted(p.name for p in sweep_dir.iterdir())
  assert runs == ['d_model=16,lr=0.001', 'd_model=32,lr=0.001']
  for run in runs:
    assert json.loads((sweep_dir / run / 'final.json').read_text())['steps'] == 12
    assert json.loads((sweep_dir / run / 'sweep_point.json').read_text())['optim.lr'] == 1e-3
  assert json.loads((sweep_dir / runs[0] / 'config.json').read_text())['model']['d_model'] == 16

  (sweep_dir / runs[0] / 'final.json').unlink()          # as if it had been interrupted
  again = sweep('--config', str(experiment), '--sweep_dir', str(sweep_dir))
  assert f'done already: {runs[1]}' in again.stdout
  assert 'resuming at step 12' in (sweep_dir / runs[0] / 'log.txt').read_text()

  out = subprocess.run([sys.executable, '-m', 'lm.compare', str(sweep_dir), '--csv',
                        str(tmp_path / 't.csv'), '--markdown', str(tmp_path / 't.md'),
                        '--plots', str(tmp_path / 'plots'), '--fit', '3'],
                       capture_output=True, text=True, cwd=ROOT)
  assert out.returncode == 2
  assert 'approach 3 needs at least 5 runs (N, D, loss), got 2' in out.stderr
  assert all(run in out.stdout for run in runs)
  csv_lines = (tmp_path / 't.csv').read_text().splitlines()
  assert csv_lines[0].startswith('run,params,tokens,flops,final_val_loss') and len(csv_lines) == 3
  assert (tmp_path / 't.md').read_text().count('\n') == 4
  for name in ('step', 'tokens', 'flops'):
    assert (tmp_path / 'plots' / f'loss_vs_{name}.png').stat().st_size > 5_000


def test_sweep_bad_input(tmp_path):
  experiment = tmp_path / 'bad.py'
  experiment.write_text('from lm import config\n'
                        'def get_config(): return config.get_base_config()\n'
                        "def get_sweep(): return [{'train.step': 5}]\n")
  bad_key = sweep('--config', str(experiment), '--sweep_dir', str(tmp_path), check=False)
  assert bad_key.returncode == 2
  assert "'train.step' is not a config key; did you mean 'train.steps'" in bad_key.stderr
  where = sweep('--config', 'experiments/scaling_shakespeare.py', '--sweep_dir', str(tmp_path),
                '--where', 'gcp', check=False)
  assert where.returncode == 2 and "--where='gcp' is not one of ['local', 'tpu']" in where.stderr


def _args(**overrides):
  parser = argparse.ArgumentParser()
  tpu.add_arguments(parser)
  args = parser.parse_args([])
  vars(args).update(overrides)
  return args


def test_tpu_commands_for_a_v5e_8_host_and_a_v5p_64_pod_slice():
  plan = tpu.Plan('lm-sweep-0', 'gs://b/s/run', ['python3', '-m', 'lm.main', '--workdir=gs://b/s/run'])
  single = tpu.commands(plan, _args(accelerator='v5e-8', zone='us-west4-a', project='p'))
  assert single['create'] == [
      'gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'lm-sweep-0',
      '--accelerator-type=v5litepod-8', '--version=v2-alpha-tpuv5-lite', '--zone=us-west4-a',
      '--project=p']
  assert single['run'] == [
      'gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'lm-sweep-0', '--worker=all',
      '--zone=us-west4-a', '--project=p',
      '--command=cd ~/lm && nohup python3 -m lm.main --workdir=gs://b/s/run '
      '> ~/lm-sweep-0.log 2>&1 &']
  pod = tpu.commands(plan, _args(accelerator='v5p-64', zone='us-east5-a', queued=True, spot=True,
                                 env=['LIBTPU_INIT_ARGS=--xla_tpu_megacore', 'RUN=a b']))
  assert pod['run'][-1] == (
      "--command=cd ~/lm && nohup env LIBTPU_INIT_ARGS=--xla_tpu_megacore 'RUN=a b' python3 -m "
      'lm.main --workdir=gs://b/s/run > ~/lm-sweep-0.log 2>&1 &')
  assert pod['create'] == [
      'gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'lm-sweep-0',
      '--node-id=lm-sweep-0', '--accelerator-type=v5p-64', '--runtime-version=v2-alpha-tpuv5',
      '--zone=us-east5-a', '--spot']
  assert pod['install'][6] == '--worker=all'
  assert pod['copy'] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', tpu.ARCHIVE,
                         f'lm-sweep-0:{tpu.ARCHIVE}', '--worker=all', '--zone=us-east5-a']
  assert pod['delete'] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'delete',
                           'lm-sweep-0', '--force', '--quiet', '--zone=us-east5-a']


def test_tpu_dry_run_without_gcloud_and_the_missing_gcloud_message(tmp_path):
  env_path = str(epath.Path(sys.executable).parent)     # a PATH without gcloud
  base = [sys.executable, '-m', 'launch.sweep', '--config', 'experiments/scaling_shakespeare.py',
          '--sweep_dir', 'gs://bucket/scaling', '--where', 'tpu', '--accelerator', 'v5p-64']
  dry = subprocess.run([*base, '--dry-run'], capture_output=True, text=True, cwd=ROOT,
                       env={'PATH': env_path})
  assert dry.returncode == 0
  assert dry.stdout.count('tpu-vm create lm-sweep-') == 15
  assert 'gs://bucket/scaling/n_layers=2,d_model=32,n_heads=2,steps=300' in dry.stdout
  real = subprocess.run(base, capture_output=True, text=True, cwd=ROOT, env={'PATH': env_path})
  assert real.returncode == 2 and 'gcloud not found' in real.stdout

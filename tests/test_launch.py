"""Local sweeps end to end, comparing their runs, and the Cloud TPU commands."""
import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
import yaml
from etils import epath

from launch import queue as queue_lib
from launch import sweep as sweep_lib
from launch import tpu
from tests.conftest import command_env
from tests.test_train import ROOT

EXPERIMENT = '''
from lm.config import sweeps
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
  env = command_env()   # one CPU device per run
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
  runs = sorted(p.name for p in sweep_dir.iterdir() if p.name not in ('queue', 'runners'))
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
  assert where.returncode == 2
  assert "--where='gcp' is not one of ['local', 'tpu', 'skypilot']" in where.stderr


@pytest.mark.parametrize('argument, message', [
    ('--paralel=2', "unknown argument '--paralel=2' (did you mean '--parallel'?); besides this "
     "command's flags, only --config.KEY=VALUE overrides and --peer_timeout=... pass to every "
     'point'),
    ('--config.train.steps=40', '--config.train.steps=40 overrides config.train.steps, which the '
     'sweep sets per point: every point would train alike under a name that says otherwise; '
     'change get_sweep() instead'),
    ('--config.train.stepz=40', "--config.train.stepz=40: 'train.stepz' is not a config key; "
     "did you mean 'train.steps'?"),
])
def test_a_mistyped_or_swept_pass_through_argument_is_refused_before_any_point(
    tmp_path, argument, message):
  refused = sweep('--config', 'experiments/scaling_shakespeare.py', '--sweep_dir',
                  str(tmp_path / 'sweep'), argument, check=False)
  assert (refused.returncode, refused.stderr.strip().splitlines()) == (2, [f'error: {message}'])
  assert not (tmp_path / 'sweep').exists()   # nothing queued, nothing started
  passed = sweep('--config', 'experiments/scaling_shakespeare.py', '--sweep_dir',
                 str(tmp_path / 'sweep'), '--dry-run', '--config.optim.lr=1e-3')
  assert all(line.endswith(' --config.optim.lr=1e-3') for line in passed.stdout.splitlines()
             if 'lm.main' in line)


def test_status_of_a_directory_that_holds_no_sweep_is_an_error(tmp_path):
  status = sweep('--status', '--sweep_dir', str(tmp_path), check=False)
  assert (status.returncode, status.stderr.strip()) == (
      2, f'error: --sweep_dir={tmp_path} holds no sweep (no queued points)')


PREEMPTED = '''
from experiments import shakespeare_char

def get_config():
  c = shakespeare_char.get_config('smoke')
  c.model.update(n_layers=1, d_model=32)
  c.train.update(steps=200, eval_every=50, checkpoint_every=20, log_every=10, eval_batches=2)
  c.sample.num_tokens = 0
  c.data.dir = {tfds_dir!r}
  return c

def get_sweep():
  return [{{'optim.lr': 3e-3}}]
'''


def _sweep_process(experiment, sweep_dir):
  env = command_env()
  return subprocess.Popen([sys.executable, '-m', 'launch.sweep', '--config', str(experiment),
                           '--sweep_dir', str(sweep_dir), '--heartbeat_s=0.5', '--poll_s=0.2'],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def test_a_killed_runner_is_restarted_and_its_point_resumes_bit_for_bit(tmp_path, tfds_dir):
  experiment = tmp_path / 'preempted.py'
  experiment.write_text(PREEMPTED.format(tfds_dir=tfds_dir))
  killed = _sweep_process(experiment, tmp_path / 'killed')
  run = tmp_path / 'killed' / 'lr=0.003'
  deadline = time.time() + 300
  while not any(p.name.isdigit() for p in (run / 'checkpoints').glob('*')):
    assert time.time() < deadline and killed.poll() is None, killed.stdout.read()
    time.sleep(0.01)
  claim = json.loads((tmp_path / 'killed' / 'queue' / 'lr=0.003' / 'claim-1.json').read_text())
  os.kill(claim['pid'], signal.SIGKILL)   # the runner, and with it its lm.main: a preemption
  plain = _sweep_process(experiment, tmp_path / 'plain')   # the data is prepared by now
  outputs = [p.communicate(timeout=300)[0] for p in (plain, killed)]
  assert [plain.returncode, killed.returncode] == [0, 0], outputs
  log = (run / 'log.txt').read_text()
  resumed = int(re.search(r'resuming at step (\d+)', log)[1])
  assert 0 < resumed < 200 and '== attempt 2 by local-0' in log
  assert 'lr=0.003: running (local-0)' in outputs[1]
  final = {name: json.loads((tmp_path / name / 'lr=0.003' / 'final.json').read_text())
           for name in ('plain', 'killed')}
  for key in ('val_loss', 'test_loss'):
    assert final['killed'][key] == final['plain'][key]   # bit for bit
  val_losses = {name: [json.loads(line)['val_loss'] for line in
                       (tmp_path / name / 'lr=0.003' / 'metrics.jsonl').read_text().splitlines()
                       if 'val_loss' in line] for name in ('plain', 'killed')}
  assert len(val_losses['plain']) == 4 and val_losses['killed'] == val_losses['plain']
  recorded = json.loads((run / 'provenance.json').read_text())
  assert recorded['commit'] == subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT,
                                              capture_output=True, text=True).stdout.strip()


TPU = ['--config', 'experiments/scaling_shakespeare.py', '--sweep_dir', 'gs://bucket/s1',
       '--where', 'tpu', '--accelerator', 'v5p-64', '--zone', 'us-east5-a', '--slices', '2']


def _no_gcloud(*args):
  env_path = str(epath.Path(sys.executable).parent)     # a PATH without gcloud or sky
  return subprocess.run([sys.executable, '-m', 'launch.sweep', *args], capture_output=True,
                        text=True, cwd=ROOT, env={'PATH': env_path})


def test_tpu_dry_run_packs_slices_with_queued_spot_capacity():
  dry = _no_gcloud(*TPU, '--spot', '--valid_until', '6h', '--dry-run')
  assert dry.returncode == 0, dry.stderr
  lines = dry.stdout.splitlines()
  assert lines[0].startswith('# code: the working tree (commit ')
  assert lines[1] == '# queue: 15 points in gs://bucket/s1/queue/'
  assert ('until python3 -m launch.runner --sweep_dir=gs://bucket/s1 --slice=lm-sweep-0 '
          '--worker=auto --workers=8 --max_failures=3 --heartbeat_s=30.0 '
          '--heartbeat_timeout_s=600.0; do sleep 60; done   # a crashed runner starts again') \
      in lines
  assert 'until gcloud storage cp gs://bucket/s1/code.tar.gz code.tar.gz; do sleep 30; done' \
      in lines
  assert ('if [ "$worker" = 0 ]; then gcloud compute tpus queued-resources delete lm-sweep-0 '
          '--force --quiet --zone=us-east5-a --async; fi') in lines
  creates = [shlex.split(line) for line in lines if 'queued-resources create' in line]
  assert len(creates) == 2   # 2 slices for 15 points, not one per point
  script = creates[1][10].split('=', 2)[2]
  assert creates[1] == [
      'gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'lm-sweep-1',
      '--node-id=lm-sweep-1', '--runtime-version=v2-alpha-tpuv5', '--accelerator-type=v5p-64',
      '--zone=us-east5-a', f'--metadata-from-file=startup-script={script}',
      '--scopes=cloud-platform', '--spot', '--valid-until-duration=6h']
  assert script.endswith('lm-sweep-1-startup.sh')
  direct = _no_gcloud(*TPU, '--direct', '--reserved', '--dry-run')
  create = next(shlex.split(line) for line in direct.stdout.splitlines() if ' create ' in line)
  assert create[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'lm-sweep-0']
  assert '--version=v2-alpha-tpuv5' in create and create[-1] == '--reserved'
  delete = _no_gcloud(*TPU, '--delete', '--dry-run')
  assert delete.stdout.splitlines() == [
      f'gcloud compute tpus queued-resources delete lm-sweep-{i} --force --quiet '
      '--zone=us-east5-a' for i in range(2)]


def test_skypilot_dry_run_is_one_managed_job_per_slice():
  dry = _no_gcloud(*TPU, '--where', 'skypilot', '--spot', '--env', 'WANDB_MODE=offline',
                   '--dry-run')
  assert dry.returncode == 0, dry.stderr
  yaml_text = dry.stdout.split('.yaml\n', 1)[1].split('sky jobs launch')[0]
  task = yaml.safe_load(yaml_text)
  assert task['name'] == 'lm-sweep-0' and task['workdir'] == str(ROOT)
  assert task['resources'] == {
      'infra': 'gcp/us-east5/us-east5-a', 'accelerators': 'tpu-v5p-64',
      'accelerator_args': {'runtime_version': 'v2-alpha-tpuv5'}, 'use_spot': True,
      'job_recovery': {'strategy': 'FAILOVER', 'max_restarts_on_errors': 0}}
  assert task['envs'] == {'WANDB_MODE': 'offline'}
  assert task['run'].startswith('python3 -m launch.runner --sweep_dir=gs://bucket/s1 '
                                '--slice=lm-sweep-0 --worker=auto --workers=8')
  launches = [line for line in dry.stdout.splitlines() if line.startswith('sky jobs launch')]
  assert [line.split()[5] for line in launches] == ['lm-sweep-0', 'lm-sweep-1']


def test_cloud_bad_input_one_line_each():
  local = _no_gcloud(*TPU, '--sweep_dir', '/tmp/s1', '--dry-run')
  assert local.returncode == 2 and local.stderr == (
      'error: --sweep_dir=/tmp/s1: slices cannot see local paths; use a gs:// directory\n')
  zone = _no_gcloud(*TPU, '--zone', 'us-west4-a', '--dry-run')
  assert zone.returncode == 2 and zone.stderr == (
      'error: --zone=us-west4-a: v5p-64 is not offered there; zones with v5p: us-central1-a, '
      'us-east5-a, europe-west4-b\n')
  size = _no_gcloud(*TPU, '--accelerator', 'v5p-63', '--dry-run')
  assert size.returncode == 2 and "--accelerator='v5p-63' is not a known TPU slice" in size.stderr
  gcloud = _no_gcloud(*TPU)
  assert gcloud.returncode == 2 and 'error: gcloud not found' in gcloud.stderr
  sky = _no_gcloud(*TPU, '--where', 'skypilot')
  assert sky.returncode == 2 and 'error: sky not found: pip install skypilot[gcp]' in sky.stderr


FAKE_GCLOUD = '''#!{python}
import json, os, pathlib, sys
args = sys.argv[1:]
states = pathlib.Path(os.environ['FAKE_STATES'])
with open(states / 'calls.log', 'a') as f:
  f.write(json.dumps(args) + '\\n')
name = next(a for a in args if a.startswith('lm-sweep-'))
state = states / name
if 'describe' in args:
  if not state.exists():
    sys.exit(1)
  print(state.read_text())
elif 'create' in args:
  state.write_text('ACTIVE')
  pathlib.Path(os.environ['FAKE_DONE']).write_text('{{}}')   # the new slice finishes the point
elif 'delete' in args:
  state.unlink()
'''


def test_the_watcher_recreates_a_preempted_slice_and_deletes_all_at_the_end(tmp_path,
                                                                              monkeypatch):
  bin_dir, states = tmp_path / 'bin', tmp_path / 'states'
  bin_dir.mkdir()
  states.mkdir()
  (bin_dir / 'gcloud').write_text(FAKE_GCLOUD.format(python=sys.executable))
  (bin_dir / 'gcloud').chmod(0o755)
  (states / 'lm-sweep-0').write_text('SUSPENDED')   # a queued resource preempted
  (states / 'lm-sweep-1').write_text('ACTIVE')
  point = queue_lib.Point('p0', str(tmp_path / 'sweep' / 'p0'), ['true'], {})
  q = queue_lib.Queue(str(tmp_path / 'sweep'))
  q.add([point])
  monkeypatch.setenv('PATH', f'{bin_dir}:{os.environ["PATH"]}')
  monkeypatch.setenv('FAKE_STATES', str(states))
  os.makedirs(point.workdir)
  monkeypatch.setenv('FAKE_DONE', os.path.join(point.workdir, 'final.json'))
  parser = argparse.ArgumentParser()
  tpu.add_arguments(parser)
  args = parser.parse_args(['--accelerator=v5e-16', '--zone=us-west4-a', '--slices=2'])
  slices = tpu.Slices(args, 'gs://bucket/s1', [])
  fleet = tpu.TpuFleet(slices, {name: f'/tmp/{name}.sh' for name in slices.names})
  final = sweep_lib.watch(q, fleet, poll_s=0.01)
  assert [s.state for s in final] == ['done']
  calls = [json.loads(line) for line in (states / 'calls.log').read_text().splitlines()]
  changes = [(c[2], c[3], c[4]) for c in calls if 'describe' not in c]
  assert changes == [('queued-resources', 'delete', 'lm-sweep-0'),
                     ('queued-resources', 'create', 'lm-sweep-0'),
                     ('queued-resources', 'delete', 'lm-sweep-0'),
                     ('queued-resources', 'delete', 'lm-sweep-1')]
  assert slices.workers == 4   # v5e-16: 4 hosts of 4 chips

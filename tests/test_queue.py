"""The sweep queue against a local directory standing in for gs://: atomic claims under
concurrency, lapsed heartbeats, failures, multi-worker slices, the status table, and the
provenance of the code a sweep runs."""
import json
import os
import re
import subprocess
import sys
import tarfile
import textwrap
import time

from launch import provenance, sweep
from launch import queue as queue_lib
from tests.test_train import ROOT


def _points(sweep_dir, count: int, command=None) -> list[queue_lib.Point]:
  return [queue_lib.Point(f'p{i}', f'{sweep_dir}/p{i}', command or ['true'], {'i': i})
          for i in range(count)]


def test_concurrent_claims_never_give_a_point_to_two_runners(tmp_path):
  queue_lib.Queue(str(tmp_path)).add(_points(tmp_path, 24))
  claimer = textwrap.dedent(f'''
      import sys, time
      from launch import queue
      q = queue.Queue({str(tmp_path)!r})
      while (claim := q.claim(sys.argv[1])) is not None:
        print(claim.point.name, claim.attempt, flush=True)
  ''')
  procs = [subprocess.Popen([sys.executable, '-c', claimer, f'r{i}'], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True) for i in range(6)]
  taken = [line.split() for p in procs for line in p.communicate()[0].splitlines()]
  assert all(p.returncode == 0 for p in procs)
  assert sorted(name for name, _ in taken) == sorted(f'p{i}' for i in range(24))
  assert {attempt for _, attempt in taken} == {'1'}
  states = queue_lib.Queue(str(tmp_path)).states()
  assert {s.state for s in states} == {'running'} and len({s.runner for s in states}) > 1


def test_a_silent_runner_loses_its_point_after_the_heartbeat_timeout(tmp_path):
  q = queue_lib.Queue(str(tmp_path), heartbeat_timeout_s=0.5)
  q.add(_points(tmp_path, 1))
  first = q.claim('a')
  assert q.claim('b') is None and q.state(first.point).state == 'running'
  assert q.beat(first)
  time.sleep(0.7)                    # 'a' is killed: no more beats
  assert q.state(first.point).state == 'preempted'
  second = q.claim('b')
  assert (second.point.name, second.attempt) == ('p0', 2)
  assert not q.beat(first)           # 'a' comes back: it must stop
  assert q.beat(second)
  again = q.claim('b')               # a restarted runner takes its own point back at once
  assert again is None               # ... but only when it is not live under that name
  q.timeout = 0.0
  assert q.claim('b').attempt == 3


def test_failures_mark_a_point_failed_and_a_relaunch_retries_it(tmp_path):
  q = queue_lib.Queue(str(tmp_path), max_failures=2)
  q.add(_points(tmp_path, 2))
  first = q.claim('a')
  assert q.end(first, 1, 'Traceback: boom') == 'pending'   # one failure: retried
  second = q.claim('a')
  assert second.point.name == first.point.name and second.attempt == 2
  assert q.end(second, 1, 'Traceback: boom') == 'failed'
  assert json.loads((tmp_path / 'queue' / 'p0' / 'failed.json').read_text())['failures'] == 2
  assert q.claim('a').point.name == 'p1'   # the others go on
  q.add(_points(tmp_path, 2))              # a relaunch: p0's old failures no longer count
  assert q.state(first.point).state == 'pending'
  third = q.claim('a')
  assert (third.point.name, third.attempt) == ('p0', 3)
  assert q.end(third, 1) == 'pending'


def test_status_table_of_a_sweep_with_points_in_every_state(tmp_path):
  q = queue_lib.Queue(str(tmp_path), heartbeat_timeout_s=600, max_failures=1)
  points = _points(tmp_path, 5)
  q.add(points)
  claims = {p.name: q.claim(f'slice-{p.name}') for p in points[:4]}
  now = time.time()
  for name, step, val in (('p0', 100, 2.5), ('p1', 40, 3.25), ('p2', 10, None)):
    os.makedirs(tmp_path / name, exist_ok=True)
    (tmp_path / name / 'heartbeat.json').write_text(json.dumps(
        {'step': step, 'steps': 100, 'time': now - 30, 'val_loss': val}))
  (tmp_path / 'p0' / 'final.json').write_text('{}')
  q.end(claims['p0'], 0)
  (tmp_path / 'queue' / 'p2' / 'beat-1.json').write_text(json.dumps({'time': now - 3600}))
  (tmp_path / 'queue' / 'p2' / 'claim-1.json').write_text(json.dumps(
      {'runner': 'slice-p2', 'time': now - 3600}))
  q.end(claims['p3'], 1, 'boom')
  rows = sweep.status_rows(q, now=now + 1)
  table = [(r['point'], r['state'], r['step'], r['val_loss'], r['slice'], r['heartbeat'])
           for r in rows]
  assert table == [
      ('p0', 'done', '100/100', '2.5000', 'slice-p0', '1s'),
      ('p1', 'running', '40/100', '3.2500', 'slice-p1', '1s'),
      ('p2', 'preempted', '10/100', '-', 'slice-p2', '31s'),
      ('p3', 'failed', '0/?', '-', 'slice-p3', '1s'),
      ('p4', 'pending', '0/?', '-', '-', '-')]
  text = sweep.status_table(rows)
  assert text.splitlines()[0].split() == ['point', 'state', 'step', 'val_loss', 'slice',
                                          'heartbeat', 'failures']
  assert text.splitlines()[-1] == '1 pending, 1 running, 1 preempted, 1 done, 1 failed'
  out = subprocess.run([sys.executable, '-m', 'launch.sweep', '--status', '--sweep_dir',
                        str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
  assert out.returncode == 0 and re.search(r'^p2 +preempted +10/100', out.stdout, re.M)


def test_every_worker_of_a_slice_runs_the_point_worker_0_claims(tmp_path):
  # the command stands in for one host of a multi-host lm.main: it leaves a mark and, like
  # lm.training.loop on process 0, final.json
  command = [sys.executable, '-c', 'import sys, time, uuid, pathlib; d = pathlib.Path('
             'sys.argv[1]); (d / f"ran-{uuid.uuid4()}").touch(); time.sleep(1.5); '
             '(d / "final.json").write_text("{}")']
  points = _points(tmp_path, 2)
  for p in points:
    p.command = [*command, p.workdir]
  queue_lib.Queue(str(tmp_path)).add(points)
  runners = [subprocess.Popen(
      [sys.executable, '-m', 'launch.runner', f'--sweep_dir={tmp_path}', '--slice=s0',
       f'--worker={w}', '--workers=2', '--heartbeat_s=0.2'], cwd=ROOT,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for w in (1, 0)]
  outs = [r.communicate(timeout=60)[0] for r in runners]
  assert [r.returncode for r in runners] == [0, 0], outs
  for p in points:   # worker 0 and worker 1, once each
    assert len(list((tmp_path / p.name).glob('ran-*'))) == 2
    assert (tmp_path / p.name / 'log-worker-1.txt').exists()
  assert 's0: nothing left to take' in outs[1]


def _git(repo, *args):
  return subprocess.run(['git', *args], cwd=repo, check=True, capture_output=True,
                        text=True).stdout


def test_provenance_is_the_commit_plus_the_diff_of_the_working_tree(tmp_path):
  repo = tmp_path / 'repo'
  repo.mkdir()
  _git(repo, 'init', '-q')
  (repo / '.gitignore').write_text('runs/\n')
  (repo / 'train.py').write_text('lr = 1e-3\n')
  _git(repo, 'add', '.')
  _git(repo, '-c', 'user.email=a@b', '-c', 'user.name=a', 'commit', '-qm', 'first')
  (repo / 'train.py').write_text('lr = 3e-3\n')          # edited, not committed
  (repo / 'new_experiment.py').write_text('steps = 5\n')  # untracked
  (repo / 'runs').mkdir()
  (repo / 'runs' / 'big.bin').write_text('ignored')
  status_before = _git(repo, 'status', '--porcelain')
  snap = provenance.snapshot(provenance.repo_root(str(repo)))
  assert _git(repo, 'status', '--porcelain') == status_before   # the user's index untouched
  assert snap['commit'] == _git(repo, 'rev-parse', 'HEAD').strip() and snap['dirty']
  assert snap['changed'] == ['new_experiment.py', 'train.py']
  provenance.record(str(tmp_path / 'run'), snap)
  assert json.loads((tmp_path / 'run' / 'provenance.json').read_text())['commit'] == \
      snap['commit']
  copy = tmp_path / 'copy'   # the commit + the diff = the working tree
  _git(tmp_path, 'clone', '-q', str(repo), str(copy))
  _git(copy, 'checkout', '-q', snap['commit'])
  _git(copy, 'apply', str(tmp_path / 'run' / 'source.diff'))
  assert (copy / 'train.py').read_text() == 'lr = 3e-3\n'
  assert (copy / 'new_experiment.py').read_text() == 'steps = 5\n'
  assert provenance.pack(str(repo), str(tmp_path / 'code.tar.gz')) == 3
  with tarfile.open(tmp_path / 'code.tar.gz') as tar:
    assert sorted(tar.getnames()) == ['.gitignore', 'new_experiment.py', 'train.py']
    assert tar.extractfile('train.py').read() == b'lr = 3e-3\n'


def test_a_point_that_keeps_failing_is_marked_failed_with_its_log_tail(tmp_path):
  command = [sys.executable, '-c', 'import sys; print("boom: out of memory"); sys.exit(3)']
  points = _points(tmp_path, 1, command)
  queue_lib.Queue(str(tmp_path)).add(points)
  out = subprocess.run([sys.executable, '-m', 'launch.runner', f'--sweep_dir={tmp_path}',
                        '--slice=s0', '--max_failures=2', '--heartbeat_s=0.2'], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 0 and 'p0: exit 3 (failed)' in out.stdout
  log = (tmp_path / 'p0' / 'log.txt').read_text()
  assert log.count('boom: out of memory') == 2 and '== attempt 2 by s0' in log
  assert 'boom: out of memory' in (tmp_path / 'p0' / 'failure.txt').read_text()
  failed = json.loads((tmp_path / 'queue' / 'p0' / 'failed.json').read_text())
  assert failed['failures'] == 2 and 'boom' in failed['log_tail']

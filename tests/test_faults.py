"""Fault injection: checkpoints that prove their bytes, a full / read-only / vanished disk, a
save killed part-way, one process of two lost with no supervisor to end the other."""
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import grain
import jax
import numpy as np
import pytest
from etils import epath

from launch import local
from lm.training import checkpoint, checksums, runs
from tests import test_train
from tests.conftest import command_env
from tests.test_train import ROOT, SMALL, load_params, losses_by_step, read_metrics, run_main

small_run = test_train.small_run   # the fixture: a finished SMALL run (checkpoints 30 and 60)

# lm.main with patches, for the faults a test cannot cause from outside: PATCH runs first
PATCHED_MAIN = '''
import os, shutil, signal, sys
from lm import cli, main
from lm.training import checkpoint, checksums
from lm.parallel import distributed
from lm.training import loop as train
exec(sys.argv.pop(1))
cli.run(main.main)
'''


def run_patched(workdir, patch: str, *flags, devices: int = 1, **popen):
  env = command_env()
  env['XLA_FLAGS'] = local.xla_flags_with_cpu_devices(devices, env.get('XLA_FLAGS'))
  command = [sys.executable, '-c', PATCHED_MAIN, patch, '--config',
             'experiments/shakespeare_char.py', '--workdir', str(workdir), *flags]
  if popen:
    return subprocess.Popen(command, env=env, cwd=ROOT, text=True, **popen)
  return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)


def last_line(result) -> str:
  return result.stderr.strip().splitlines()[-1]


def flip_bit(path: pathlib.Path, position: int, bit: int = 0) -> None:
  data = bytearray(path.read_bytes())
  data[position] ^= 1 << bit
  path.write_bytes(bytes(data))


def largest_file(directory) -> pathlib.Path:
  return max((p for p in pathlib.Path(directory).rglob('*') if p.is_file()),
             key=lambda p: p.stat().st_size)


@pytest.fixture
def saved_step(tmp_path):
  """A checkpoint saved by lm's Checkpointer (a sharded and a replicated array)."""
  mesh = jax.make_mesh((8,), ('data',))
  on = lambda *spec: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
  state = {'w': jax.device_put(np.arange(4096, dtype=np.float32).reshape(512, 8), on('data')),
           'b': jax.device_put(np.ones(8, np.float32), on())}
  ckpt = checkpoint.Checkpointer(epath.Path(tmp_path), keep=2)
  ckpt.save(1, state, iter(grain.MapDataset.range(4).to_iter_dataset()), {'signature': {}})
  ckpt.close()
  return epath.Path(tmp_path) / '1'


def test_checksums_catch_every_flipped_bit_truncation_and_missing_file(saved_step):
  assert checksums.verify(saved_step) is True
  files = sorted(p for p in pathlib.Path(saved_step).rglob('*') if p.is_file()
                 and p.name not in (checksums.CHECKSUMS, *checksums.COMMITTED_LATER))
  assert len(files) >= 6   # state (OCDBT manifest, data, metadata), data iterator, run record
  rng = random.Random(0)
  for path in files:   # every file: its first and last byte and three random ones
    size = path.stat().st_size
    for position in sorted({0, size - 1, *(rng.randrange(size) for _ in range(3))}):
      bit = rng.randrange(8)
      flip_bit(path, position, bit)
      with pytest.raises(checksums.CorruptCheckpoint, match=f'{path} fails its checksum'):
        checksums.verify(saved_step)
      flip_bit(path, position, bit)   # put back
  assert checksums.verify(saved_step) is True

  victim = largest_file(saved_step)
  data = victim.read_bytes()
  victim.write_bytes(data[:-1])
  with pytest.raises(checksums.CorruptCheckpoint,
                     match=f'{victim} has {len(data) - 1} bytes, {len(data)} when saved'):
    checksums.verify(saved_step)
  victim.unlink()
  with pytest.raises(checksums.CorruptCheckpoint, match=f'{victim} is missing'):
    checksums.verify(saved_step)
  victim.write_bytes(data)
  (saved_step / checksums.CHECKSUMS).write_text('{"files": ')
  with pytest.raises(checksums.CorruptCheckpoint, match='does not parse'):
    checksums.verify(saved_step)
  (saved_step / checksums.CHECKSUMS).unlink()   # saved before checksums were kept: accepted
  assert checksums.verify(saved_step) is False


def test_a_flipped_bit_falls_back_and_the_run_matches_an_uninterrupted_one(small_run, tmp_path,
                                                                           tfds_dir):
  flags = [*SMALL, f'--config.data.dir={tfds_dir}', '--config.train.steps=70']
  whole = shutil.copytree(small_run, tmp_path / 'whole')
  flipped = shutil.copytree(small_run, tmp_path / 'flipped')
  victim = largest_file(flipped / 'checkpoints' / '60' / 'state')
  flip_bit(victim, victim.stat().st_size // 2, 4)
  result = run_main(flipped, *flags)
  named = f'{victim} fails its checksum'
  assert named in result.stderr and 'falling back' in result.stderr
  assert f'resuming at step 30 (checkpoint 60 set aside as 60.corrupt: {named}' in result.stdout
  assert 'resuming at step 60:' in run_main(whole, *flags).stdout
  # steps 31-60 trained again, bit for bit as the first time, and 61-70 as from the good copy
  assert losses_by_step(flipped) == losses_by_step(whole)
  jax.tree.map(np.testing.assert_array_equal, load_params(flipped, 70), load_params(whole, 70))
  final = lambda run: [m for m in read_metrics(run) if 'test_loss' in m][-1]
  assert final(flipped) == {**final(whole), 'test_wall_s': final(flipped)['test_wall_s']}
  assert sorted(p.name for p in (flipped / 'checkpoints').iterdir()) == [
      '30', '60', '60.corrupt', '70']


def test_commands_refuse_a_corrupted_checkpoint(small_run, tmp_path):
  run = shutil.copytree(small_run, tmp_path / 'run')
  victim = largest_file(run / 'checkpoints' / '60' / 'state')
  flip_bit(victim, 7)
  expected = (f'checkpoint {run}/checkpoints/60 is corrupted: {victim} fails its checksum')
  with pytest.raises(checkpoint.ResumeError, match='previous checkpoint is .*/checkpoints/30'):
    runs.load(str(run), '--workdir')
  refused = subprocess.run([sys.executable, '-m', 'lm.evaluate', '--workdir', str(run)],
                           capture_output=True, text=True, env=command_env(), cwd=ROOT)
  assert refused.returncode == 2 and expected in last_line(refused), refused.stderr[-2000:]
  # the previous checkpoint still serves, and so does a warm start from it
  assert runs.load(str(run / 'checkpoints' / '30'), '--workdir').step_dir.name == '30'
  with pytest.raises(checkpoint.ResumeError, match=expected):
    checkpoint.load_params(run / 'checkpoints' / '60', {}, {}, 'config.train.init_from')


def test_sigkill_while_the_checksums_are_written_leaves_the_last_checkpoint(small_run, tmp_path,
                                                                            tfds_dir):
  """Killed between a step's files and its commit: no step 60, the temporary directory
  removed on restart, and the resumed run ends as the uninterrupted one did."""
  flags = [*SMALL, f'--config.data.dir={tfds_dir}']
  workdir = tmp_path / 'run'
  kill = ('write = checksums.write\n'
          'def write_and_die(directory):\n'
          '  write(directory)\n'
          '  if directory.name.startswith("60."): os.kill(os.getpid(), signal.SIGKILL)\n'
          'checksums.write = write_and_die')
  killed = run_patched(workdir, kill, *flags)
  assert killed.returncode == -9, killed.stderr[-2000:]
  names = sorted(p.name for p in (workdir / 'checkpoints').iterdir())
  assert names[0] == '30' and names[1].startswith('60.orbax-checkpoint-tmp'), names
  resumed = run_main(workdir, *flags)
  assert 'resuming at step 30' in resumed.stdout
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['30', '60']
  final = lambda run: [m['test_loss'] for m in read_metrics(run) if 'test_loss' in m][-1]
  assert final(workdir) == final(small_run)
  jax.tree.map(np.testing.assert_array_equal, load_params(workdir, 60), load_params(small_run, 60))


@pytest.fixture
def small_disk(tmp_path):
  """A 6 MB filesystem (tmpfs, where this process may mount one), else None: the tests then
  inject the refused write instead (the same error, from the same place in the save)."""
  mount = tmp_path / 'disk'
  mount.mkdir()
  made = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=6m', 'tmpfs', str(mount)],
                        capture_output=True).returncode == 0 if shutil.which('mount') else False
  yield mount if made else None
  if made:
    subprocess.run(['umount', '-l', str(mount)], check=True)


# checkpoints of ~1.3 MB every 10 steps, all kept: the fifth does not fit on 6 MB
DISK_FLAGS = [*SMALL, '--config.train.checkpoint_every=10', '--config.train.keep_checkpoints=9']
NO_SPACE = ('def no_space(directory):\n'
            '  if directory.name.startswith("50."):\n'
            '    raise OSError(28, "No space left on device", str(directory / "state" / "d"))\n'
            '  write(directory)\n'
            'write, checksums.write = checksums.write, no_space\n')


SIX_MB = ('def six_mb(path):\n'   # a 6 MB disk: what the workdir holds is used
          '  used = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) '
          'for f in fs)\n'
          '  return shutil._ntuple_diskusage(6 << 20, used, (6 << 20) - used)\n'
          'shutil.disk_usage = six_mb\n')


def _assert_clean_stop(result, workdir, step: int, problem: str):
  assert result.returncode == 3, result.stderr[-3000:]
  line = last_line(result)
  assert line.startswith(f'error: checkpoint {step}') and problem in line, line
  assert line.endswith(f'rerun the same command to resume from step {step - 10}'), line
  names = sorted((p.name for p in (workdir / 'checkpoints').iterdir()), key=int)
  assert names == [str(s) for s in range(10, step, 10)], names   # nothing partial left
  for name in names:
    assert checksums.verify(workdir / 'checkpoints' / name)


def test_a_full_disk_stops_cleanly_and_the_run_resumes(small_disk, tmp_path, tfds_dir):
  flags = [*DISK_FLAGS, f'--config.data.dir={tfds_dir}']
  workdir = (small_disk or tmp_path) / 'run'
  # refused before writing: the disk lacks the size of the last checkpoint
  full = (run_main(workdir, *flags, check=False) if small_disk else run_patched(
      workdir, SIX_MB, *flags))
  _assert_clean_stop(full, workdir, 50, 'would not fit')
  assert 'bytes free, about' in last_line(full) and full.stderr.count('Traceback') == 0
  # a write that fails part-way (the disk filled by someone else): partial checkpoint removed
  shutil.rmtree(workdir)
  patch = ('checkpoint.Checkpointer._check_space = lambda *args: None\n' if small_disk
           else NO_SPACE)
  failed = run_patched(workdir, patch, *flags)
  _assert_clean_stop(failed, workdir, 50, 'could not be written to')
  assert 'No space left on device' in last_line(failed)
  assert 'the partial checkpoint was removed' in last_line(failed)
  # more space: the same command resumes from the last good checkpoint and finishes
  moved = shutil.copytree(workdir, tmp_path / 'moved')
  resumed = run_main(moved, *flags)
  assert 'resuming at step 40' in resumed.stdout and max(losses_by_step(moved)) == 60


def test_a_read_only_or_vanished_workdir_stops_in_one_line(small_disk, small_run, tmp_path,
                                                           tfds_dir):
  flags = [*SMALL, f'--config.data.dir={tfds_dir}', '--config.train.steps=70']
  if small_disk:   # a read-only filesystem: even root cannot write there
    workdir = shutil.copytree(small_run, small_disk / 'run')
    subprocess.run(['mount', '-o', 'remount,ro', str(small_disk)], check=True)
    refused = run_main(workdir, *flags, check=False)
  else:
    workdir = shutil.copytree(small_run, tmp_path / 'run')
    refused = run_patched(workdir, 'import errno\nfrom etils import epath\n'
                          'def ro(*a, **k): raise OSError(errno.EROFS, "Read-only file system", '
                          f'"{workdir}/config.json")\n'
                          'epath.Path.write_text = ro', *flags)
  assert refused.returncode == 3, refused.stderr[-3000:]
  assert last_line(refused).startswith(f'error: writing to {workdir} failed: Read-only file '
                                       'system'), last_line(refused)
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['30', '60']

  gone = tmp_path / 'gone'   # the workdir disappears mid-run (no save in flight to race it)
  vanish = ('push = train.Logger.push\n'
            'def push_and_vanish(self, step, metrics):\n'
            f'  if step == 35: shutil.rmtree("{gone}")\n'
            '  push(self, step, metrics)\n'
            'train.Logger.push = push_and_vanish')
  result = run_patched(gone, vanish, *SMALL, f'--config.data.dir={tfds_dir}',
                       '--config.train.async_checkpoints=false')
  assert result.returncode == 3, result.stderr[-3000:]
  assert last_line(result).startswith(f'error: writing to {gone} failed: No such file or '
                                      'directory'), last_line(result)
  assert result.stderr.count('Traceback') == 0


HOST_FLAGS = [*SMALL, '--config.train.steps=30', '--config.train.checkpoint_every=10',
              '--config.train.eval_every=10', '--config.optim.decay_steps=30',
              '--config.mesh.shape=(1,2,1,1)', '--peer_timeout=5']
# the host that is lost: dies at step 15, once checkpoint 10 is written
DIE_AT_15 = ('save, push = checkpoint.Checkpointer.save, train.Logger.push\n'
             'def save_and_wait(self, step, *args):\n'
             '  save(self, step, *args)\n'
             '  self.wait()\n'
             'def push_or_die(self, step, metrics):\n'
             '  if step == 15: os.kill(os.getpid(), signal.SIGKILL)\n'
             '  push(self, step, metrics)\n'
             'checkpoint.Checkpointer.save, train.Logger.push = save_and_wait, push_or_die\n')


def _hosts_by_hand(workdir, tfds_dir, lost: int):
  """Two lm.main processes started as hosts of one run, as on Cloud TPU (no launch.local to
  end one when the other dies); process `lost` dies at step 15. Returns the survivor's
  result and the seconds it lived on after the other died."""
  port = local._free_port()
  flags = [*HOST_FLAGS, f'--config.data.dir={tfds_dir}', f'--coordinator=127.0.0.1:{port}',
           '--num_processes=2']
  procs = [run_patched(workdir, DIE_AT_15 if i == lost else '', *flags, f'--process_id={i}',
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
  dead, survivor = procs[lost], procs[1 - lost]
  assert dead.wait(timeout=300) == -signal.SIGKILL, dead.communicate()[1][-3000:]
  died = time.monotonic()
  out, err = survivor.communicate(timeout=120)
  return subprocess.CompletedProcess(survivor.args, survivor.returncode, out, err), (
      time.monotonic() - died)


def test_a_lost_process_ends_the_other_in_bounded_time_and_both_resume(tmp_path, tfds_dir):
  lost = tmp_path / 'lost'
  survivor, seconds = _hosts_by_hand(lost, tfds_dir, lost=1)
  assert survivor.returncode == 4, survivor.stderr[-3000:]
  assert last_line(survivor).startswith('error: lost process 1 of 2: no heartbeat for '), (
      last_line(survivor))
  # --peer_timeout=5 and a beat every 2 s: within 9 s (measured: about 6), the launch included
  assert seconds < 5 + 2 * 2 + 5, seconds
  relaunched = subprocess.run(
      [sys.executable, '-m', 'launch.local', '--hosts=2', '--workdir', str(lost), '--config',
       'experiments/shakespeare_char.py', *HOST_FLAGS, f'--config.data.dir={tfds_dir}'],
      capture_output=True, text=True, cwd=ROOT, env=command_env(), timeout=600)
  assert relaunched.returncode == 0, relaunched.stderr[-3000:]
  assert 'resuming at step 10' in relaunched.stdout
  whole = tmp_path / 'whole'
  subprocess.run([sys.executable, '-m', 'launch.local', '--hosts=2', '--workdir', str(whole),
                  '--config', 'experiments/shakespeare_char.py', *HOST_FLAGS,
                  f'--config.data.dir={tfds_dir}'], check=True, capture_output=True, cwd=ROOT,
                 env=command_env(), timeout=600)
  evaluations = lambda run: [(m['step'], m['val_loss']) for m in read_metrics(run)
                             if 'val_loss' in m]
  assert evaluations(lost) == evaluations(whole) and len(evaluations(whole)) == 3
  jax.tree.map(np.testing.assert_array_equal, load_params(lost, 30), load_params(whole, 30))

  # process 0 lost: the coordination service went with it, and JAX ends the other at once
  survivor, seconds = _hosts_by_hand(tmp_path / 'lost0', tfds_dir, lost=0)
  assert survivor.returncode != 0 and seconds < 10, (survivor.returncode, seconds)

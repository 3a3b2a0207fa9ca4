"""End to end: the main command, exact resume after a kill, checkpoint fallback, learning."""
import json
import os
import re
import shutil
import subprocess
import sys

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from launch.local import xla_flags_with_cpu_devices
from lm.training import checkpoint
from lm.training import loop as train
from tests.conftest import CHAR_RUN_FLAGS, command_env

ROOT = epath.Path(__file__).parent.parent
SMALL = ['--config.model.n_layers=2', '--config.model.d_model=64', '--config.train.steps=60',
         '--config.train.checkpoint_every=30', '--config.train.eval_every=30',
         '--config.train.eval_batches=2', '--config.train.log_every=1',
         '--config.optim.warmup_steps=10', '--config.sample.num_tokens=0']

# Run lm.main, but send the process a signal (SIGKILL, as a crash or preemption would; SIGINT,
# as Ctrl-C does) when it reaches step KILL_AT, after the checkpoint of step WAIT_AT is written.
KILLED_MAIN = '''
import os, signal, sys
from lm import cli, main
from lm.training import checkpoint
from lm.training import loop as train
KILL_AT, WAIT_AT = int(sys.argv.pop(1)), int(sys.argv.pop(1))
# SIGINT is delivered as Ctrl-C's KeyboardInterrupt at once, where it stands: the signal sent
# to itself arrived wherever the interpreter next checked, which in one CI run let the run
# finish (exit 0)
NAME = sys.argv.pop(1)
SIGNAL = getattr(signal, NAME)
save, push = checkpoint.Checkpointer.save, train.Logger.push
def save_and_wait(self, step, *args):
  save(self, step, *args)
  if step == WAIT_AT:
    self.wait()
def push_or_die(self, step, metrics):
  if step == KILL_AT and NAME == 'SIGINT':
    raise KeyboardInterrupt
  if step == KILL_AT:
    os.kill(os.getpid(), SIGNAL)
  push(self, step, metrics)
checkpoint.Checkpointer.save, train.Logger.push = save_and_wait, push_or_die
cli.run(main.main)
'''


EXPERIMENT = 'experiments/shakespeare_char.py'


def run_main(workdir, *flags, config=EXPERIMENT, kill_at=None, kill_with='SIGKILL',
             check=True, devices: int | None = 1, optimized: bool = False):
  """Runs the main command in a fresh process on `devices` CPU devices (None: as many as the
  experiment's config.mesh.cpu_devices asks for, as a user's command line gets); compiled
  with LLVM's optimizations only if `optimized` (conftest.command_env)."""
  env = command_env(optimized)
  if devices is not None:
    env['XLA_FLAGS'] = xla_flags_with_cpu_devices(devices, env.get('XLA_FLAGS'))
  prefix = ['-c', KILLED_MAIN, str(kill_at), '30', kill_with] if kill_at else ['-m', 'lm.main']
  result = subprocess.run([sys.executable, *prefix, '--config', config, '--workdir',
                           str(workdir), *flags], capture_output=True, text=True, env=env,
                          cwd=ROOT)
  if check and result.returncode:
    raise AssertionError(f'exit {result.returncode}\n{result.stdout}\n{result.stderr[-3000:]}')
  return result


def read_metrics(workdir):
  lines = (epath.Path(workdir) / 'metrics.jsonl').read_text().splitlines()
  return [json.loads(line) for line in lines]


def losses_by_step(workdir):
  return {m['step']: m['loss'] for m in read_metrics(workdir) if 'loss' in m}


def load_params(workdir, step):
  """The params of a checkpoint, whatever devices saved it, onto this process's first device."""
  path = epath.Path(workdir) / 'checkpoints' / str(step) / 'state'
  checkpointer = ocp.StandardCheckpointer()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        dict(checkpointer.metadata(path).item_metadata))
  return checkpointer.restore(path, target)['params']


def test_killed_run_resumes_bitwise(tmp_path, tfds_dir):
  """With dropout on: the resumed run replays the same masks."""
  data_dir = f'--config.data.dir={tfds_dir}'
  whole, killed = tmp_path / 'whole', tmp_path / 'killed'
  dropout = '--config.model.dropout=0.1'
  run_main(whole, *SMALL, data_dir, dropout)
  crashed = run_main(killed, *SMALL, data_dir, dropout, kill_at=35, check=False)
  assert crashed.returncode == -9, crashed.stderr[-2000:]
  assert max(losses_by_step(killed)) >= 33        # it logged past the checkpoint, then died
  resumed = run_main(killed, *SMALL, data_dir, dropout)
  assert 'resuming at step 30' in resumed.stdout

  # the same losses at every step (so the same batches) and bitwise the same parameters
  assert losses_by_step(killed) == losses_by_step(whole)
  assert sorted(losses_by_step(killed)) == list(range(1, 61))
  a, b = load_params(whole, 60), load_params(killed, 60)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  final = [m for m in read_metrics(killed) if 'test_loss' in m]
  expected = [m for m in read_metrics(whole) if 'test_loss' in m][0]
  assert len(final) == 1 and final[0]['test_loss'] == expected['test_loss']


def test_ctrl_c_says_how_to_resume_and_the_run_counts_every_segment_once(tmp_path, tfds_dir):
  workdir = tmp_path / 'run'
  flags = [*SMALL, f'--config.data.dir={tfds_dir}']
  stopped = run_main(workdir, *flags, kill_at=35, kill_with='SIGINT', check=False)
  assert stopped.returncode == 130, stopped.stderr[-2000:]
  assert stopped.stderr.strip().splitlines()[-1] == (
      'interrupted at step 35, last checkpoint 30: rerun the same command to resume')
  assert 'Traceback' not in stopped.stderr
  assert 'resuming at step 30' in run_main(workdir, *flags).stdout
  # wall_s sums both processes' times (the first one's up to its last line, step 33)
  final = json.loads((workdir / 'final.json').read_text())
  segments = final['segments']
  assert [(s['start_step'], s['end_step']) for s in segments] == [(0, 33), (30, 60)], segments
  assert all(s['wall_s'] > 0 for s in segments)
  assert final['wall_s'] == pytest.approx(sum(s['wall_s'] for s in segments), abs=1e-3)
  # a rerun of the finished run evaluates nothing again and leaves its record as it was
  again = run_main(workdir, *flags)
  assert 'the run finished at step 60' in again.stdout
  assert json.loads((workdir / 'final.json').read_text()) == final
  assert len([m for m in read_metrics(workdir) if 'test_loss' in m]) == 1
  # trained further: one final evaluation still, at the new last step
  run_main(workdir, *flags, '--config.train.steps=70', '--config.optim.decay_steps=60')
  assert [m['step'] for m in read_metrics(workdir) if 'test_loss' in m] == [70]
  segments = json.loads((workdir / 'final.json').read_text())['segments']
  assert [(s['start_step'], s['end_step']) for s in segments] == [(0, 33), (30, 60), (60, 70)]


def test_cpu_checkpoint_of_a_replicated_state_compiles_nothing(tmp_path, caplog):
  """On CPU the first replica writes a replicated array whole
  (lm.training.checkpoint.state_handler), where Orbax's replica-parallel default compiles a
  slicing program per array shape; the state restores bitwise, onto another sharding too."""
  mesh = jax.make_mesh((8,), ('data',))
  on = lambda spec: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
  state = {'w': np.arange(192, dtype=np.float32).reshape(64, 3) / 7, 'step': np.int32(7)}
  ckpt = checkpoint.Checkpointer(epath.Path(tmp_path), keep=2)
  data = iter(grain.MapDataset.range(4).to_iter_dataset())
  with jax.log_compiles(True):
    ckpt.save(1, jax.device_put(state, on(())), data, {'signature': {}})
    ckpt.wait()
  assert not [r.getMessage() for r in caplog.records if 'ompil' in r.getMessage()]
  target = {'w': jax.ShapeDtypeStruct((64, 3), np.float32, sharding=on(('data',))),
            'step': jax.ShapeDtypeStruct((), np.int32, sharding=on(()))}
  restored = ckpt.restore_latest(target, data, {'signature': {}}, hint='')
  ckpt.close()
  assert restored['w'].sharding == target['w'].sharding
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), state)


@pytest.fixture(scope='module')
def small_run(tmp_path_factory, tfds_dir):
  """A finished run of SMALL (checkpoints 30 and 60): tests that change a run take a copy."""
  workdir = tmp_path_factory.mktemp('small_run') / 'run'
  run_main(workdir, *SMALL, f'--config.data.dir={tfds_dir}')
  return workdir


def test_corrupt_latest_checkpoint_is_set_aside_and_the_previous_one_used(small_run, tmp_path,
                                                                          tfds_dir):
  workdir = shutil.copytree(small_run, tmp_path / 'run')
  flags = [*SMALL, f'--config.data.dir={tfds_dir}']
  for f in (workdir / 'checkpoints' / '60' / 'state').rglob('*'):
    if f.is_file():
      f.write_bytes(b'garbage')
  result = run_main(workdir, *flags, '--config.train.steps=70')
  assert 'checkpoint 60' in result.stderr and 'falling back' in result.stderr
  assert 'resuming at step 30' in result.stdout
  assert max(losses_by_step(workdir)) == 70
  assert sorted(losses_by_step(workdir)) == list(range(1, 71))   # 31-60 logged again, once
  # the unreadable one is kept aside, and step 60 was saved again rather than skipped
  names = sorted(p.name for p in (workdir / 'checkpoints').iterdir())
  assert names == ['30', '60', '60.corrupt', '70'], names

  for step in ('30', '60', '70'):   # nothing readable left: an error, never a fresh start
    for f in (workdir / 'checkpoints' / step).rglob('*'):
      if f.is_file():
        f.write_bytes(b'garbage')
  lines = len(read_metrics(workdir))
  for _ in range(2):   # the second time only the .corrupt directories are left
    failed = run_main(workdir, *flags, '--config.train.steps=80', check=False)
    assert failed.returncode == 2, failed.stderr[-2000:]
    assert 'holds no readable checkpoint' in failed.stderr.strip().splitlines()[-1]
    assert len(read_metrics(workdir)) == lines


def test_resume_refuses_another_model_and_keeps_the_schedule(small_run, tmp_path, tfds_dir):
  workdir = shutil.copytree(small_run, tmp_path / 'run')
  flags = [*SMALL, f'--config.data.dir={tfds_dir}']
  before = read_metrics(workdir)
  refused = run_main(workdir, *flags, '--config.model.d_model=32', '--config.train.steps=90',
                     check=False)
  assert refused.returncode == 2
  assert refused.stderr.strip().splitlines()[-1] == (
      f'error: cannot resume {workdir} from step 60: config.model.d_ff was 256, now 128; '
      'config.model.d_model was 64, now 32. Use a new --workdir, or start a new run from this '
      f'one with --config.train.init_from={workdir}')
  assert read_metrics(workdir) == before   # nothing lost, nothing written
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['30', '60']

  refused = run_main(workdir, *flags, '--config.data.seq_len=32', check=False)
  assert refused.returncode == 2 and 'config.data.seq_len was 64, now 32' in refused.stderr

  extended = run_main(workdir, *flags, '--config.train.steps=90')
  assert 'config.optim.decay_steps=60' in extended.stdout
  lrs = {m['step']: m['lr'] for m in read_metrics(workdir) if 'lr' in m}
  # the cosine schedule of 60 steps had reached its floor; it stays there, no jump back up
  np.testing.assert_allclose([lrs[s] for s in range(61, 91)], 1e-4, rtol=1e-5)   # step n: lr(n - 1)


def test_warm_start_takes_the_parameters_and_tokenizer_of_another_run(small_run, tmp_path,
                                                                      tfds_dir):
  source, target = small_run, tmp_path / 'target'
  flags = [*SMALL, f'--config.data.dir={tfds_dir}']
  frozen = ['--config.optim.lr=0', '--config.optim.min_lr=0', '--config.train.steps=30']
  result = run_main(target, *flags, *frozen, f'--config.train.init_from={source}')
  assert f'starting from the parameters of {source}/checkpoints/60' in result.stdout
  assert (target / 'tokenizer.json').read_text() == (source / 'tokenizer.json').read_text()
  # a learning rate of 0: the target's parameters are the source's, bit for bit
  jax.tree.map(np.testing.assert_array_equal, load_params(target, 30), load_params(source, 60))
  assert sorted(losses_by_step(target)) == list(range(1, 31))   # its own step count
  first_loss = losses_by_step(target)[1]
  assert first_loss < losses_by_step(source)[1] - 0.5   # trained weights, not a fresh model

  mismatch = run_main(tmp_path / 'other', *flags, '--config.model.n_layers=3',
                      f'--config.train.init_from={source}/checkpoints/30', check=False)
  assert mismatch.returncode == 2
  line = mismatch.stderr.strip().splitlines()[-1]
  assert line.startswith(f'error: config.train.init_from: the parameters of {source}/checkpoints/'
                         '30 do not fit this model: layers_2/attn/kv/bias absent in the '
                         'checkpoint, float32[2, 4, 16] here; '), line


@pytest.mark.parametrize('flags, message', [
    (['--config=experiments/no_such_file.py:smoke'],
     'error: --config: no such experiment file: experiments/no_such_file.py'),
    (['--config.model.n_layer=3'],
     'error: a --config.* override names no config key: n_layer Did you mean "n_layers" '
     'instead of "n_layer"?'),
    (['--config.data.source=text:{short}'],
     r'error: config.data.source: {short} \(22 bytes\) leaves the validation split empty'),
    (['--config.data.source=jsonl:{jsonl}'],
     r'error: config.data.source: {jsonl}:2: not a JSON object with a string field .text.'),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, tfds_dir, flags, message):
  short, jsonl = tmp_path / 'short.txt', tmp_path / 'docs.jsonl'
  short.write_text('two short\nlines here.\n')
  jsonl.write_text('{"text": "fine"}\n{"text": broken\n' + '{"text": "more"}\n' * 40)
  flags = [f.format(short=short, jsonl=jsonl) for f in flags]
  config = flags.pop()[len('--config='):] if flags[-1].startswith('--config=') else EXPERIMENT
  result = run_main(tmp_path / 'run', f'--config.data.dir={tfds_dir}', *flags, config=config,
                    check=False)
  assert result.returncode == 2, result.stderr[-3000:]
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and re.fullmatch(message.format(short=short, jsonl=jsonl) + '.*',
                                          lines[0]), result.stderr[-3000:]


def test_smoke_main_command_leaves_its_artifacts(tmp_path, tfds_dir):
  """The 2-minute smoke version of the README's main command, with a relative workdir."""
  workdir = tmp_path / 'smoke'
  result = run_main(os.path.relpath(workdir, ROOT), f'--config.data.dir={tfds_dir}',
                    config='experiments/shakespeare_char.py:smoke')
  assert 'sample:' in result.stdout and 'done: 60 steps' in result.stdout
  assert 'train' in result.stderr                  # the progress bar
  metrics = read_metrics(workdir)
  assert [m['step'] for m in metrics if 'val_loss' in m] == [30, 60]
  assert 'test_loss' in metrics[-1] and metrics[-1]['step'] == 60
  # each evaluation's wall-clock seconds, beside its loss
  assert all(m['val_wall_s'] > 0 for m in metrics if 'val_loss' in m)
  assert metrics[-1]['test_wall_s'] > 0
  logged = [m for m in metrics if 'loss' in m]
  assert {'perplexity', 'lr', 'grad_norm', 'tokens_per_s', 'tflops', 'step_ms'} <= set(logged[-1])
  assert logged[-1]['loss'] < logged[0]['loss']
  assert json.loads((workdir / 'config.json').read_text())['model']['vocab_size'] == 65
  assert list((workdir / 'tensorboard').glob('events.out.tfevents.*'))
  saved = sorted(p.name for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  assert saved == ['30', '60']


class Recorder:
  """The metrics writer and progress bar of a Logger under test: keeps the rows written."""

  def __init__(self):
    self.rows = []

  def write(self, step, row):
    self.rows.append({'step': step, **row})

  def set_postfix(self, *_, **__):
    pass


def stub_logger(log_every: int = 50) -> train.Logger:
  """A Logger of the base config and a model of 1 FLOP per token, writing to a Recorder."""
  config = train.config_lib.resolve(train.config_lib.get_base_config(), 65)
  config.train.log_every = log_every
  model_config = type('M', (), {'flops_per_token': lambda self, seq_len: 1.0})()
  program = type('P', (), {'model_config': model_config})()
  return train.Logger(config, program, Recorder(), Recorder(), 0)


def test_evaluation_reads_each_batch_before_sending_the_next():
  """train.evaluate keeps one evaluation step in flight (see its docstring: XLA:CPU can
  deadlock with several), and sums the steps' outputs on the host."""
  unread = set()

  class Output:   # an evaluation step's result, in flight until the host reads it
    def __init__(self, value):
      self.value = value
      unread.add(self)

    def __array__(self, dtype=None, copy=None):
      unread.discard(self)
      return np.asarray(self.value, dtype)

  def eval_step(params, batch):
    assert not unread, 'an earlier evaluation step is still in flight'
    tokens = float(batch['targets'].size)
    return Output(2.0 * tokens * params), Output(tokens), {'accuracy': Output(0.25 * tokens)}

  program = type('P', (), {'eval_step': staticmethod(eval_step),
                           'batch_sharding': jax.sharding.SingleDeviceSharding(jax.devices()[0])})
  batches = [{'inputs': np.zeros((2, n), np.int32), 'targets': np.zeros((2, n), np.int32)}
             for n in (3, 5, 8)]
  assert train.evaluate(program(), 1.5, batches, 2) == {'loss': 3.0, 'accuracy': 0.25}
  assert not unread


def test_nonfinite_streak_stops_the_run():
  logger = stub_logger()
  metrics = lambda streak: {'loss': np.nan, 'lr': 0.1, 'grad_norm': np.nan,
                            'skipped_steps': streak, 'nonfinite_streak': streak}
  limit = logger.config.optim.max_nonfinite_steps
  for step in range(1, limit + 1):
    logger.push(step, metrics(step))         # step n's metrics are checked at step n + 1
  with pytest.raises(train.NonFiniteError, match=f'{limit} updates in a row had non-finite'):
    logger.push(limit + 1, metrics(0))


def test_step_time_leaves_out_what_runs_between_steps(monkeypatch):
  """Steps of 1 s each, with a 100 s evaluation after step 10 (flushed first, as the
  training loop does): every logged interval is 1,000 ms per step."""
  clock = [0.0]
  monkeypatch.setattr(train.time, 'perf_counter', lambda: clock[0])
  logger, pause = stub_logger(log_every=10), 0.0
  metrics = {'loss': 1.0, 'lr': 0.1, 'grad_norm': 1.0, 'skipped_steps': 0, 'nonfinite_streak': 0}
  for step in range(1, 31):
    clock[0] = step - 1 + pause   # pushing step n fetches step n - 1's metrics, done by now
    logger.push(step, metrics)
    if step == 10:
      clock[0] = step + pause
      logger.flush()
      pause = 100.0
  clock[0] = 30 + pause
  logger.flush()
  assert [(row['step'], row['step_ms']) for row in logger.writer.rows] == [
      (10, 1000.0), (20, 1000.0), (30, 1000.0)]


def test_shakespeare_char_reaches_nanogpt_validation_loss(tmp_path, tfds_dir):
  """The full recipe of experiments/shakespeare_char.py (nanoGPT: 1.886 on this machine), as
  the README's main command runs it: on two CPU devices (config.mesh.cpu_devices)."""
  result = run_main(tmp_path / 'sc', f'--config.data.dir={tfds_dir}',
                    '--config.sample.num_tokens=0', devices=None, optimized=True)
  assert "mesh {'data': 2," in result.stdout
  val = [m['val_loss'] for m in read_metrics(tmp_path / 'sc') if 'val_loss' in m]
  assert len(val) == 8 and val[-1] <= 1.89, (val, result.stdout[-500:])


def test_cpu_devices_train_as_one_device_does(char_run, tmp_path, tfds_dir):
  """config.mesh.cpu_devices=2 (the CPU recipe's setting): the main command splits the CPU
  into two devices along the data axis, and trains as the one-device run does."""
  result = run_main(tmp_path / 'two', *CHAR_RUN_FLAGS, f'--config.data.dir={tfds_dir}',
                    config='experiments/shakespeare_char.py:smoke', devices=None)
  assert "mesh {'data': 2," in result.stdout
  one, two = read_metrics(char_run), read_metrics(tmp_path / 'two')
  assert [sorted(m) for m in two] == [sorted(m) for m in one]
  for name in ('loss', 'val_loss', 'test_loss'):
    np.testing.assert_allclose([m[name] for m in two if name in m],
                               [m[name] for m in one if name in m], rtol=1e-5)


def test_split_cpu_only_where_the_device_count_is_not_set():
  code = ('import os, jax; from lm import cli; cli.split_cpu(2); '
          'print(jax.device_count(), os.environ.get("PJRT_NPROC"))')
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'PJRT_NPROC')}
  devices_and_threads = lambda: subprocess.run(
      [sys.executable, '-c', code], capture_output=True, text=True, env=env, cwd=ROOT,
      check=True).stdout.split()
  assert devices_and_threads() == ['2', str(len(os.sched_getaffinity(0)) + 2)]
  env['XLA_FLAGS'] = xla_flags_with_cpu_devices(3)   # as launch.local sets it
  assert devices_and_threads() == ['3', 'None']


def test_llama_experiment_with_sentencepiece_end_to_end(tmp_path, tfds_dir):
  workdir = tmp_path / 'llama'
  # optimized: without LLVM's optimizations its matmuls (d 256, 128 tokens) ran 2.7 s a step
  # against 0.8 (98 s for the command against 58)
  result = run_main(workdir, f'--config.data.dir={tfds_dir}',
                    config='experiments/llama_tiny.py:smoke', optimized=True)
  assert (workdir / 'tokenizer.model').exists()            # trained here, saved for resume
  assert json.loads((workdir / 'config.json').read_text())['model']['vocab_size'] == 1024
  logged = [m['loss'] for m in read_metrics(workdir) if 'loss' in m]
  assert logged[-1] < logged[0] - 1.0, logged
  assert 'done: 30 steps' in result.stdout


@pytest.mark.parametrize('env, expected', [
    ({'JAX_COMPILATION_CACHE_DIR': '/x/cache'}, '/x/cache'),
    ({'XDG_CACHE_HOME': '/home/u/.c'}, '/home/u/.c/lm/jax'),
    ({'JAX_COMPILATION_CACHE_DIR': ''}, None),   # empty: no cache
])
def test_commands_use_a_persistent_compilation_cache(monkeypatch, env, expected):
  from lm import cli
  monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR', raising=False)
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  before = jax.config.jax_compilation_cache_dir
  jax.config.update('jax_compilation_cache_dir', None)
  try:
    cli.use_compilation_cache()
    assert jax.config.jax_compilation_cache_dir == expected
  finally:
    jax.config.update('jax_compilation_cache_dir', before)

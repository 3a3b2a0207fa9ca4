"""The training loop: train / eval / checkpoint from the start `lm.training.start` makes, the final
test and sample."""
import contextlib
import json
import math
import time

import jax
import ml_collections
import numpy as np
import tqdm
from etils import epath

from lm import config as config_lib
from lm.compress import prune
from lm.config import RunDir, objective_traits
from lm.inference import sampler as sample
from lm.parallel import distributed
from lm.training import checkpoint, steps
from lm.training import metrics as metrics_lib
from lm.training import rollouts as rl
from lm.training import start as start_lib


class NonFiniteError(RuntimeError):
  """Too many non-finite updates in a row."""


class Interrupted(Exception):
  """Ctrl-C during training: says at which step, and the checkpoint a rerun resumes from."""


def global_batch(program: steps.Program, local_batch: dict[str, np.ndarray], batch_size: int):
  """This process's rows -> one array of batch_size rows over all processes' devices."""
  if jax.process_count() == 1:   # the same result, without the multi-host bookkeeping
    return jax.device_put(local_batch, program.batch_sharding)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
      program.batch_sharding, x, (batch_size, *x.shape[1:])), local_batch)


def evaluate(program: steps.Program, params, batches, batch_size: int) -> dict[str, float]:
  """The objective's mean loss ('loss') and metrics (e.g. 'accuracy') over the batches.

  Each batch's sums come back to the host (float64) before the next batch is sent: with
  several evaluation steps and their additions in flight over many CPU devices, XLA:CPU
  (jaxlib 0.10.2) can deadlock in the steps' all-reduce and abort after 40 s."""
  sums = {}
  for batch in batches:
    total, count, metrics = program.eval_step(params, global_batch(program, batch, batch_size))
    for name, value in jax.device_get({'loss': total, 'count': count, **metrics}).items():
      sums[name] = sums.get(name, 0.0) + np.float64(value)
  count = sums.pop('count')
  return {k: float(v / count) for k, v in sums.items()}


class TextBatches:
  """The batch source of the objectives that learn from their data as read: each step the
  next global batch (RL's source is `rollouts.Rollouts`, with the same two methods)."""

  def __init__(self, config: ml_collections.ConfigDict, program: steps.Program, data):
    self.program, self.data, self.train = program, data, config.train

  def next_batch(self, state, step: int) -> tuple[dict, dict]:
    """(the batch of this step, host metrics to log beside the step's)."""
    del state, step   # the data iterator holds the position
    return global_batch(self.program, next(self.data.train), self.train.batch_size), {}

  def evaluate(self, params, split: str) -> dict[str, float]:
    return evaluate(self.program, params, self.data.eval[split], self.train.eval_batch_size)


class Logger:
  """Metrics of step n-1 are fetched after step n is dispatched, so the host never stalls
  the device; it checks them for non-finite streaks and writes every log_every steps."""

  def __init__(self, config, program, writer, bar, start_step: int):
    self.config, self.writer, self.bar = config, writer, bar
    self.tokens_per_step = config.train.batch_size * config.data.seq_len
    self.flops_per_token = program.model_config.flops_per_token(config.data.seq_len)
    self.pending = None
    self.interval_start = (start_step + 1, None)   # the first step also compiles: not timed

  def push(self, step: int, metrics) -> None:
    if self.pending is not None:
      self._handle(*self.pending)
    self.pending = (step, metrics)

  def flush(self) -> None:
    """Handles the pending step, before work that is not a step (an evaluation, a
    checkpoint): the clock restarts at the next step handled, so that work does not count in
    step_ms and tokens_per_s."""
    if self.pending is not None:
      self._handle(*self.pending)
      self.pending = None
    self.interval_start = (0, None)

  def _handle(self, step: int, device_metrics) -> None:
    m = jax.device_get(device_metrics)
    limit = self.config.optim.max_nonfinite_steps
    if m['nonfinite_streak'] >= limit:
      raise NonFiniteError(f'step {step}: {int(m["nonfinite_streak"])} updates in a row had '
                           f'non-finite gradients (config.optim.max_nonfinite_steps={limit}); '
                           'stopping. Lower the learning rate or check the data.')
    first, started = self.interval_start
    if started is None:
      self.interval_start = (step, time.perf_counter())
    if step % self.config.train.log_every:
      return
    row = {'loss': m['loss'], 'lr': m['lr'], 'grad_norm': m['grad_norm'],
           'skipped_steps': m['skipped_steps']}
    if objective_traits.of(self.config).perplexity:
      row['perplexity'] = math.exp(min(m['loss'], 50.0))
    row.update({k: v for k, v in m.items() if k not in row and k != 'nonfinite_streak'})
    now = time.perf_counter()
    if started is not None and step > first:
      row.update(metrics_lib.throughput(step - first, now - started, self.tokens_per_step,
                                        self.flops_per_token, jax.devices()))
      self.interval_start = (step, now)
    self.writer.write(step, row)
    self.bar.set_postfix(loss=f'{m["loss"]:.4f}', refresh=False)


def train(config: ml_collections.ConfigDict, workdir: str | epath.Path,
          peer_timeout: float = distributed.PEER_TIMEOUT_S) -> dict[str, float]:
  """Trains (resuming from the workdir's latest checkpoint) and returns the final metrics.
  In a run of several processes, each ends once another has been silent for `peer_timeout`
  seconds (`distributed.watch_peers`; 0: never)."""
  start_time = time.perf_counter()
  run_dir, is_main = RunDir(workdir), jax.process_index() == 0
  config = config_lib.with_architecture_of_init_from(config)
  config_lib.validate(config_lib.resolve(config, None), jax.device_count())  # before any I/O
  created = not run_dir.path.exists()   # before the checkpointer makes it
  ckpt = checkpoint.Checkpointer(run_dir.checkpoints, config.train.keep_checkpoints,
                                 config.train.async_checkpoints)
  start = _start(config, run_dir, ckpt, created)
  # watched from here: preparing the data (a tokenizer trained in C++ may hold the GIL for
  # minutes) could silence a process's beats without it being lost
  distributed.watch_peers(peer_timeout)
  config, data, program = start.config, start.data, start.program
  t, start_step = config.train, int(start.state.step)
  if start_step == t.steps and _finished(run_dir):
    ckpt.close()
    return _already_finished(run_dir, start_step)
  source = (rl.Rollouts if objective_traits.of(config).rollouts else TextBatches)(
      config, program, data)
  writer = metrics_lib.MetricsWriter(run_dir.path, start_step, enabled=is_main,
                                     total_steps=t.steps, started=start_time)
  bar = tqdm.tqdm(total=t.steps, initial=start_step, disable=not is_main, desc='train',
                  dynamic_ncols=True, mininterval=1.0)
  try:   # closed on any error too: tensorboardX's exit handler fails at shutdown on 3.12
    state, val = _steps(start, source, ckpt, writer, bar)
    bar.close()
    ckpt.wait()
    ckpt.close()
    test, seconds = _timed(_evaluate, source, state.params, 'test')
    val = val or _evaluate(source, state.params, 'validation')
    writer.write(t.steps, {**test, 'test_wall_s': seconds})
  except BaseException as e:
    bar.close()   # the error's line below the bar, not on it
    with contextlib.suppress(Exception):   # a full disk fails the close too: report the first
      writer.close()
    if isinstance(e, KeyboardInterrupt):   # in the final evaluation
      raise _interrupted(ckpt, t.steps) from None
    raise
  writer.close()
  return _finish(config, program, state.params, data.tokenizer, {**val, **test}, run_dir,
                 writer)


def _start(config: ml_collections.ConfigDict, run_dir: RunDir, ckpt: checkpoint.Checkpointer,
           created: bool) -> start_lib.Start:
  """`resume_or_start`; where that fails, Orbax's threads are stopped (they would print at
  exit) and the run directory, if this command `created` it and it holds no checkpoint, is
  removed."""
  try:
    return start_lib.resume_or_start(config, run_dir.path, ckpt)
  except BaseException:
    with contextlib.suppress(Exception):
      ckpt.close()
    if created and jax.process_index() == 0 and not run_dir.steps():
      run_dir.path.rmtree(missing_ok=True)
    raise


def _steps(start: start_lib.Start, source, ckpt: checkpoint.Checkpointer,
           writer: metrics_lib.MetricsWriter, bar: tqdm.tqdm) -> tuple[steps.TrainState, dict]:
  """The steps from the start's state to config.train.steps, with evaluations and checkpoints
  on their schedules: (the last state, the last validation metrics). Ctrl-C: Interrupted."""
  config, program, state = start.config, start.program, start.state
  t, first = config.train, int(start.state.step) + 1
  logger, val, step = Logger(config, program, writer, bar, first - 1), None, first - 1
  try:
    for step in range(first, t.steps + 1):
      batch, host_metrics = source.next_batch(state, step)
      state, step_metrics = program.train_step(state, batch)
      logger.push(step, {**step_metrics, **host_metrics})
      evaluates = step % t.eval_every == 0 or step == t.steps
      checkpoints = step % t.checkpoint_every == 0 or step == t.steps
      if evaluates or checkpoints:
        logger.flush()
      if evaluates:
        val, seconds = _timed(_evaluate, source, state.params, 'validation')
        writer.write(step, {**val, 'val_wall_s': seconds})
        if jax.process_index() == 0:
          bar.write(f'step {step}: ' + ', '.join(f'{k} {v:.4f}' for k, v in val.items()))
      if checkpoints:
        ckpt.save(step, state, start.data.train, start.record)
      bar.update()
    logger.flush()
  except KeyboardInterrupt:
    raise _interrupted(ckpt, step) from None
  return state, val


def _interrupted(ckpt: checkpoint.Checkpointer, step: int) -> Interrupted:
  """What Ctrl-C at `step` says: the step, and the checkpoint a rerun resumes from (a save in
  flight completes first: it is that one)."""
  with contextlib.suppress(Exception):
    ckpt.wait()
  saved = max(ckpt.manager.all_steps(), default='none')
  return Interrupted(f'interrupted at step {step}, last checkpoint {saved}: rerun the same '
                     'command to resume')


def _finished(run_dir: RunDir) -> bool:
  """Whether the run wrote final.json (process 0's answer: it alone writes the file)."""
  answer = run_dir.final.exists() if jax.process_index() == 0 else False
  return distributed.broadcast_text('yes' if answer else '') == 'yes'


def _already_finished(run_dir: RunDir, step: int) -> dict:
  """A rerun of a finished run: its final metrics as they were, nothing evaluated again."""
  final = json.loads(run_dir.final.read_text()) if jax.process_index() == 0 else {}
  if jax.process_index() == 0:
    print(f'the run finished at step {step} ({run_dir.final}); raise config.train.steps to '
          'train it further')
  return final


def _finish(config, program: steps.Program, params, tokenizer, scores: dict[str, float],
            run_dir: RunDir, writer: metrics_lib.MetricsWriter) -> dict:
  """The final metrics, written to final.json (which marks the run finished) after a sample
  from config.sample's prompt is printed; returned. Its wall_s sums the run's segments (each
  process that trained it, interrupted ones included), listed in `segments`."""
  text = _sample(config, program, params, tokenizer)   # every process takes part
  segments = writer.segments_now(config.train.steps)
  wall = round(sum(s['wall_s'] for s in segments), 3)
  final = {'steps': config.train.steps, **scores, 'wall_s': wall, 'segments': segments}
  if config.prune.method != 'none':
    final['sparsity'] = prune.sparsity(params, config.prune.targets)
  if jax.process_index() == 0:
    run_dir.final.write_text(json.dumps(final))
    if text is not None:
      print('sample:\n' + text)
    shown = ', '.join(f'{k} {v:.4f}' for k, v in scores.items())
    print(f'done: {config.train.steps} steps, {shown}, {wall:.1f}s wall, workdir {run_dir.path}')
  return final


def _timed(fn, *args):
  """(fn's result, its wall-clock seconds): how long an evaluation holds up training, for
  choosing eval_every and eval_batch_size (the first includes its compile)."""
  start = time.perf_counter()
  result = fn(*args)
  return result, round(time.perf_counter() - start, 3)


def _evaluate(source, params, split: str) -> dict[str, float]:
  """The batch source's metrics on a split, named like val_loss / test_accuracy."""
  prefix = {'validation': 'val', 'test': 'test'}[split]
  return {f'{prefix}_{k}': v for k, v in source.evaluate(params, split).items()}


def _sample(config, program: steps.Program, params, tokenizer) -> str | None:
  """A sample from the prompt of config.sample (None when num_tokens is 0)."""
  s = config.sample
  if s.num_tokens <= 0 or not config.model.causal:   # a bidirectional model does not sample
    return None
  settings = sample.Settings(s.num_tokens, s.temperature, s.top_k, s.top_p,
                             eos_id=tokenizer.eos_id)
  sampler = sample.Sampler(program.model_config, program.mesh, program.rules,
                           tokenizer.vocab_size)
  prompt = tokenizer.encode(s.prompt)
  new = sampler.extend(program.variables(params), prompt, jax.random.PRNGKey(config.train.seed),
                       settings)
  return s.prompt + sample.completion_text(tokenizer, new, len(new))

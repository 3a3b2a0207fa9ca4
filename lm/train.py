"""The training loop: data, init or resume, train / eval / checkpoint, final test and sample."""
import dataclasses
import functools
import json
import math
import os
import time

import jax
import ml_collections
import numpy as np
import tqdm
from etils import epath

from lm import checkpoint, sample, sharding, steps
from lm import config as config_lib
from lm import metrics as metrics_lib
from lm import model as model_lib
from lm.data import pipeline


class NonFiniteError(RuntimeError):
  """Too many non-finite updates in a row."""


def global_batch(program: steps.Program, local_batch: dict[str, np.ndarray], batch_size: int):
  """This process's rows -> one array of batch_size rows over all processes' devices."""
  if jax.process_count() == 1:   # the same result, without the multi-host bookkeeping
    return jax.device_put(local_batch, program.batch_sharding)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
      program.batch_sharding, x, (batch_size, *x.shape[1:])), local_batch)


def evaluate(program: steps.Program, params, batches, batch_size: int) -> float:
  """Mean token loss over the batches."""
  total, count = 0.0, 0.0
  for batch in batches:
    batch_total, batch_count = program.eval_step(params, global_batch(program, batch, batch_size))
    total, count = total + batch_total, count + batch_count
  return float(total / count)


def setup(config: ml_collections.ConfigDict, workdir: epath.Path | None,
          tokenizer_from: epath.Path | None = None):
  """Validated config (with the tokenizer's vocabulary), data and the program to compile."""
  device_count = jax.device_count()
  config_lib.validate(config_lib.resolve(config, None), device_count)  # before any slow work
  mesh = sharding.make_mesh(config_lib.mesh_shape(config, device_count))
  data = pipeline.make_data(config, workdir, functools.partial(sharding.process_rows, mesh),
                            tokenizer_from)
  config = config_lib.resolve(config, data.tokenizer.vocab_size)
  config_lib.validate(config, device_count)
  return config, data, steps.build(config, mesh)


def keep_schedule(config: ml_collections.ConfigDict, latest) -> tuple[ml_collections.ConfigDict,
                                                                      str]:
  """On resume, the learning-rate schedule the run started with: decay_steps derived from
  train.steps then does not move (and the learning rate jump) when train.steps is raised.
  Returns the config and a note for the resume message."""
  if latest is None or config.optim.decay_steps:
    return config, ''
  decay_steps = latest[1]['decay_steps']
  config = config.copy_and_resolve_references()
  config.optim.decay_steps = decay_steps
  if decay_steps == config.train.steps:
    return config, ''
  return config, (f'the learning-rate schedule is the one the run started with '
                  f'(config.optim.decay_steps={decay_steps}); set it to change the schedule')


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
    if self.pending is not None:
      self._handle(*self.pending)
      self.pending = None

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
    row = {'loss': m['loss'], 'perplexity': math.exp(min(m['loss'], 50.0)),
           'lr': m['lr'], 'grad_norm': m['grad_norm'], 'skipped_steps': m['skipped_steps']}
    now = time.perf_counter()
    if started is not None and step > first:
      row.update(metrics_lib.throughput(step - first, now - started, self.tokens_per_step,
                                        self.flops_per_token, jax.devices()))
      self.interval_start = (step, now)
    self.writer.write(step, row)
    self.bar.set_postfix(loss=f'{m["loss"]:.4f}', refresh=False)


def resume_or_start(config: ml_collections.ConfigDict, workdir: epath.Path,
                    ckpt: checkpoint.Checkpointer):
  """(config, data, program, state, run record): the state of the workdir's newest checkpoint,
  or a new one (from config.train.init_from's parameters when set); says which on stdout."""
  config, schedule_note = keep_schedule(config, ckpt.latest_run())
  t = config.train
  holds_run = bool(ckpt.manager.all_steps()) or bool(list(ckpt.directory.glob('*.corrupt*')))
  warm = checkpoint.warm_start_dirs(t.init_from) if t.init_from and not holds_run else None
  config, data, program = setup(config, workdir, tokenizer_from=warm[0] if warm else None)
  run = {'signature': checkpoint.signature(config, data.tokenizer.fingerprint,
                                           program.mesh.shape['stage']),
         'decay_steps': config.optim.decay_steps}
  state = ckpt.restore_latest(program.abstract_state, data.train, run, hint=(
      f'Use a new --workdir, or start a new run from this one with '
      f'--config.train.init_from={workdir}'))
  if state is None:
    state = program.init(jax.random.PRNGKey(t.seed))
    if warm:
      state = state.replace(params=checkpoint.load_params(
          warm[1], program.abstract_state.params, run, 'config.train.init_from'))
  start_step = int(state.step)
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2))
    counts = program.model_config.param_counts()
    if start_step and schedule_note:
      print(schedule_note)
    start = (f'resuming at step {start_step}' if start_step else
             f'starting from the parameters of {warm[1]}' if warm else 'starting')
    print(f'{start}: {counts["total"]:,} parameters ({counts["non_embedding"]:,} '
          f'non-embedding), vocabulary {config.model.vocab_size}, mesh {dict(program.mesh.shape)}')
  return config, data, program, state, run


def train(config: ml_collections.ConfigDict, workdir: str | epath.Path) -> dict[str, float]:
  """Trains (resuming from the workdir's latest checkpoint) and returns the final metrics."""
  start_time = time.perf_counter()
  workdir = epath.Path(workdir)
  if not workdir.is_absolute():   # Orbax needs absolute paths (gs:// ones are)
    workdir = epath.Path(os.path.abspath(workdir))
  is_main = jax.process_index() == 0
  config_lib.validate(config_lib.resolve(config, None), jax.device_count())  # before any I/O
  t = config.train
  ckpt = checkpoint.Checkpointer(workdir / 'checkpoints', t.keep_checkpoints,
                                 t.async_checkpoints)
  config, data, program, state, run = resume_or_start(config, workdir, ckpt)
  t, start_step = config.train, int(state.step)
  writer = metrics_lib.MetricsWriter(workdir, start_step, enabled=is_main)
  bar = tqdm.tqdm(total=t.steps, initial=start_step, disable=not is_main, desc='train',
                  dynamic_ncols=True, mininterval=1.0)
  logger = Logger(config, program, writer, bar, start_step)
  val_loss = None
  for step in range(start_step + 1, t.steps + 1):
    state, step_metrics = program.train_step(
        state, global_batch(program, next(data.train), t.batch_size))
    logger.push(step, step_metrics)
    if step % t.eval_every == 0 or step == t.steps:
      logger.flush()
      val_loss = evaluate(program, state.params, data.eval['validation'], t.eval_batch_size)
      writer.write(step, {'val_loss': val_loss})
      if is_main:
        bar.write(f'step {step}: val_loss {val_loss:.4f}')
    if step % t.checkpoint_every == 0 or step == t.steps:
      ckpt.save(step, state, data.train, run)
    bar.update()
  logger.flush()
  bar.close()
  ckpt.wait()
  ckpt.close()
  test_loss = evaluate(program, state.params, data.eval['test'], t.eval_batch_size)
  if val_loss is None:
    val_loss = evaluate(program, state.params, data.eval['validation'], t.eval_batch_size)
  writer.write(t.steps, {'test_loss': test_loss})
  writer.close()
  text = _sample(config, program, state.params, data.tokenizer)   # every process takes part
  wall = time.perf_counter() - start_time
  final = {'steps': t.steps, 'val_loss': val_loss, 'test_loss': test_loss, 'wall_s': wall}
  if is_main:
    (workdir / 'final.json').write_text(json.dumps(final))   # marks the run finished
    if text is not None:
      print('sample:\n' + text)
    print(f'done: {t.steps} steps, val_loss {val_loss:.4f}, test_loss {test_loss:.4f}, '
          f'{wall:.1f}s wall, workdir {workdir}')
  return final


def _sample(config, program: steps.Program, params, tokenizer) -> str | None:
  """A sample from the prompt of config.sample (None when num_tokens is 0)."""
  s = config.sample
  if s.num_tokens <= 0:
    return None
  prompt = tokenizer.encode(s.prompt)
  # one sequence at a time: the layer stack unpipelined (pipeline_microbatches=0)
  model = model_lib.Transformer(dataclasses.replace(program.model_config,
                                                    pipeline_microbatches=0))
  ids = sample.generate(model, params, prompt, s.num_tokens,
                        vocab_size=tokenizer.vocab_size, max_len=config.data.seq_len,
                        temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                        rng=jax.random.PRNGKey(config.train.seed),
                        out_sharding=sharding.replicated(program.mesh))
  return tokenizer.decode(ids)

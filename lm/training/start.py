"""How a training run begins: its data and program (`setup`), then its state, restored from the
newest checkpoint or new, with the frozen variables its objective reads (`resume_or_start`)."""
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

from lm import config as config_lib
from lm.compress import prune, quant
from lm.config import ConfigError, RunDir, objective_traits
from lm.data import pipeline, tokenizers
from lm.model import lora as peft
from lm.parallel import sharding
from lm.training import checkpoint, runs, steps


@dataclasses.dataclass(frozen=True)
class Setup:
  """A run made ready to step: its config (resolved with the tokenizer's vocabulary), data and
  compiled program."""
  config: ml_collections.ConfigDict
  data: Any
  program: steps.Program


def setup(config: ml_collections.ConfigDict, workdir: epath.Path | None,
          tokenizer_from: epath.Path | None = None, training: bool = True) -> Setup:
  """The data and the program of a config the caller validated before any I/O (with
  `config_lib.validate`); checked again here once the tokenizer's vocabulary is known
  (`training`: as validate's)."""
  device_count = jax.device_count()
  mesh = sharding.make_mesh(config_lib.mesh_shape(config, device_count))
  data = pipeline.make_data(config, workdir, functools.partial(sharding.process_rows, mesh),
                            tokenizer_from)
  config = config_lib.resolve(config, data.tokenizer.vocab_size)
  config_lib.validate(config, device_count, data.tokenizer.vocab_size, training)
  return Setup(config, data, steps.build(config, mesh))


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


@dataclasses.dataclass(frozen=True)
class Start(Setup):
  """A run at its first step here: `state` restored from the newest checkpoint or new, and
  `record`, what every checkpoint of the run carries (its signature, the schedule's length)."""
  state: steps.TrainState
  record: dict


def resume_or_start(config: ml_collections.ConfigDict, workdir: epath.Path,
                    ckpt: checkpoint.Checkpointer) -> Start:
  """The state of the workdir's newest checkpoint, or a new one (from config.train.init_from's
  parameters when set); says which on stdout."""
  config, schedule_note = keep_schedule(config, ckpt.latest_run())
  t = config.train
  holds_run = bool(ckpt.manager.all_steps()) or bool(list(ckpt.directory.glob('*.corrupt*')))
  # the run and step directory of a warm start (config.train.init_from), when one starts here
  warm_run, warm = (RunDir.locate(t.init_from, 'config.train.init_from')
                    if t.init_from and not holds_run else (None, None))
  ready = setup(config, workdir, tokenizer_from=warm_run and warm_run.path)
  config, data, program = ready.config, ready.data, ready.program
  run = {'signature': checkpoint.signature(config, data.tokenizer.fingerprint,
                                           program.mesh.shape['stage']),
         'decay_steps': config.optim.decay_steps}
  state = ckpt.restore_latest(program.abstract_state, data.train, run, hint=(
      f'Use a new --workdir, or start a new run from this one with '
      f'--config.train.init_from={workdir}'))
  if objective_traits.of(config).teacher:
    _check_teacher_tokenizer(config, data.tokenizer)
  program = program.with_frozen(_frozen(program, workdir, warm, run, t.seed,
                                        config.distill.teacher))
  if state is None:
    state = _new_state(config, program, warm, run)
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    RunDir(workdir).config.write_text(config.to_json_best_effort(indent=2))
    start_step = int(state.step)
    if start_step and schedule_note:
      print(schedule_note)
    set_aside = ''.join(f' (checkpoint {step} set aside as {name}: {why})'
                        for step, name, why in ckpt.set_aside)
    print(_summary(config, program, state, f'resuming at step {start_step}{set_aside}'
                   if start_step else f'starting from the parameters of {warm}' if warm
                   else 'starting'))
  return Start(config, data, program, state, run)


def _new_state(config: ml_collections.ConfigDict, program: steps.Program, warm, run: dict):
  """The train state of a run's first step: initialised, then given the warm start's
  parameters (config.train.init_from's step directory `warm`), the parameters LoRA trains
  beside its adapters, and the pruning the run starts with."""
  state = program.init(jax.random.PRNGKey(config.train.seed))
  if warm and not config.lora.rank:   # under LoRA the warm start is the frozen base
    # a scalar head (reward, value) new to this run keeps its fresh initialisation
    heads = {k: v for k, v in state.params.items() if k == 'score_head'}
    state = state.replace(params=checkpoint.load_params(
        warm, program.abstract_state.params, run, 'config.train.init_from', fresh=heads))
  if config.lora.train_also:   # trained beside the adapters, from the base's values
    state = state.replace(params={**state.params, peft.FULL: jax.tree.map(
        jnp.copy, peft.selected(program.frozen['base'], config.lora.train_also))})
  if config.prune.method != 'none':   # the run starts pruned (one-shot, or step 0's share)
    state = state.replace(params=program.in_mesh(jax.jit(
        lambda p: prune.prune(p, config.prune, config.train.steps)[0],
        out_shardings=program.state_sharding.params))(state.params))
  return state


def _summary(config: ml_collections.ConfigDict, program: steps.Program, state,
             start: str) -> str:
  """How the run starts (`start`), its size, vocabulary, mesh and objective, and what it
  trains."""
  counts = program.model_config.param_counts()
  return (f'{start}: {counts["total"]:,} parameters ({counts["non_embedding"]:,} '
          f'non-embedding), vocabulary {config.model.vocab_size}, mesh '
          f'{dict(program.mesh.shape)}, objective {config.train.objective}\n'
          + _trainable_summary(program, state))


def _frozen(program: steps.Program, workdir: epath.Path, warm, run: dict, seed: int,
            teacher: str) -> dict:
  """What the objective reads but never trains (LoRA base, reference, teacher): saved in the workdir
  when the run starts (from config.train.init_from's parameters, or a fresh init), so that a
  resume needs nothing outside the run directory."""
  if not program.abstract_frozen:
    return {}
  if RunDir(workdir).frozen.exists():
    return runs.load_frozen(workdir, program)
  frozen = program.init_frozen(jax.random.PRNGKey(seed))
  if warm:   # a QLoRA base is read in float and quantized
    for name in frozen.keys() - {'teacher'}:
      target = program.abstract_frozen[name]
      frozen[name] = jax.device_put(quant.quantize_like(checkpoint.load_params(
          warm, quant.float_target(target, program.model_config.param_dtype), run,
          'config.train.init_from'), target),
          jax.tree.map(lambda t: t.sharding, target))
  if 'teacher' in frozen:   # distillation: the teacher run's parameters, whatever its size
    _, step_dir = RunDir.locate(teacher, 'config.distill.teacher')
    frozen['teacher'] = checkpoint.load_params(
        step_dir, program.abstract_frozen['teacher'], {'signature': {'layer order': 'logical'}},
        'config.distill.teacher')
  runs.save_frozen(workdir, frozen)
  return frozen


def _check_teacher_tokenizer(config: ml_collections.ConfigDict, tokenizer) -> None:
  """A distillation teacher must read the student's tokens."""
  run = RunDir.locate(config.distill.teacher, 'config.distill.teacher')[0]
  teacher = tokenizers.load(run.tokenizer, config_lib.saved(run.path).data.tokenizer)
  if teacher.fingerprint != tokenizer.fingerprint:
    raise ConfigError(f'config.distill.teacher={config.distill.teacher!r} uses another tokenizer '
                      f'({teacher.kind} {teacher.fingerprint}) than the student '
                      f'({tokenizer.kind} {tokenizer.fingerprint})')


def _trainable_summary(program: steps.Program, state) -> str:
  """Trained parameters (of all, frozen included) and optimizer-state bytes; for QLoRA the
  stored size of the quantized base kernels."""
  trained, frozen = quant.param_count(state.params), quant.param_count(
      program.frozen.get('base', {}))
  opt_bytes = quant.stored_bytes(state.opt_state)
  out = (f'trainable parameters {trained:,} of {trained + frozen:,} '
         f'({100 * trained / (trained + frozen):.2f}%), optimizer state {opt_bytes:,} bytes')
  kernels = quant.kernels(program.frozen.get('base', {}))
  if kernels:
    stored = quant.stored_bytes(jax.eval_shape(quant.to_stored, kernels))
    bf16 = 2 * quant.param_count(kernels)
    out += (f', quantized base kernels {stored:,} bytes stored ({100 * stored / bf16:.1f}% of '
            f'their {bf16:,} bfloat16 bytes)')
  return out

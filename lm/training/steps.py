"""The train state and the jitted train / eval steps, with their shardings.

`build()` initialises by shape (`jax.eval_shape`), derives every sharding from the logical
axis names, and jits `init`, `train_step` and `eval_step` once with explicit in / out
shardings, the train state donated; nothing is ever built unsharded.
"""
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct
from jax.experimental.layout import Format, Layout

from lm import config as config_lib
from lm import objectives
from lm.compress import prune, quant
from lm.config import ConfigError, objective_traits
from lm.model import lora as peft
from lm.model import transformer as model_lib
from lm.parallel import sharding
from lm.training import optim


class TrainState(struct.PyTreeNode):
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array   # base key; step n uses fold_in(rng, n), so resuming replays the same RNG


def loss_and_grads(params, frozen: dict, batch, rng, objective: objectives.base.Objective,
                   accum_steps: int):
  """Mean loss, its gradients and mean metrics, summed over `accum_steps` microbatches in a
  scan; gradients only for `params` (what `frozen` holds gets none).

  Microbatch i takes rows i, i + k, ... so that each stays spread over the batch-sharded
  devices. Sums are divided once at the end, so the result equals one step on the batch."""
  def sums(p, mb, r):
    total, count, metrics = objective(p, frozen, mb, r, True)
    return total, (count, metrics)

  grad_fn = jax.value_and_grad(sums, has_aux=True)
  if accum_steps == 1:
    (total, (count, metrics)), grads = grad_fn(params, batch, rng)
  else:
    micro = jax.tree.map(lambda x: jnp.swapaxes(
        x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]), 0, 1), batch)
    micro = nn.with_logical_constraint(micro, (None, 'batch'))

    def add_microbatch(carry, inputs):
      out = grad_fn(params, inputs[0], jax.random.fold_in(rng, inputs[1]))
      return jax.tree.map(jnp.add, carry, out), None

    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(
        grad_fn, params, jax.tree.map(lambda x: x[0], micro), rng))
    ((total, (count, metrics)), grads), _ = jax.lax.scan(add_microbatch, zeros,
                                                         (micro, jnp.arange(accum_steps)))
  mean = lambda x: x / count
  return total / count, jax.tree.map(mean, grads), jax.tree.map(mean, metrics)


def train_step(state: TrainState, batch, frozen: dict, *, objective, tx, schedule, accum_steps):
  """One optimizer update; returns the new state and scalar metrics."""
  rng = jax.random.fold_in(state.rng, state.step)
  loss, grads, extra = loss_and_grads(state.params, frozen, batch, rng, objective, accum_steps)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # the schedule advances only on applied updates: skipped (non-finite) steps do not count
  applied_lr = schedule(state.step - state.opt_state.total_notfinite)
  metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads), 'lr': applied_lr,
             'skipped_steps': opt_state.total_notfinite,
             'nonfinite_streak': opt_state.notfinite_count, **extra}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, frozen: dict, batch, *, objective):
  """(loss sum, count, metric sums) of one batch, without dropout."""
  return objective(params, frozen, batch, None, False)


@dataclasses.dataclass(frozen=True)
class Program:
  """A model, objective and optimizer compiled for a mesh.

  `frozen` holds what the objective reads but never trains (see lm/objectives/): before
  stepping, take `with_frozen(...)` of it (from `init_frozen`, or loaded from a run)."""
  model: model_lib.Transformer
  model_config: model_lib.ModelConfig
  reference: model_lib.Transformer   # the frozen reference's model (no heads, no adapters)
  objective: objectives.base.Objective
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  mesh: jax.sharding.Mesh
  rules: tuple          # logical axis -> mesh axes
  state_sharding: TrainState
  batch_sharding: jax.sharding.NamedSharding
  abstract_state: TrainState   # shapes, dtypes and shardings: the restore target
  abstract_frozen: dict
  init: Callable[[jax.Array], TrainState]
  init_frozen: Callable[[jax.Array], dict]
  jitted_train_step: Callable
  jitted_eval_step: Callable
  frozen: dict = dataclasses.field(default_factory=dict)

  def with_frozen(self, frozen: dict) -> 'Program':
    return dataclasses.replace(self, frozen=frozen)

  def train_step(self, state: TrainState, batch) -> tuple[TrainState, dict]:
    return self.jitted_train_step(state, batch, self.frozen)

  def lower_train_step(self, state, batch, frozen):
    """The train step lowered for this program's mesh (arguments real or abstract)."""
    return self.in_mesh(self.jitted_train_step.__wrapped__.lower)(state, batch, frozen)

  def eval_step(self, params, batch):
    return self.jitted_eval_step(params, self.frozen, batch)

  def variables(self, params) -> dict:
    """Flax variables of the trained model, for sampling or scoring."""
    return objectives.base.policy_variables(params, self.frozen)

  def in_mesh(self, fn: Callable) -> Callable:
    """fn traced on this program's mesh with its logical-axis rules (for jitting more)."""
    return sharding.with_mesh(fn, self.mesh, self.rules)


def model_config_for(config: ml_collections.ConfigDict, stages: int) -> model_lib.ModelConfig:
  """The model of a resolved config: a scalar head for the reward model and PPO's value,
  LoRA adapters when config.lora.rank > 0."""
  return dataclasses.replace(
      model_lib.ModelConfig.from_config(config.model), pipeline_stages=stages,
      scalar_head=objective_traits.of(config).scalar_head, lora_rank=config.lora.rank,
      lora_alpha=peft.effective_alpha(config.lora), lora_targets=config.lora.targets,
      quant_scheme=config.quant.scheme, quant_group_size=config.quant.group_size,
      quant_targets=config.quant.targets)


def teacher_model(config: ml_collections.ConfigDict) -> model_lib.Transformer | None:
  """Distillation's teacher: the model of the run config.distill.teacher (else None)."""
  if not objective_traits.of(config).teacher:
    return None
  saved = config_lib.saved(config.distill.teacher)
  teacher = dataclasses.replace(model_lib.ModelConfig.from_config(saved.model),
                                pipeline_stages=1, pipeline_repeats=1, dropout=0.0)
  if saved.model.pipeline_repeats > 1:
    raise ConfigError(f'config.distill.teacher={config.distill.teacher!r} stores its layers in '
                      'circular-pipeline order: export it first (python -m lm.export)')
  if teacher.vocab_size != config.model.vocab_size:
    raise ConfigError(f'config.distill.teacher={config.distill.teacher!r} has a vocabulary of '
                      f'{teacher.vocab_size}, the student {config.model.vocab_size}')
  return model_lib.Transformer(teacher)


def _split(config, variables: dict) -> tuple[Any, dict]:
  """(trained parameters, frozen dict) of freshly initialised variables: under LoRA the
  adapters (and the parameters config.lora.train_also picks, which the frozen base keeps
  too: `objectives.base.policy_variables` lays the trained ones over it)."""
  lora = config.lora.rank > 0
  frozen = {'base': variables['params']} if lora else {}
  if objective_traits.of(config).reference and not lora:
    frozen['reference'] = {k: v for k, v in variables['params'].items() if k != 'score_head'}
  if lora and config.lora.train_also:
    return {peft.ADAPTERS: variables['lora'],
            peft.FULL: peft.selected(variables['params'], config.lora.train_also)}, frozen
  return (variables['lora'] if lora else variables['params']), frozen


def run_once_options(mesh: jax.sharding.Mesh) -> dict | None:
  """Compiler options of programs that run once (init). On XLA:CPU, LLVM at -O1 compiles
  them in half the time of its default -O3 (the CPU recipe's init: 2.4 against 4.8 s) and
  gives the same bits, where -O0 would move 4% of the initial weights by an ulp; left alone
  when JAX's cheap compiles (jax_disable_most_optimizations) are on."""
  if mesh.devices.flat[0].platform != 'cpu' or jax.config.read('jax_disable_most_optimizations'):
    return None
  return {'xla_backend_optimization_level': 1}


def build(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
          state_layout: Layout | None = None) -> Program:
  """The jitted init / train / eval functions for a resolved, validated config. `state_layout`
  (Layout.AUTO: the compiler's choice) lays out the train step's state; only for compiling it
  ahead of time (`benchmarks/state_layouts.py`): runs keep the default layouts."""
  model_config = model_config_for(config, mesh.shape['stage'])
  model = quant.transformer(model_config)
  reference = quant.transformer(dataclasses.replace(model_config, scalar_head=False,
                                                    lora_rank=0))
  teacher = teacher_model(config)
  objective = objectives.make(config, model, reference, teacher)
  tx, schedule = optim.make_optimizer(config.optim, prune.keep_pruned(
      config.prune, config.train.steps) if config.prune.method != 'none' else None,
      platform=mesh.devices.flat[0].platform,
      hidden_lr_multiplier=1 / model_config.mup_width_multiplier)
  rules = sharding.rules(config)
  in_mesh = lambda fn: sharding.with_mesh(fn, mesh, rules)
  init, init_frozen = _initializers(config, model, teacher, tx)
  boxed_params, boxed_frozen = in_mesh(jax.eval_shape)(
      functools.partial(_boxed, config, model, teacher))
  params_sharding = sharding.params_shardings(boxed_params, mesh, rules)
  frozen_sharding = sharding.params_shardings(boxed_frozen, mesh, rules)
  abstract_params = nn.unbox(boxed_params)
  replicated = sharding.replicated(mesh)
  state_sharding = TrainState(
      step=replicated, params=params_sharding, rng=replicated,
      opt_state=sharding.opt_state_shardings(tx, jax.eval_shape(tx.init, abstract_params),
                                             abstract_params, params_sharding, mesh))
  batch_sharding = sharding.batch_sharding(mesh)
  step_fn = functools.partial(train_step, objective=objective, tx=tx, schedule=schedule,
                              accum_steps=config.train.grad_accum_steps)
  step_state = state_sharding if state_layout is None else jax.tree.map(
      lambda s: Format(state_layout, s), state_sharding)
  once = run_once_options(mesh)
  return Program(
      model=model, model_config=model_config, reference=reference, objective=objective, tx=tx,
      schedule=schedule, mesh=mesh, rules=rules, state_sharding=state_sharding,
      batch_sharding=batch_sharding,
      abstract_state=_with_shardings(in_mesh(jax.eval_shape)(init, jax.random.PRNGKey(0)),
                                     state_sharding),
      abstract_frozen=_with_shardings(nn.unbox(boxed_frozen), frozen_sharding),
      init=in_mesh(jax.jit(init, out_shardings=state_sharding, compiler_options=once)),
      init_frozen=in_mesh(jax.jit(init_frozen, out_shardings=frozen_sharding,
                                  compiler_options=once)),
      jitted_train_step=in_mesh(jax.jit(
          step_fn, in_shardings=(step_state, batch_sharding, frozen_sharding),
          out_shardings=(step_state, replicated), donate_argnums=0)),
      jitted_eval_step=in_mesh(jax.jit(
          functools.partial(eval_step, objective=objective),
          in_shardings=(params_sharding, frozen_sharding, batch_sharding),
          out_shardings=replicated)))


def _init_variables(config: ml_collections.ConfigDict, model, rng) -> dict:
  return model.init(rng, jnp.zeros((1, config.data.seq_len), jnp.int32))


def _initializers(config: ml_collections.ConfigDict, model, teacher, tx):
  """(init: rng -> TrainState, init_frozen: rng -> the frozen dict), both unjitted."""
  def init(rng):
    params = _split(config, nn.unbox(_init_variables(config, model, rng)))[0]
    return TrainState(step=jnp.zeros([], jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.fold_in(rng, 1))

  def init_frozen(rng):   # the teacher's parameters are loaded from its run (lm/training/loop.py)
    frozen = _split(config, nn.unbox(_init_variables(config, model, rng)))[1]
    if teacher is not None:
      frozen['teacher'] = nn.unbox(teacher.init(rng, jnp.zeros((1, 1), jnp.int32))['params'])
    return frozen
  return init, init_frozen


def _boxed(config: ml_collections.ConfigDict, model, teacher) -> tuple[Any, dict]:
  """(trained, frozen) variables with their logical axes, traced by shape only (under
  jax.eval_shape); ConfigError where config.lora's patterns select nothing."""
  boxed = _init_variables(config, model, jax.random.PRNGKey(0))
  _check_lora_selects(config, boxed)
  params, frozen = _split(config, boxed)
  if teacher is not None:   # frozen, of its own size, sharded by the same rules
    frozen['teacher'] = teacher.init(jax.random.PRNGKey(0),
                                     jnp.zeros((1, config.data.seq_len), jnp.int32))['params']
  return params, frozen


def _check_lora_selects(config: ml_collections.ConfigDict, boxed: dict) -> None:
  params = nn.unbox(boxed['params'])
  paths = lambda: ['/'.join(str(k.key) for k in path)
                   for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  if config.lora.rank and 'lora' not in boxed:
    kernels = sorted({p.rpartition('/')[0] for p in paths() if p.endswith('/kernel')})
    raise ConfigError(f'config.lora.targets={config.lora.targets!r} matches no module; '
                      f'the Linear modules are: {", ".join(kernels)}')
  if config.lora.train_also and not peft.selected(params, config.lora.train_also):
    raise ConfigError(f'config.lora.train_also={config.lora.train_also!r} matches no parameter; '
                      f'they are: {", ".join(sorted(paths()))}')


def _with_shardings(tree, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree,
                      shardings)

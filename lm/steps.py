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

from lm import losses, optim, sharding
from lm import model as model_lib


class TrainState(struct.PyTreeNode):
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array   # base key; step n uses fold_in(rng, n), so resuming replays the same RNG


def loss_sums(params, batch, rng, model: nn.Module, train: bool):
  """(sum of token losses, number of tokens) for one batch of {inputs, targets[, weights]}."""
  logits = model.apply({'params': params}, batch['inputs'], train=train,
                       rngs={'dropout': rng} if train else {})
  return losses.cross_entropy(logits, batch['targets'], batch.get('weights'))


def loss_and_grads(params, batch, rng, model: nn.Module, accum_steps: int):
  """Mean token loss and its gradients, summed over `accum_steps` microbatches in a scan.

  Microbatch i takes rows i, i + k, ... so that each stays spread over the batch-sharded
  devices. Sums are divided once at the end, so the result equals one step on the batch."""
  grad_fn = jax.value_and_grad(
      lambda p, mb, r: loss_sums(p, mb, r, model, train=True), has_aux=True)
  if accum_steps == 1:
    (total, count), grads = grad_fn(params, batch, rng)
  else:
    micro = jax.tree.map(lambda x: jnp.swapaxes(
        x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]), 0, 1), batch)
    micro = nn.with_logical_constraint(micro, (None, 'batch'))

    def add_microbatch(carry, inputs):
      (loss, count), grads = grad_fn(params, inputs[0], jax.random.fold_in(rng, inputs[1]))
      return jax.tree.map(jnp.add, carry, ((loss, count), grads)), None

    zeros = ((jnp.zeros([]), jnp.zeros([])), jax.tree.map(jnp.zeros_like, params))
    ((total, count), grads), _ = jax.lax.scan(add_microbatch, zeros,
                                              (micro, jnp.arange(accum_steps)))
  return total / count, jax.tree.map(lambda g: g / count, grads)


def train_step(state: TrainState, batch, *, model, tx, schedule, accum_steps):
  """One optimizer update; returns the new state and scalar metrics."""
  rng = jax.random.fold_in(state.rng, state.step)
  loss, grads = loss_and_grads(state.params, batch, rng, model, accum_steps)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # the schedule advances only on applied updates: skipped (non-finite) steps do not count
  applied_lr = schedule(state.step - state.opt_state.total_notfinite)
  metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads), 'lr': applied_lr,
             'skipped_steps': opt_state.total_notfinite,
             'nonfinite_streak': opt_state.notfinite_count}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch, *, model):
  return loss_sums(params, batch, None, model, train=False)


@dataclasses.dataclass
class Program:
  """A model and optimizer compiled for a mesh."""
  model: model_lib.Transformer
  model_config: model_lib.ModelConfig
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  mesh: jax.sharding.Mesh
  rules: tuple          # logical axis -> mesh axes
  state_sharding: TrainState
  batch_sharding: jax.sharding.NamedSharding
  abstract_state: TrainState   # shapes, dtypes and shardings: the restore target
  init: Callable[[jax.Array], TrainState]
  train_step: Callable[[TrainState, Any], tuple[TrainState, dict]]
  eval_step: Callable[[Any, Any], tuple[jax.Array, jax.Array]]

  def in_mesh(self, fn: Callable) -> Callable:
    """fn traced on this program's mesh with its logical-axis rules (for jitting more)."""
    return _in_mesh(fn, self.mesh, self.rules)


def _in_mesh(fn, mesh, rules):
  """fn called (and so traced) with the mesh and logical-axis rules active, which
  nn.with_logical_constraint needs; `jax.set_mesh` may not be entered inside a jit."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return fn(*args, **kwargs)
  return wrapped


def build(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Program:
  """The jitted init / train / eval functions for a resolved, validated config."""
  model_config = dataclasses.replace(model_lib.ModelConfig.from_config(config.model),
                                     pipeline_stages=mesh.shape['stage'])
  model = model_lib.Transformer(model_config)
  tx, schedule = optim.make_optimizer(config.optim)
  rules = sharding.rules(config)

  def init_params(rng):
    return model.init(rng, jnp.zeros((1, config.data.seq_len), jnp.int32))['params']

  boxed = _in_mesh(jax.eval_shape, mesh, rules)(init_params, jax.random.PRNGKey(0))
  params_sharding = sharding.params_shardings(boxed, mesh, rules)
  abstract_params = nn.unbox(boxed)
  abstract_opt_state = jax.eval_shape(tx.init, abstract_params)
  replicated = sharding.replicated(mesh)
  state_sharding = TrainState(
      step=replicated, params=params_sharding, rng=replicated,
      opt_state=sharding.opt_state_shardings(tx, abstract_opt_state, abstract_params,
                                             params_sharding, mesh))

  def init(rng):
    params = nn.unbox(init_params(rng))
    return TrainState(step=jnp.zeros([], jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.fold_in(rng, 1))

  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      _in_mesh(jax.eval_shape, mesh, rules)(init, jax.random.PRNGKey(0)), state_sharding)
  batch_sharding = sharding.batch_sharding(mesh)
  step_fn = functools.partial(train_step, model=model, tx=tx, schedule=schedule,
                              accum_steps=config.train.grad_accum_steps)
  return Program(
      model=model, model_config=model_config, tx=tx, schedule=schedule, mesh=mesh, rules=rules,
      state_sharding=state_sharding, batch_sharding=batch_sharding, abstract_state=abstract_state,
      init=_in_mesh(jax.jit(init, out_shardings=state_sharding), mesh, rules),
      train_step=_in_mesh(jax.jit(step_fn, in_shardings=(state_sharding, batch_sharding),
                                  out_shardings=(state_sharding, replicated),
                                  donate_argnums=0), mesh, rules),
      eval_step=_in_mesh(jax.jit(functools.partial(eval_step, model=model),
                                 in_shardings=(params_sharding, batch_sharding),
                                 out_shardings=replicated), mesh, rules))

"""The optimizer, readable in one place: config -> schedule -> optax chain."""
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax


def make_schedule(o: ml_collections.ConfigDict) -> optax.Schedule:
  """Learning rate by step: linear warm-up from 0, then
  'cosine': cosine decay to min_lr at decay_steps, constant min_lr after;
  'wsd': warmup-stable-decay, constant lr until the last wsd_decay_fraction of decay_steps,
         then linear decay to min_lr;
  'constant': lr after warm-up."""
  warmup = optax.linear_schedule(0.0, o.lr, o.warmup_steps)
  if o.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, o.lr, o.warmup_steps, o.decay_steps, o.min_lr)
  if o.schedule == 'constant':
    return optax.join_schedules([warmup, optax.constant_schedule(o.lr)], [o.warmup_steps])
  if o.schedule == 'wsd':
    decay_start = max(o.warmup_steps, round(o.decay_steps * (1 - o.wsd_decay_fraction)))
    return optax.join_schedules(
        [warmup, optax.constant_schedule(o.lr),
         optax.linear_schedule(o.lr, o.min_lr, o.decay_steps - decay_start)],
        [o.warmup_steps, decay_start])
  raise ValueError(f'unknown schedule {o.schedule!r}')


def _parameter_name(path) -> str:
  """The last dict key of a parameter's path: a quantized kernel's leaves sit below it
  (lm/compress/quant.py), and stacked (scanned) layers have the names of unstacked ones."""
  return next(k.key for k in reversed(path) if isinstance(k, jax.tree_util.DictKey))


def is_hidden(path) -> bool:
  """A matmul kernel of the layers (u, v: a low-rank kernel's factors): the hidden, matrix-like
  weights of muP, as opposed to embeddings, the readout, norm scales and biases."""
  return _parameter_name(path) in ('kernel', 'u', 'v')


def weight_decay_mask(params, decay_embeddings: bool):
  """True for the parameters that get weight decay: matmul kernels, and embedding tables when
  decay_embeddings; never biases or norm scales."""
  def decays(path, _):
    if is_hidden(path):
      return True
    return decay_embeddings and _parameter_name(path) in ('embedding', 'pos_embed', 'head')
  return jax.tree_util.tree_map_with_path(decays, params)


def scale_hidden(multiplier: float) -> optax.GradientTransformation:
  """The updates of the hidden weights (`is_hidden`) multiplied by `multiplier`: after Adam,
  their learning rate (and, being decoupled, their weight decay) times it. muP's
  1 / width multiplier (lm.model.transformer.ModelConfig)."""
  return optax.stateless(lambda updates, params=None: jax.tree_util.tree_map_with_path(
      lambda path, u: u * multiplier if is_hidden(path) else u, updates))


def _optimizers(o, schedule, mask) -> dict[str, Callable[[], optax.GradientTransformation]]:
  # Adafactor adds its decay after the learning-rate scaling, so a constant rate would remove
  # that fraction of every weight per step: scale it by the schedule, as AdamW's is.
  adafactor_decay = (lambda count: o.weight_decay * schedule(count)) if o.weight_decay else None
  return {
      'adamw': lambda: optax.adamw(schedule, o.b1, o.b2, o.eps, weight_decay=o.weight_decay,
                                   mask=mask),
      'adam': lambda: optax.adam(schedule, o.b1, o.b2, o.eps),
      'lion': lambda: optax.lion(schedule, o.b1, o.b2, weight_decay=o.weight_decay, mask=mask),
      'adafactor': lambda: optax.adafactor(schedule, weight_decay_rate=adafactor_decay,
                                           weight_decay_mask=mask),
      'sgd': lambda: optax.chain(optax.add_decayed_weights(o.weight_decay, mask),
                                 optax.sgd(schedule, momentum=o.b1)),
  }


def make_optimizer(o: ml_collections.ConfigDict, last: optax.GradientTransformation | None = None,
                   platform: str | None = None, hidden_lr_multiplier: float = 1.0
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """clip -> optimizer (-> the hidden weights' updates times `hidden_lr_multiplier`, muP's
  1 / width multiplier) (-> `last`, e.g. pruning's masks), wrapped so that a non-finite
  gradient skips the update: by a branch or a select (`skip_nonfinite`), as
  config.optim.nonfinite_skip says; 'auto' branches when the step compiles for `platform`
  'cpu'.

  `skip_nonfinite` counts skipped updates in its state (optax.apply_if_finite's); the training
  loop stops the run after `max_nonfinite_steps` in a row (the wrapper itself would then apply
  them)."""
  schedule = make_schedule(o)
  mask = lambda params: weight_decay_mask(params, o.decay_embeddings)
  steps = [optax.clip_by_global_norm(o.clip_norm)] if o.clip_norm > 0 else []
  steps.append(_optimizers(o, schedule, mask)[o.name]())
  steps += [scale_hidden(hidden_lr_multiplier)] if hidden_lr_multiplier != 1 else []
  steps += [last] if last is not None else []
  branch = o.nonfinite_skip == 'branch' or (o.nonfinite_skip == 'auto' and platform == 'cpu')
  tx = skip_nonfinite(optax.chain(*steps), o.max_nonfinite_steps + 1, branch)
  return tx, schedule


def skip_nonfinite(inner: optax.GradientTransformation, max_consecutive_errors: int,
                   branch: bool = False) -> optax.GradientTransformationExtraArgs:
  """`optax.apply_if_finite`: the same state, and the same results except that a gradient
  whose global norm overflows its dtype (an element above about 1.8e19 in float32) also
  counts as non-finite. The test is the norm's, which the clip and the logged grad_norm
  compute anyway (XLA computes it once), instead of a reduction of every leaf.

  Which of the new and the old state to keep is chosen in one of two ways, each the faster on
  its compiler (config.optim.nonfinite_skip; 'auto' branches on CPU meshes only).
  branch=False: element by element (`jnp.where`). A `lax.cond`'s branches are separate
  computations, so XLA:TPU fuses neither the update into `apply_updates` nor their buffers
  into one: Llama-3-8B on a v5p-8 plans at 0.7853 s and 16.7 GB of temporaries per chip with
  the select, 0.8053 s and 19.3 GB with the cond (`python -m lm.plan --config
  experiments/llama3_8b_lm1b.py --topology v5p-8 --config.train.batch_size=8
  --config.model.remat=full --config.model.attention=xla_bf16 --sweep
  optim.nonfinite_skip=select,branch`). branch=True: `lax.cond`. XLA:CPU fuses each output
  on its own, so with the select each of the state's outputs recomputes the update from a copy
  of the old moments (126 copies a step on each device for the CPU recipe): its step takes
  4-10% longer than with the cond (`python benchmarks/throughput.py --config
  experiments/shakespeare_char.py --steps 2000 --compare optim.nonfinite_skip=select,branch`).
  """
  inner = optax.with_extra_args_support(inner)

  def update(updates, state, params=None, **extra_args):
    isfinite = jnp.isfinite(optax.tree.norm(updates))
    notfinite_count = jnp.where(isfinite, 0, optax.safe_increment(state.notfinite_count))
    apply = isfinite | (notfinite_count > max_consecutive_errors)
    step = lambda: inner.update(updates, state.inner_state, params, **extra_args)
    skip = lambda: (jax.tree.map(jnp.zeros_like, updates), state.inner_state)
    if branch:
      new_updates, inner_state = jax.lax.cond(apply, step, skip)
    else:
      new_updates, inner_state = jax.tree.map(lambda new, old: jnp.where(apply, new, old),
                                              step(), skip())
    return new_updates, optax.ApplyIfFiniteState(
        notfinite_count=notfinite_count, last_finite=isfinite,
        total_notfinite=jnp.where(isfinite, state.total_notfinite,
                                  optax.safe_increment(state.total_notfinite)),
        inner_state=inner_state)

  return optax.GradientTransformationExtraArgs(
      optax.apply_if_finite(inner, max_consecutive_errors).init, update)

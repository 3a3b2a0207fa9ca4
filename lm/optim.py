"""The optimizer, readable in one place: config -> schedule -> optax chain."""
from collections.abc import Callable

import jax
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


def weight_decay_mask(params, decay_embeddings: bool):
  """True for the parameters that get weight decay: matmul kernels, and embedding tables when
  decay_embeddings; never biases or norm scales. Decided by path, so stacked (scanned)
  layers are treated like unstacked ones."""
  def decays(path, _):
    # the last dict key: a quantized kernel's leaves sit below it (lm/quant.py)
    name = next(k.key for k in reversed(path) if isinstance(k, jax.tree_util.DictKey))
    if name in ('kernel', 'u', 'v'):   # u, v: a low-rank kernel's factors
      return True
    if name in ('embedding', 'pos_embed', 'head'):
      return decay_embeddings
    return False
  return jax.tree_util.tree_map_with_path(decays, params)


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


def make_optimizer(o: ml_collections.ConfigDict, last: optax.GradientTransformation | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """clip -> optimizer (-> `last`, e.g. pruning's masks), wrapped so that a non-finite
  gradient skips the update.

  `optax.apply_if_finite` counts skipped updates in its state; the training loop stops the
  run after `max_nonfinite_steps` in a row (apply_if_finite itself would then apply them)."""
  schedule = make_schedule(o)
  mask = lambda params: weight_decay_mask(params, o.decay_embeddings)
  steps = [optax.clip_by_global_norm(o.clip_norm)] if o.clip_norm > 0 else []
  steps.append(_optimizers(o, schedule, mask)[o.name]())
  steps += [last] if last is not None else []
  tx = optax.apply_if_finite(optax.chain(*steps), max_consecutive_errors=o.max_nonfinite_steps + 1)
  return tx, schedule

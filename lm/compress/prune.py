"""Pruning of a run's kernels during fine-tuning (config.prune): unstructured magnitude pruning
to a target sparsity, per layer or global, one-shot or on a gradual schedule (Zhu & Gupta
2017: s_t = s (1 - (1 - t / T)^3)), and N:M structured sparsity (e.g. 2:4: in every group of M
consecutive weights along a kernel's first input axis, the N largest stay).

An optax transform holds the masks: at a pruning step it recomputes them from the current
weights (the already pruned count first), and on every step it replaces the update of each
pruned weight by minus the weight, so pruned weights are exactly zero after every step
whatever the optimizer (momentum, weight decay) does. Counts are exact: ranks, not thresholds,
choose floor(sparsity * size) weights, ties included.
"""
import itertools
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax


class PruneState(NamedTuple):
  count: jax.Array   # updates so far
  masks: dict        # like the parameters: True where a weight is kept


def _targeted(path, targets: str) -> bool:
  names = '/'.join(str(getattr(k, 'key', k)) for k in path)
  return re.search(targets, names) is not None


def _stacked(path) -> bool:   # layers stacked by nn.scan: prune each layer on its own
  return jax.tree_util.DictKey('layers') in path


def sparsity_at(p: ml_collections.ConfigDict, step, total_steps: int):
  """The target sparsity after `step` updates (step 0: the run's start)."""
  if p.schedule == 'oneshot':
    return jnp.asarray(p.sparsity, jnp.float32)
  end = p.end_step or total_steps
  progress = jnp.clip((step - p.start_step) / max(end - p.start_step, 1), 0.0, 1.0)
  return p.sparsity * (1 - (1 - progress) ** 3)


def _keep_largest(scores, pruned_count):
  """True for all but the `pruned_count` lowest scores (exactly, ties broken by position)."""
  ranks = jnp.argsort(jnp.argsort(scores.ravel(), stable=True), stable=True)
  return (ranks >= pruned_count).reshape(scores.shape)


def _n_of_m(w, n: int, m: int):
  """Keeps the n largest |w| of each group of m along axis 0."""
  groups = jnp.abs(w.astype(jnp.float32)).reshape(w.shape[0] // m, m, -1)
  order = jnp.argsort(jnp.argsort(-groups, axis=1, stable=True), axis=1, stable=True)
  return (order < n).reshape(w.shape)


def masks(params, old_masks, p: ml_collections.ConfigDict, sparsity):
  """New masks: per kernel (and layer), or over all targeted kernels with p.scope 'global',
  the lowest-magnitude weights pruned up to `sparsity`, those already pruned counted first."""
  def scores(w, old):   # already pruned weights rank lowest
    return jnp.where(old, jnp.abs(w.astype(jnp.float32)), -1.0)

  def one(path, w, old):
    if not _targeted(path, p.targets):
      return old
    if p.method == 'nm':
      fn = lambda x, o: _n_of_m(x, p.n, p.m)
    else:
      fn = lambda x, o: _keep_largest(scores(x, o), jnp.floor(sparsity * x.size))
    return jax.vmap(fn)(w, old) if _stacked(path) else fn(w, old)

  if p.method != 'magnitude' or p.scope != 'global':
    return jax.tree_util.tree_map_with_path(one, params, old_masks)
  leaves = [(path, w, old) for (path, w), old in zip(
      jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(old_masks))
      if _targeted(path, p.targets)]
  flat = jnp.concatenate([scores(w, old).ravel() for _, w, old in leaves])
  kept = _keep_largest(flat, jnp.floor(sparsity * flat.size))
  offsets = [0, *itertools.accumulate(w.size for _, w, _ in leaves)]
  by_path = {jax.tree_util.keystr(path): kept[a:b].reshape(w.shape)
             for (path, w, _), a, b in zip(leaves, offsets, offsets[1:])}
  return jax.tree_util.tree_map_with_path(
      lambda path, w, old: by_path.get(jax.tree_util.keystr(path), old), params, old_masks)


def prune(params, p: ml_collections.ConfigDict, total_steps: int):
  """(pruned parameters, masks) at the run's start: the one-shot sparsity (or N:M), or the
  gradual schedule's value at step 0."""
  all_kept = jax.tree.map(lambda w: jnp.ones(w.shape, bool), params)
  kept = masks(params, all_kept, p, sparsity_at(p, 0, total_steps))
  return jax.tree.map(lambda w, k: jnp.where(k, w, jnp.zeros_like(w)), params, kept), kept


def keep_pruned(p: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """The optax transform (last in the chain): prunes on the schedule and keeps pruned
  weights at zero."""
  every = max(p.update_every, 1)

  def init(params):   # the first update computes the masks from the weights of the start
    return PruneState(jnp.zeros([], jnp.int32),
                      jax.tree.map(lambda w: jnp.ones(w.shape, bool), params))

  def update(updates, state, params):
    step = state.count + 1
    # the first update recomputes the masks from the weights the run started from (the
    # parameters of config.train.init_from, loaded after the optimizer state was made)
    due = (state.count == 0) | ((p.schedule == 'gradual') & (step % every == 0))
    kept = jax.lax.cond(due, lambda: masks(params, state.masks, p,
                                           sparsity_at(p, step, total_steps)),
                        lambda: state.masks)
    updates = jax.tree.map(lambda u, w, k: jnp.where(k, u, -w), updates, params, kept)
    return updates, PruneState(step, kept)

  return optax.GradientTransformation(init, update)


def sparsity(params, targets: str) -> float:
  """The fraction of zeros among the targeted kernels' weights."""
  leaves = [w for path, w in jax.tree_util.tree_flatten_with_path(params)[0]
            if _targeted(path, targets)]
  return float(sum(jnp.sum(w == 0) for w in leaves) / max(sum(w.size for w in leaves), 1))

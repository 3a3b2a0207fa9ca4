"""Losses, returned as (sum, weight) pairs so that microbatches and eval batches add exactly."""
import jax.numpy as jnp
import optax


def cross_entropy(logits_BxLxV, targets_BxL, weights_BxL=None):
  """Token-level cross-entropy in float32: (sum of weighted losses, sum of weights)."""
  losses_BxL = optax.softmax_cross_entropy_with_integer_labels(
      logits_BxLxV.astype(jnp.float32), targets_BxL)
  if weights_BxL is None:
    return losses_BxL.sum(), jnp.asarray(losses_BxL.size, jnp.float32)
  weights_BxL = weights_BxL.astype(jnp.float32)
  return (losses_BxL * weights_BxL).sum(), weights_BxL.sum()

"""Sampling filters on crafted distributions, against a NumPy statement of each rule."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import sample

PROBS = np.array([0.05, 0.5, 0.15, 0.3], np.float32)


def _kept(logits) -> set[int]:
  return set(np.flatnonzero(np.isfinite(np.asarray(logits))).tolist())


def test_top_k_keeps_exactly_the_k_largest():
  logits = jnp.array([1.0, 5.0, 3.0, 5.5, 2.0, 4.0, -1.0, 0.0])
  for k in range(1, 9):
    expected = set(np.argsort(-np.asarray(logits))[:k].tolist())
    filtered = sample.filter_logits(logits, 1.0, k, 1.0)
    assert _kept(filtered) == expected, k
    np.testing.assert_array_equal(np.asarray(filtered)[list(expected)],
                                  np.asarray(logits)[list(expected)])


@pytest.mark.parametrize('top_p', [0.3, 0.49, 0.51, 0.79, 0.81, 0.94, 0.96, 0.999])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p):
  """The nucleus: the most probable tokens, fewest first, until their mass reaches top_p
  (each value lies just below or above a boundary of the cumulative mass 0.5, 0.8, 0.95)."""
  order = np.argsort(-PROBS)
  size = int(np.searchsorted(np.cumsum(PROBS[order]), top_p) + 1)
  expected = set(order[:size].tolist())
  assert _kept(sample.filter_logits(jnp.log(PROBS), 1.0, 0, top_p)) == expected


def test_temperature_scales_and_near_zero_is_argmax():
  logits = jnp.log(PROBS)
  np.testing.assert_allclose(sample.filter_logits(logits, 0.5, 0, 1.0), 2 * logits, rtol=1e-6)
  cold = sample.filter_logits(logits, 1e-9, 0, 1.0)
  draws = jax.vmap(lambda key: jax.random.categorical(key, cold))(
      jax.random.split(jax.random.PRNGKey(0), 200))
  assert set(np.asarray(draws).tolist()) == {int(np.argmax(PROBS))}


class _FavoursPadding:
  """A stand-in model whose logits put almost all mass on the padded ids (>= 5) and, among
  real ids, prefer (last token + 1) % 5."""

  def apply(self, variables, window_1xL):
    onehot = jax.nn.one_hot((window_1xL + 1) % 5, 8) * 3.0
    return onehot + jnp.where(jnp.arange(8) >= 5, 50.0, 0.0)


def test_padded_vocabulary_ids_are_never_sampled_and_greedy_follows_argmax():
  for temperature, top_k, top_p in ((1.0, 0, 1.0), (2.0, 3, 0.9), (1e-9, 0, 1.0)):
    ids = sample.generate(_FavoursPadding(), None, np.array([0]), 40, vocab_size=5, max_len=8,
                          temperature=temperature, top_k=top_k, top_p=top_p,
                          rng=jax.random.PRNGKey(1))
    assert ids.max() < 5, ids
  # temperature -> 0: each token is the argmax among real ids, (previous + 1) % 5
  np.testing.assert_array_equal(ids, np.arange(41) % 5)

"""Autoregressive sampling with temperature, top-k and top-p (nucleus) filtering.

This version recomputes the context window at every token, which is all a 64-token
character model needs; a KV cache belongs with the post-training work.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np


def filter_logits(logits_V, temperature: float, top_k: int, top_p: float):
  """Logits with everything outside the top-k / top-p set at -inf, scaled by temperature."""
  logits_V = logits_V / max(temperature, 1e-6)
  if top_k:
    kth = jax.lax.top_k(logits_V, top_k)[0][..., -1:]
    logits_V = jnp.where(logits_V < kth, -jnp.inf, logits_V)
  if top_p < 1.0:
    sorted_V = jnp.sort(logits_V, axis=-1)[..., ::-1]
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_V, axis=-1), axis=-1)
    # the smallest logit still needed to reach top_p of the probability mass
    cutoff = jnp.take_along_axis(sorted_V, (cumulative < top_p).sum(-1, keepdims=True), axis=-1)
    logits_V = jnp.where(logits_V < cutoff, -jnp.inf, logits_V)
  return logits_V


def generate(model, params, prompt_ids: np.ndarray, num_tokens: int, *, vocab_size: int,
             max_len: int, temperature: float, top_k: int, top_p: float,
             rng: jax.Array, out_sharding=None) -> np.ndarray:
  """prompt_ids followed by num_tokens sampled ids (never a padding id >= vocab_size).

  With parameters sharded over several processes every process must call this alike;
  `out_sharding` (replicated over the parameters' mesh) gives each the token."""

  @functools.partial(jax.jit, out_shardings=out_sharding)
  def next_token(params, window_1xL, last, rng):
    logits_V = model.apply({'params': params}, window_1xL)[0, last]
    logits_V = jnp.where(jnp.arange(logits_V.shape[-1]) < vocab_size, logits_V, -jnp.inf)
    return jax.random.categorical(rng, filter_logits(logits_V, temperature, top_k, top_p))

  ids = list(np.asarray(prompt_ids).tolist()) or [0]
  window = np.zeros((1, max_len), np.int32)
  for i in range(num_tokens):
    context = ids[-max_len:]
    window[0, :len(context)] = context
    token = next_token(params, window, np.int32(len(context) - 1), jax.random.fold_in(rng, i))
    ids.append(int(token))
  return np.asarray(ids, np.int32)

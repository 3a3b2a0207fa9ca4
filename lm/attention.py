"""Attention kernels: jax.nn.dot_product_attention ('xla', 'cudnn') and a plain reference.

Shapes: B batch, L query length, M key length, H query heads, K key/value heads
(H % K == 0, grouped-query attention), G = H // K, Dh head dimension.
"""
import jax
import jax.numpy as jnp


def window_mask(query_index_L, key_index_M, window: int):
  """L x M: which keys lie among the `window` positions up to each query (itself included).
  Indices within one sequence; with segment ids masking the rest, that is positions."""
  offset_LxM = query_index_L[:, None] - key_index_M[None, :]
  return (offset_LxM >= 0) & (offset_LxM < window)


def reference_attention(q_BxLxHxDh, k_BxMxKxDh, v_BxMxKxDh, causal: bool, mask_BxLxM=None,
                        window: int | None = None):
  """Softmax(q k^T / sqrt(Dh)) v written out with einsums: the test oracle, and on CPU the
  fastest choice for short contexts (fewer, larger ops than jax.nn.dot_product_attention's
  grouped 5-D layout, whose softmax backward is slow there)."""
  B, L, H, Dh = q_BxLxHxDh.shape
  M, K = k_BxMxKxDh.shape[1], k_BxMxKxDh.shape[2]
  if K != H:   # grouped-query attention: every key / value head serves H // K query heads
    k_BxMxKxDh = jnp.repeat(k_BxMxKxDh, H // K, axis=2)
    v_BxMxKxDh = jnp.repeat(v_BxMxKxDh, H // K, axis=2)
  scores_BxHxLxM = jnp.einsum('blhd,bmhd->bhlm', q_BxLxHxDh, k_BxMxKxDh,
                              preferred_element_type=jnp.float32) * Dh ** -0.5
  if mask_BxLxM is not None:
    scores_BxHxLxM = jnp.where(mask_BxLxM[:, None], scores_BxHxLxM, jnp.finfo(jnp.float32).min)
  elif causal:   # query i (of the last L positions) sees keys 0 .. M - L + i
    visible_LxM = (window_mask(jnp.arange(M - L, M), jnp.arange(M), window) if window else
                   jnp.tril(jnp.ones((L, M), bool), k=M - L))
    scores_BxHxLxM = jnp.where(visible_LxM, scores_BxHxLxM, jnp.finfo(jnp.float32).min)
  probs_BxHxLxM = jax.nn.softmax(scores_BxHxLxM, axis=-1).astype(v_BxMxKxDh.dtype)
  return jnp.einsum('bhlm,bmhd->blhd', probs_BxHxLxM, v_BxMxKxDh)


def attention(q_BxLxHxDh, k_BxMxKxDh, v_BxMxKxDh, *, causal: bool, implementation: str,
              mask=None, window: int | None = None):
  """Multi-head / grouped-query attention by the named implementation. `mask` (B x L x M,
  True where a query may see a key) replaces the causal rule when given (packed segments,
  cached decoding; it must then include the window); cuDNN then falls back to the XLA
  kernel. `window` (causal only): each query sees its last `window` positions (sliding-window
  attention)."""
  if implementation == 'reference':
    return reference_attention(q_BxLxHxDh, k_BxMxKxDh, v_BxMxKxDh, causal, mask,
                               window if mask is None else None)
  if mask is not None:
    return jax.nn.dot_product_attention(q_BxLxHxDh, k_BxMxKxDh, v_BxMxKxDh,
                                        mask=mask[:, None], implementation='xla')
  return jax.nn.dot_product_attention(q_BxLxHxDh, k_BxMxKxDh, v_BxMxKxDh, is_causal=causal,
                                      local_window_size=(window - 1, 0) if window else None,
                                      implementation=implementation)

"""Attention kernels: jax.nn.dot_product_attention ('xla', 'cudnn') and a plain reference.

Shapes: B batch, L query length, M key length, H query heads, K key/value heads
(H % K == 0, grouped-query attention), G = H // K, Dh head dimension.
"""
import jax
import jax.numpy as jnp


def reference_attention(q_BxLxHxDh, k_BxMxKxDh, v_BxMxKxDh, causal: bool):
  """Softmax(q k^T / sqrt(Dh)) v written out with einsums, in float32; the test oracle."""
  B, L, H, Dh = q_BxLxHxDh.shape
  K = k_BxMxKxDh.shape[2]
  q_BxLxKxGxDh = q_BxLxHxDh.reshape(B, L, K, H // K, Dh).astype(jnp.float32)
  scores_BxKxGxLxM = jnp.einsum('blkgd,bmkd->bkglm', q_BxLxKxGxDh,
                                k_BxMxKxDh.astype(jnp.float32)) / jnp.sqrt(Dh)
  if causal:
    M = k_BxMxKxDh.shape[1]
    mask_LxM = jnp.tril(jnp.ones((L, M), bool), k=M - L)
    scores_BxKxGxLxM = jnp.where(mask_LxM, scores_BxKxGxLxM, -jnp.inf)
  probs = jax.nn.softmax(scores_BxKxGxLxM, axis=-1)
  out_BxLxKxGxDh = jnp.einsum('bkglm,bmkd->blkgd', probs, v_BxMxKxDh.astype(jnp.float32))
  return out_BxLxKxGxDh.reshape(B, L, H, Dh).astype(q_BxLxHxDh.dtype)


def attention(q_BxLxHxDh, k_BxMxKxDh, v_BxMxKxDh, *, causal: bool, implementation: str):
  """Multi-head / grouped-query attention by the named implementation."""
  if implementation == 'reference':
    return reference_attention(q_BxLxHxDh, k_BxMxKxDh, v_BxMxKxDh, causal)
  return jax.nn.dot_product_attention(q_BxLxHxDh, k_BxMxKxDh, v_BxMxKxDh, is_causal=causal,
                                      implementation=implementation)

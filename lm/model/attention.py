"""Attention kernels: jax.nn.dot_product_attention ('xla', 'cudnn'), the same in the compute
dtype ('xla_bf16'), Pallas splash attention ('splash': tokamax's TPU kernel; on
other backends in Pallas interpret mode, for tests) and a plain reference.

Shapes: B batch, L query length, M key length, H query heads, K key/value heads
(H % K == 0, grouped-query attention), G = H // K, Dh head dimension.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

# checkpoint name of what remat='save_attention' keeps: q, k, v (lm.model) and splash's output
# and log-sum-exp
ATTENTION_RESIDUALS = 'attention_residuals'


def window_mask(query_index_L, key_index_M, window: int):
  """L x M: which keys lie among the `window` positions up to each query (itself included).
  Indices within one sequence; with segment ids masking the rest, that is positions."""
  offset_LxM = query_index_L[:, None] - key_index_M[None, :]
  return (offset_LxM >= 0) & (offset_LxM < window)


def _visible(L: int, M: int, causal: bool, mask_BxLxM, window: int | None):
  """Which keys each query sees: the given B x L x M mask, else L x M (causal: query i of the
  last L positions sees keys 0 .. M - L + i, or its last `window`), else None (all)."""
  if mask_BxLxM is not None:
    return mask_BxLxM
  if causal:
    return (window_mask(jnp.arange(M - L, M), jnp.arange(M), window) if window else
            jnp.tril(jnp.ones((L, M), bool), k=M - L))
  return None


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
  visible = _visible(L, M, causal, mask_BxLxM, window)
  if visible is not None:
    visible = visible[:, None] if visible.ndim == 3 else visible
    scores_BxHxLxM = jnp.where(visible, scores_BxHxLxM, jnp.finfo(jnp.float32).min)
  probs_BxHxLxM = jax.nn.softmax(scores_BxHxLxM, axis=-1).astype(v_BxMxKxDh.dtype)
  return jnp.einsum('bhlm,bmhd->blhd', probs_BxHxLxM, v_BxMxKxDh)


def compute_dtype_attention(q_BxLxHxDh, k_BxMxKxDh, v_BxMxKxDh, causal: bool, mask_BxLxM=None,
                            window: int | None = None):
  """Attention with the L x M scores and their exponentials in q's dtype (bf16 in the TPU
  recipes; MaxText's `dot_product` default) where jax.nn.dot_product_attention keeps them in
  float32, and the softmax normalised after the value product (one division of B x L x H x
  Dh, not of B x H x L x M). The row maxima are exact in any dtype; the row sums are
  float32, and the matrix units accumulate in float32 whatever their output dtype.
  Grouped-query heads share keys without copying them. Halves the bytes of the L x M arrays,
  which dominate the attention's memory traffic without a fused kernel (README: estimated
  MFU of the v5p plans)."""
  B, L, H, Dh = q_BxLxHxDh.shape
  M, K = k_BxMxKxDh.shape[1], k_BxMxKxDh.shape[2]
  q_BxLxKxGxDh = (q_BxLxHxDh * jnp.asarray(Dh ** -0.5, q_BxLxHxDh.dtype)).reshape(
      B, L, K, H // K, Dh)
  scores_BxKxGxLxM = jnp.einsum('blkgd,bmkd->bkglm', q_BxLxKxGxDh, k_BxMxKxDh)
  visible = _visible(L, M, causal, mask_BxLxM, window)
  if visible is not None:
    visible = visible[:, None, None] if visible.ndim == 3 else visible
    scores_BxKxGxLxM = jnp.where(visible, scores_BxKxGxLxM,
                                 jnp.finfo(scores_BxKxGxLxM.dtype).min)
  # softmax is unchanged by the shift, so its gradient needs none through the maxima
  maxima = jax.lax.stop_gradient(scores_BxKxGxLxM.max(axis=-1, keepdims=True))
  exps_BxKxGxLxM = jnp.exp(scores_BxKxGxLxM - maxima)
  sums_BxKxGxL = exps_BxKxGxLxM.sum(axis=-1, dtype=jnp.float32)
  # in q's dtype too: a float32 product would make the backward's L x M product float32
  out_BxLxKxGxDh = jnp.einsum('bkglm,bmkd->blkgd', exps_BxKxGxLxM, v_BxMxKxDh)
  out_BxLxKxGxDh = out_BxLxKxGxDh / jnp.moveaxis(sums_BxKxGxL, -1, 1)[..., None]
  return out_BxLxKxGxDh.astype(q_BxLxHxDh.dtype).reshape(B, L, H, Dh)


def splash_attention(q_BxLxHxDh, k_BxMxKxDh, v_BxMxKxDh, causal: bool, window: int | None):
  """Splash attention (block-sparse flash attention in Pallas) with a causal or local mask.
  Grouped-query heads share their key / value head inside the kernel (query head h reads key
  head h // G, as jnp.repeat would lay them out), unless the heads are split over more shards
  than there are key heads: then keys / values are repeated. Under a mesh it runs per shard
  through shard_map, batch and heads split as the activations' logical axes say; block sizes
  are 512 or the whole sequence when shorter (lengths must then be multiples of 128 on TPU)."""
  # tokamax's splash rather than jax.experimental's: its kernels carry a cost estimate, so
  # XLA's cost model (and `lm.plan`'s step estimate, read from it) sees their time, and its
  # backward is one fused kernel. Imported here: tokamax's package imports
  # its benchmarking and autotuning too (a second). It exports splash under _src only
  # (MaxText's use_tokamax_splash imports it from there too).
  from tokamax._src.ops.experimental.tpu.splash_attention import splash_attention_kernel as splash
  from tokamax._src.ops.experimental.tpu.splash_attention import splash_attention_mask as mask
  B, L, H, Dh = q_BxLxHxDh.shape
  M, K = k_BxMxKxDh.shape[1], k_BxMxKxDh.shape[2]
  mesh = jax.sharding.get_abstract_mesh()
  shards = lambda axes: 1 if mesh.empty or axes is None else math.prod(
      mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
  # the activations' batch and head axes, where they divide (not e.g. init's batch of one)
  spec = [axes if axes is not None and size % shards(axes) == 0 else None for axes, size in
          zip(nn.logical_to_mesh_axes(('batch', None, 'act_heads', None)), (B, L, H, Dh))]
  heads = shards(spec[2])
  if K % heads:   # config.validate keeps n_kv_heads divisible by 'tensor'; other rules may not
    k_BxMxKxDh = jnp.repeat(k_BxMxKxDh, H // K, axis=2)
    v_BxMxKxDh = jnp.repeat(v_BxMxKxDh, H // K, axis=2)
  if causal:
    one = (mask.LocalMask((L, M), (window - 1, 0), offset=M - L) if window else
           mask.CausalMask((L, M), offset=M - L))
  else:
    one = mask.FullMask((L, M))
  bq, bkv = min(512, L), min(512, M)
  kernel = splash.make_splash_mha(one, q_seq_shards=1, config=splash.SplashConfig(
      block_q=bq, block_kv=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
      residual_checkpoint_name=ATTENTION_RESIDUALS, interpret=_platform(mesh) != 'tpu'))

  def per_shard(q, k, v):   # [b, L, h, Dh]: the kernel takes one example's [h, L, Dh]
    to_heads_first = lambda x: jnp.swapaxes(x, 1, 2)
    out = jax.vmap(kernel)(to_heads_first(q * Dh ** -0.5), to_heads_first(k), to_heads_first(v))
    return to_heads_first(out)

  if mesh.empty:
    return per_shard(q_BxLxHxDh, k_BxMxKxDh, v_BxMxKxDh)
  spec = P(*spec)
  return jax.shard_map(per_shard, in_specs=(spec, spec, spec), out_specs=spec,
                       check_vma=False)(q_BxLxHxDh, k_BxMxKxDh, v_BxMxKxDh)


def _platform(mesh) -> str:
  """The platform the program is compiled for: the mesh's devices (TPU chips of a topology
  when compiling ahead of time on a CPU machine), else the default backend."""
  device = None if mesh.empty else mesh.abstract_device
  return device.platform if device is not None else jax.default_backend()


def attention(q_BxLxHxDh, k_BxMxKxDh, v_BxMxKxDh, *, causal: bool, implementation: str,
              mask=None, window: int | None = None):
  """Multi-head / grouped-query attention by the named implementation. `mask` (B x L x M,
  True where a query may see a key) replaces the causal rule when given (packed segments,
  cached decoding; it must then include the window); cuDNN and splash then fall back to the
  XLA kernel. `window` (causal only): each query sees its last `window` positions (sliding-window
  attention)."""
  if implementation in ('reference', 'xla_bf16'):
    kernel = reference_attention if implementation == 'reference' else compute_dtype_attention
    return kernel(q_BxLxHxDh, k_BxMxKxDh, v_BxMxKxDh, causal, mask,
                  window if mask is None else None)
  if mask is not None:
    return jax.nn.dot_product_attention(q_BxLxHxDh, k_BxMxKxDh, v_BxMxKxDh,
                                        mask=mask[:, None], implementation='xla')
  if implementation == 'splash':
    return splash_attention(q_BxLxHxDh, k_BxMxKxDh, v_BxMxKxDh, causal, window)
  return jax.nn.dot_product_attention(q_BxLxHxDh, k_BxMxKxDh, v_BxMxKxDh, is_causal=causal,
                                      local_window_size=(window - 1, 0) if window else None,
                                      implementation=implementation)

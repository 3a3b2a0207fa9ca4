"""LoRA adapters (held in the 'lora' collection by `lm.model.Linear`) folded into the base
kernels: W + a @ b * alpha / rank, a plain model with the adapted weights."""
import math
import re

import jax.numpy as jnp


def effective_alpha(lora) -> float:
  """config.lora's alpha as `lm.model.Linear` takes it (the update scaled by alpha / rank):
  with rslora, alpha * sqrt(rank), so that the scale is alpha / sqrt(rank) (rsLoRA, as PEFT's
  use_rslora), which keeps the update's size from shrinking as the rank grows."""
  return lora.alpha * math.sqrt(lora.rank) if lora.rslora else lora.alpha


def merge_lora(params: dict, lora: dict, alpha: float, rank: int) -> dict:
  """`params` with every adapted kernel replaced by its merged value; the adapters' tree
  mirrors the parameters' module paths."""
  merged = dict(params)
  for name, adapter in lora.items():
    if set(adapter) == {'a', 'b'}:
      merged[name] = {**params[name], 'kernel': _merged_kernel(
          params[name]['kernel'], adapter['a'], adapter['b'], alpha / rank)}
    else:
      merged[name] = merge_lora(params[name], adapter, alpha, rank)
  return merged


def _merged_kernel(kernel, a, b, scale: float):
  """kernel [*lead, *in, *out] + a [*lead, *in, r] @ b [*lead, r, *out] * scale, where
  *lead are stacked layers (nn.scan)."""
  lead = a.ndim + b.ndim - 2 - kernel.ndim
  in_shape, out_shape = a.shape[lead:-1], b.shape[lead + 1:]
  a_IxR = a.reshape(*a.shape[:lead], -1, a.shape[-1])
  b_RxO = b.reshape(*b.shape[:lead + 1], -1)
  delta = jnp.matmul(a_IxR.astype(jnp.float32), b_RxO.astype(jnp.float32)) * scale
  return (kernel.astype(jnp.float32) + delta.reshape(*kernel.shape[:lead], *in_shape,
                                                     *out_shape)).astype(kernel.dtype)


# Under LoRA with config.lora.train_also, the trained parameters are {ADAPTERS: the 'lora'
# collection, FULL: the parameters trained in full}; a plain LoRA run trains the collection
# itself (whose top level holds module names, never these keys).
ADAPTERS, FULL = 'adapters', 'full'


def selected(params: dict, pattern: str, prefix: str = '') -> dict:
  """The sub-tree of the parameters whose path ('embed/embedding', 'head', ...) `pattern`
  is found in."""
  out = {}
  for key, value in params.items():
    path = f'{prefix}{key}'
    if isinstance(value, dict):
      picked = selected(value, pattern, f'{path}/')
      if picked:
        out[key] = picked
    elif re.search(pattern, path):
      out[key] = value
  return out


def overlaid(base: dict, top: dict) -> dict:
  """`base` with the leaves of `top` (a sub-tree of it) in their places."""
  return {k: (overlaid(v, top[k]) if isinstance(v, dict) else top[k]) if k in top else v
          for k, v in base.items()}

"""The one dense layer of the model: a kernel of any number of input and output axes with
logical axis names, optionally low rank (u @ v) and optionally with LoRA adapters."""
import math
import re

import flax.linen as nn
import jax


class Linear(nn.Module):
  """x[..., *in] @ kernel[*in, *out] (+ bias), with logical axes.

  With `lora_rank` > 0 and a path that `lora_targets` matches, it adds the low-rank update
  x @ a @ b * alpha / rank (Hu et al. 2021), a random and b zero at init, held in the 'lora'
  collection so that the base parameters stay a separate, frozen tree. Once initialised an
  adapter is used wherever its variables are given, whatever the module path (the pipeline
  applies the layer stack as a root module). With `lowrank_rank` > 0 and a path that
  `lowrank_targets` matches, the kernel itself is factored: x @ u @ v (u [*in, r], v [r, *out];
  `python -m lm.lowrank` fills them from a trained kernel's truncated SVD)."""
  out_shape: tuple[int, ...]
  axes: tuple[str | None, ...]   # logical names of the kernel's in and out dimensions
  n_in: int = 1                  # how many trailing dimensions of x are contracted
  use_bias: bool = True
  std: float = 0.02
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  lora_rank: int = 0
  lora_alpha: float = 0.0
  lora_targets: str = ''
  lowrank_rank: int = 0
  lowrank_targets: str = ''

  @nn.compact
  def __call__(self, x):
    in_shape = x.shape[-self.n_in:]
    if self._factored():   # low rank: x @ u @ v, u [*in, r], v [r, *out]
      u = self.param('u', nn.with_logical_partitioning(nn.initializers.normal(self.std), (
          *self.axes[:self.n_in], None)), (*in_shape, self.lowrank_rank), self.param_dtype)
      v = self.param('v', nn.with_logical_partitioning(nn.initializers.normal(
          self.lowrank_rank ** -0.5), (None, *self.axes[self.n_in:])),
          (self.lowrank_rank, *self.out_shape), self.param_dtype)
      x, u, v = nn.dtypes.promote_dtype(x, u, v, dtype=self.dtype)
      y = _contract(_contract(x, u, self.n_in), v, 1)
    else:
      kernel = self.param('kernel', nn.with_logical_partitioning(
          nn.initializers.normal(self.std), self.axes), (*in_shape, *self.out_shape),
          self.param_dtype)
      # contracted as an N-D kernel, never reshaped, and cast through promote_dtype: qwix
      # intercepts both, so a quantized kernel keeps its logical axes and stays quantized
      x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
      y = _contract(x, kernel, self.n_in)
    if self._has_adapter():
      r = self.lora_rank
      a = self.variable('lora', 'a', nn.with_logical_partitioning(
          nn.initializers.normal(math.prod(in_shape) ** -0.5), (*self.axes[:self.n_in], None)),
          self.make_rng('params') if self.is_initializing() else None, (*in_shape, r),
          self.param_dtype).value
      b = self.variable('lora', 'b', nn.with_logical_partitioning(
          nn.initializers.zeros, (None, *self.axes[self.n_in:])), None, (r, *self.out_shape),
          self.param_dtype).value
      low_NxR = _contract(x, a.astype(self.dtype), self.n_in)
      y = y + _contract(low_NxR, b.astype(self.dtype), 1) * (self.lora_alpha / r)
    if self.use_bias:
      bias = self.param('bias', nn.with_logical_partitioning(
          nn.initializers.zeros, self.axes[self.n_in:]), self.out_shape, self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y

  def _factored(self) -> bool:
    if not self.is_initializing():
      return self.has_variable('params', 'u')
    return self.lowrank_rank > 0 and re.search(self.lowrank_targets,
                                               '/'.join(self.path)) is not None

  def _has_adapter(self) -> bool:
    if not self.is_initializing():
      return self.has_variable('lora', 'a')
    return self.lora_rank > 0 and re.search(self.lora_targets, '/'.join(self.path)) is not None


def _contract(x, kernel, n_in: int):
  """x[..., *in] . kernel[*in, *out] -> [..., *out]: the last n_in axes of x against the first
  n_in of the kernel."""
  x_axes = tuple(range(x.ndim - n_in, x.ndim))
  return jax.lax.dot_general(x, kernel, ((x_axes, tuple(range(n_in))), ((), ())))

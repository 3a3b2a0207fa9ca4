"""Weight-only quantization of Linear kernels with qwix: int8 with a scale per output channel
(or per group of inputs), int4 and NF4 (Dettmers et al. 2023) with a scale per group of inputs
along the innermost contracted axis. The model reads them through qwix (`qwix.quantize_model`
intercepts Linear's dot_general), so evaluation and sampling run the quantized model; with
LoRA the frozen base is quantized the same way (QLoRA). `python -m lm.quantize` quantizes a
run.

qwix's `quantize_params` does not know that nn.scan stacks layers on a leading axis (its
quantization axes are those of one layer), so each layer is quantized under `jax.vmap` here.
4-bit values are stored two to a byte: tensorstore has no 4-bit unsigned type and would spend
a byte on each.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import qwix
from qwix._src.core import qarray
from qwix._src.providers import ptq

from lm.model import transformer as model_lib

SCHEMES = {'int8': jnp.int8, 'int4': jnp.int4, 'nf4': 'nf4'}


def _four_bit(qtype) -> bool:
  return qtype == 'nf4' if isinstance(qtype, str) else jnp.dtype(qtype) == jnp.int4


def _quantize(w, how: qarray.HowToQuantize) -> qarray.QArray:
  """qwix's quantization, except that 4-bit kernels are quantized from bfloat16 with
  bfloat16 scales: with groups of 32 a float32 scale would add a quarter of the 4-bit payload
  (QLoRA double-quantizes its scales instead)."""
  if not _four_bit(how.qtype):
    return qarray.quantize(w, how)
  # bfloat16 scales, rounded up so that no weight falls outside the range, then the weights
  # (as bfloat16) divided in float32: the error stays within half a step of the stored scale
  w = w.astype(jnp.bfloat16).astype(jnp.float32)
  scale = qarray.compute_scale_zero_point(qarray.calibrate(w, how), how.qtype)[0]
  rounded = scale.astype(jnp.bfloat16)
  rounded = jnp.where(rounded.astype(jnp.float32) < scale,
                      jnp.nextafter(rounded, jnp.array(jnp.inf, jnp.bfloat16)), rounded)
  quantized = qarray.quantize_with_scale_zero_point(w, how.qtype, rounded.astype(jnp.float32),
                                                    None, how.noise_fn)
  return quantized.replace(scale=rounded)


class _QArrays:
  """qwix's qarray module with `_quantize`, for the PTQ provider (what the model's
  initialisation, and so every abstract quantized tree, uses)."""
  quantize = staticmethod(_quantize)

  def __getattr__(self, name):
    return getattr(qarray, name)


def transformer(cfg: model_lib.ModelConfig, decode: bool = False) -> nn.Module:
  """The Transformer, whose Linear kernels matching cfg.quant_targets (searched in the module
  path, as LoRA's targets) are read quantized when cfg.quant_scheme is not 'none'."""
  model = model_lib.Transformer(cfg, decode=decode)
  if cfg.quant_scheme == 'none':
    return model
  rule = qwix.QuantizationRule(module_path=f'.*(?:{cfg.quant_targets}).*',
                               weight_qtype=SCHEMES[cfg.quant_scheme],
                               tile_size=cfg.quant_group_size or None)
  return qwix.quantize_model(model, qwix.PtqProvider([rule], _qarray_module=_QArrays()))


def is_quantized(leaf) -> bool:
  return isinstance(leaf, ptq.WithAux)


# The whole-tree transforms below run as one jitted program each: op by op, each kernel's
# shape compiled a dozen small programs (158 compiles, 31 s, when a QLoRA run of
# experiments/reverse.py started).


def quantize_like(params, abstract):
  """Float `params` quantized as the quantized tree `abstract` says; the layers nn.scan
  stacks (under 'layers') are quantized one at a time."""
  def one(path, target, param):
    if not is_quantized(target):
      return param
    quantize = lambda w: _quantize(w, target.how)
    if jax.tree_util.DictKey('layers') in path:
      quantize = jax.vmap(quantize)
    return ptq.WithAux(quantize(param), target.how)
  return jax.jit(lambda params: jax.tree_util.tree_map_with_path(
      one, abstract, params, is_leaf=is_quantized))(params)


@jax.jit
def dequantize(params):
  """Every quantized kernel replaced by its float value (the dtype of its scale)."""
  return jax.tree.map(lambda p: qarray.dequantize(p.array) if is_quantized(p) else p, params,
                      is_leaf=is_quantized)


def float_target(abstract, dtype):
  """The `dtype` parameters a quantized tree of ShapeDtypeStructs is made from (to restore
  them from a full-precision checkpoint before quantizing)."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(
      a.shape, dtype, sharding=a.array.qvalue.sharding) if is_quantized(a) else a,
      abstract, is_leaf=is_quantized)


def _packs(qvalue) -> bool:
  return jnp.dtype(qvalue.dtype).itemsize == 1 and jnp.iinfo(qvalue.dtype).bits == 4


@jax.jit
def to_stored(params):
  """Quantized kernels as {'qvalue', 'scale'} with 4-bit values packed in pairs along the last
  axis into uint8; what Orbax saves."""
  def one(p):
    if not is_quantized(p):
      return p
    q = p.array.qvalue
    if _packs(q):
      nibbles = jax.lax.convert_element_type(q, jnp.int8).astype(jnp.uint8) & 0xF
      q = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)
    return {'qvalue': q, 'scale': p.array.scale}
  return jax.tree.map(one, params, is_leaf=is_quantized)


def stored_target(abstract):
  """The ShapeDtypeStructs of `to_stored(abstract)`: the restore target."""
  def one(a):
    if not is_quantized(a):
      return a
    q = a.array.qvalue
    if _packs(q):
      q = jax.ShapeDtypeStruct((*q.shape[:-1], q.shape[-1] // 2), jnp.uint8, sharding=q.sharding)
    return {'qvalue': q, 'scale': a.array.scale}
  return jax.tree.map(one, abstract, is_leaf=is_quantized)


def from_stored(stored, abstract):
  """The inverse of `to_stored`, with the quantization recipe of `abstract`."""
  def one(a, s):
    if not is_quantized(a):
      return s
    q, dtype = s['qvalue'], a.array.qvalue.dtype
    if _packs(a.array.qvalue):
      nibbles = jnp.stack([q & 0xF, q >> 4], axis=-1).reshape(*q.shape[:-1], -1)
      if jnp.issubdtype(dtype, jnp.signedinteger):   # sign-extend the 4-bit two's complement
        nibbles = (nibbles.astype(jnp.int8) ^ 8) - 8
      q = nibbles.astype(dtype)
    return ptq.WithAux(a.array.replace(qvalue=q, scale=s['scale']), a.how)
  return jax.jit(lambda stored: jax.tree.map(one, abstract, stored, is_leaf=is_quantized))(stored)


def stored_bytes(tree) -> int:
  return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def kernels(tree) -> list:
  """The quantized kernels of a parameter tree."""
  return [p for p in jax.tree.leaves(tree, is_leaf=is_quantized) if is_quantized(p)]


def param_count(tree) -> int:
  """Parameters, a quantized kernel counting its values (not its scales)."""
  return sum(p.array.qvalue.size if is_quantized(p) else p.size
             for p in jax.tree.leaves(tree, is_leaf=is_quantized))

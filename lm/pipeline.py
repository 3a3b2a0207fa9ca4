"""GPipe pipeline parallelism over the 'stage' mesh axis, inside the jitted train step.

The scanned layer stack (parameters with a leading layer axis, sharded over 'stage' by the
rule layers -> stage) is cut into S stages of L / S consecutive layers, and the batch into M
microbatches. For T = M + S - 1 ticks, every stage applies its layers to the activation in
its slot (one `vmap` over stages, which GSPMD runs on each stage's devices), then the slots
shift by one stage (`jnp.roll`, a collective permute). Stage s works on microbatch t - s at
tick t; the last stage's results are collected in order. The idle (bubble) fraction of
stage-ticks is (S - 1) / T. Gradients come from differentiating this loop, so loss and
gradients equal the unpipelined model's.

Shapes: S stages, M microbatches, b microbatch size, L length, D width.
"""
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


def bubble_fraction(stages: int, microbatches: int) -> float:
  """The fraction of stage-ticks that do no useful work (GPipe's bubble)."""
  return (stages - 1) / (microbatches + stages - 1)


def run(stage_fn: Callable, params, x_BxLxD, *, stages: int, microbatches: int, rng=None):
  """Applies `stage_fn(stage_params, x, rng)` of each stage in turn, pipelined.

  `params` hold every layer along their leading axis; stage s gets layers
  [s * L/S, (s + 1) * L/S)."""
  B = x_BxLxD.shape[0]
  params_S = jax.tree.map(lambda p: p.reshape(stages, p.shape[0] // stages, *p.shape[1:]),
                          params)
  x_MxbxLxD = x_BxLxD.reshape(microbatches, B // microbatches, *x_BxLxD.shape[1:])
  slots_Sxb = jnp.zeros((stages, *x_MxbxLxD.shape[1:]), x_BxLxD.dtype)
  outputs_Mxb = jnp.zeros_like(x_MxbxLxD)
  stage_ids = jnp.arange(stages)

  def tick(carry, t):
    slots_Sxb, outputs_Mxb = carry
    slots_Sxb = slots_Sxb.at[0].set(x_MxbxLxD[jnp.minimum(t, microbatches - 1)])
    slots_Sxb = nn.with_logical_constraint(slots_Sxb, ('stage', 'batch', 'length', 'act_embed'))
    rngs = None if rng is None else jax.vmap(lambda s: jax.random.fold_in(
        jax.random.fold_in(rng, t), s))(stage_ids)
    out_Sxb = jax.vmap(stage_fn, spmd_axis_name='stage')(params_S, slots_Sxb, rngs)
    done = jnp.maximum(t - (stages - 1), 0)   # the microbatch leaving the last stage
    outputs_Mxb = jax.lax.dynamic_update_index_in_dim(outputs_Mxb, out_Sxb[-1], done, 0)
    return (jnp.roll(out_Sxb, 1, axis=0), outputs_Mxb), None

  (_, outputs_Mxb), _ = jax.lax.scan(tick, (slots_Sxb, outputs_Mxb),
                                     jnp.arange(microbatches + stages - 1))
  return outputs_Mxb.reshape(x_BxLxD.shape)

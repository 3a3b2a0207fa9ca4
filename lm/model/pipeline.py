"""GPipe pipeline parallelism over the 'stage' mesh axis, inside the jitted train step.

The scanned layer stack (parameters with a leading layer axis, sharded over 'stage' by the
rule layers -> stage) is cut into S stages of L / S consecutive layers, and the batch into M
microbatches. For T = M + S - 1 ticks, every stage applies its layers to the activation in
its slot (one `vmap` over stages, which GSPMD runs on each stage's devices), then the slots
shift by one stage (`jnp.roll`, a collective permute). Stage s works on microbatch t - s at
tick t; the last stage's results are collected in order. The idle (bubble) fraction of
stage-ticks is (S - 1) / T. Gradients come from differentiating this loop, so loss and
gradients equal the unpipelined model's.

With R > 1 repeats (the circular / interleaved schedule of Narayanan et al. 2021) the layers
are cut into S * R chunks, every microbatch passes the stages R times and the bubble
shrinks to (S - 1) / (R M + S - 1); logical chunk r * S + s lives on stage s.

Shapes: S stages, M microbatches, b microbatch size, L length, D width.
"""
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


def bubble_fraction(stages: int, microbatches: int, repeats: int = 1) -> float:
  """The fraction of stage-ticks that do no useful work: (S - 1) / (R M + S - 1)."""
  return (stages - 1) / (repeats * microbatches + stages - 1)


def logical_order(n_layers: int, stages: int, repeats: int):
  """Stored layer index of each logical layer: with R repeats, stage s stores the chunks
  r * S + s (r = 0 .. R-1) as one contiguous block, so logical chunk r * S + s sits at stored
  block s * R + r. With R = 1 the orders agree."""
  k = n_layers // (stages * repeats)
  return [(c % stages * repeats + c // stages) * k + i
          for c in range(stages * repeats) for i in range(k)]


def run(stage_fn: Callable, params, x_BxLxD, rows=(), *, stages: int, microbatches: int,
        repeats: int = 1, rng=None):
  """Applies `stage_fn(chunk_params, x, rows, rng)` for every chunk of layers, pipelined;
  `rows` is a pytree of per-row arrays (positions, segment ids) that travel with x.

  `params` hold every layer along their leading axis (stage s's contiguous block holds its
  R chunks; see `logical_order`). A microbatch passes the S stages R times: it re-enters
  stage 0 from a loop-back buffer, which needs microbatches >= stages when R > 1."""
  S, M, R = stages, microbatches, repeats
  B = x_BxLxD.shape[0]
  params_SxR = jax.tree.map(lambda p: p.reshape(S, R, p.shape[0] // (S * R), *p.shape[1:]),
                            params)
  x_Mxb = x_BxLxD.reshape(M, B // M, *x_BxLxD.shape[1:])
  rows_Mxb = jax.tree.map(lambda a: a.reshape(M, B // M, *a.shape[1:]), rows)
  slots_Sxb = jnp.zeros((S, *x_Mxb.shape[1:]), x_BxLxD.dtype)
  stage_ids = jnp.arange(S)

  def apply_chunk(chunks, x, r, rows, rng):
    return stage_fn(jax.tree.map(lambda p: p[r], chunks), x, rows, rng)

  def tick(carry, t):
    slots_Sxb, loop_back_Mxb, outputs_Mxb = carry
    # item k = r * M + m (repeat r of microbatch m) enters stage 0 at tick k
    entering = x_Mxb[t % M] if R == 1 else jnp.where(t < M, x_Mxb[t % M], loop_back_Mxb[t % M])
    slots_Sxb = slots_Sxb.at[0].set(entering)
    slots_Sxb = nn.with_logical_constraint(slots_Sxb, ('stage', 'batch', 'length', 'act_embed'))
    repeat_S = jnp.clip((t - stage_ids) // M, 0, R - 1)   # stage s works on item t - s
    rngs = None if rng is None else jax.vmap(lambda s: jax.random.fold_in(
        jax.random.fold_in(rng, t), s))(stage_ids)
    rows_Sxb = jax.tree.map(lambda a: a[(t - stage_ids) % M], rows_Mxb)
    out_Sxb = jax.vmap(apply_chunk, spmd_axis_name='stage')(params_SxR, slots_Sxb, repeat_S,
                                                           rows_Sxb, rngs)
    leaving = t - (S - 1)                                   # the item leaving the last stage
    m, last = leaving % M, leaving // M == R - 1
    outputs_Mxb = outputs_Mxb.at[m].set(
        jnp.where((leaving >= 0) & last, out_Sxb[-1], outputs_Mxb[m]))
    if R > 1:   # GPipe (R = 1) never loops back
      loop_back_Mxb = loop_back_Mxb.at[m].set(
          jnp.where((leaving >= 0) & ~last, out_Sxb[-1], loop_back_Mxb[m]))
    return (jnp.roll(out_Sxb, 1, axis=0), loop_back_Mxb, outputs_Mxb), None

  loop_back_Mxb = jnp.zeros_like(x_Mxb) if R > 1 else jnp.zeros([], x_BxLxD.dtype)
  carry = (slots_Sxb, loop_back_Mxb, jnp.zeros_like(x_Mxb))
  (_, _, outputs_Mxb), _ = jax.lax.scan(tick, carry, jnp.arange(R * M + S - 1))
  return outputs_Mxb.reshape(x_BxLxD.shape)

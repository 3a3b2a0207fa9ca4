"""A functional transformer in Flax Linen: GPT-2 and Llama styles, causal or bidirectional.

Shape letters: B batch, L length, D d_model, H query heads, K key/value heads, Dh head
dimension, F MLP width, V vocabulary. Every parameter carries logical axis names
(`nn.with_logical_partitioning`); `lm/parallel/sharding.py` maps them onto the mesh.
"""
import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.ad_checkpoint import checkpoint_name

from lm.model import attention as attention_lib
from lm.model import pipeline
from lm.model.linear import Linear

_policies = jax.checkpoint_policies
# as 'full', but the attention's q, k, v are kept, and splash's output and log-sum-exp: the
# backward pass then runs neither the q / kv projections nor splash's forward again
_ATTENTION = _policies.save_only_these_names(attention_lib.ATTENTION_RESIDUALS)
REMAT_POLICIES = {
    'full': _policies.nothing_saveable,
    # the matmul outputs, splash's among them (a custom call, which the dots policies miss)
    'dots': _policies.save_from_both_policies(_policies.dots_saveable, _ATTENTION),
    'dots_no_batch': _policies.save_from_both_policies(
        _policies.dots_with_no_batch_dims_saveable, _ATTENTION),
    'everything': _policies.everything_saveable,
    'save_attention': _ATTENTION,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The model's hyper-parameters (config.model after `lm.config.resolve`)."""
  vocab_size: int
  n_layers: int
  d_model: int
  n_heads: int
  n_kv_heads: int
  d_ff: int
  max_len: int
  causal: bool = True
  positions: str = 'learned'
  rope_theta: float = 10000.0
  norm: str = 'layernorm'
  norm_eps: float = 1e-5
  mlp: str = 'gelu'
  use_bias: bool = True
  tie_embeddings: bool = True
  init_std: float = 0.02
  parametrization: str = 'sp'      # 'mup': maximal update parametrization (see mup_* below)
  mup_base_width: int = 0          # with 'mup': the d_model where it equals 'sp'
  dropout: float = 0.0
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  attention: str = 'xla'
  attention_window: int | None = None   # causal sliding window: positions each query sees
  attention_global_every: int = 0  # > 0 with a window: every this-many-th layer sees all
  lowrank_rank: int = 0            # > 0: kernels matching lowrank_targets factored as u @ v
  lowrank_targets: str = ''
  remat: str = 'none'
  scan_layers: bool = True
  pipeline_stages: int = 1         # the mesh's 'stage' size (set by lm.training.steps.build)
  pipeline_microbatches: int = 1   # 0: apply the stack unpipelined (e.g. to sample)
  pipeline_repeats: int = 1        # > 1: circular schedule (see lm/model/pipeline.py)
  scalar_head: bool = False        # a scalar per position (reward / value), beside the logits
  lora_rank: int = 0               # > 0: low-rank adapters on the Linear kernels selected by
  lora_alpha: float = 0.0          # lora_targets (a regex searched in the module path), in a
  lora_targets: str = ''           # separate 'lora' collection; scaled by alpha / rank
  quant_scheme: str = 'none'       # kernels read quantized (lm/compress/quant.py: wraps the model)
  quant_group_size: int = 0
  quant_targets: str = ''

  @classmethod
  def from_config(cls, model: ml_collections.ConfigDict) -> 'ModelConfig':
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in model.items() if k in fields})

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  # muP (Yang et al. 2022, Tensor Programs V, table 3) relative to SP at mup_base_width, for a
  # width multiplier m = d_model / mup_base_width with every hidden dimension scaled with it:
  # hidden kernels initialised with std / sqrt(m) (variance 1 / fan_in) and trained at Adam's
  # learning rate / m (lm.training.optim); embeddings, norms and biases unchanged; logits
  # multiplied by 1 / m (the readout stays the embedding table, tied or not, initialised as in
  # SP); attention scores by 1 / head_dim instead of 1 / sqrt(head_dim). Every multiplier is 1
  # at m = 1: muP then is SP, bit for bit.
  @property
  def mup_width_multiplier(self) -> float:
    return self.d_model / self.mup_base_width if self.parametrization == 'mup' else 1.0

  @property
  def hidden_init_std(self) -> float:
    return self.init_std / self.mup_width_multiplier ** 0.5

  @property
  def mup_query_multiplier(self) -> float:
    """Queries are multiplied by this before attention's 1 / sqrt(head_dim): the scores then
    scale as 1 / head_dim, equal to SP's at the base width's head_dim."""
    return self.mup_width_multiplier ** -0.5

  def param_counts(self) -> dict[str, int]:
    """Parameter counts: `total`, and `non_embedding` (without token / position tables and
    an untied output head, as in Kaplan et al. 2020)."""
    D, F, V, Dh = self.d_model, self.d_ff, self.vocab_size, self.head_dim
    H, K, b = self.n_heads, self.n_kv_heads, int(self.use_bias)

    def kernel(name, n_in, n_out):   # a low-rank kernel holds u [in, r] and v [r, out]
      if self.lowrank_rank and re.search(self.lowrank_targets, f'layers/{name}'):
        return self.lowrank_rank * (n_in + n_out)
      return n_in * n_out
    attn = kernel('attn/q', D, H * Dh) + kernel('attn/kv', D, 2 * K * Dh)
    attn += kernel('attn/o', H * Dh, D) + b * ((H + 2 * K) * Dh + D)
    mlp_in = 2 * F if self.mlp == 'swiglu' else F
    mlp = kernel('mlp/wi', D, mlp_in) + kernel('mlp/wo', F, D) + b * (mlp_in + D)
    norm = D * (2 if self.norm == 'layernorm' and self.use_bias else 1)
    per_layer = attn + mlp + 2 * norm
    non_embedding = self.n_layers * per_layer + norm
    embedding = V * D * (1 if self.tie_embeddings else 2)
    if self.positions == 'learned':
      embedding += self.max_len * D
    return {'total': non_embedding + embedding, 'non_embedding': non_embedding}

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token, PaLM's convention (Chowdhery et al. 2022, appendix B):
    6 * N + 12 * n_layers * n_heads * head_dim * seq_len, where N counts every parameter
    used in a matmul (non-embedding parameters plus the V x D output projection) and the
    attention term counts the full (not causally halved) score and value products."""
    matmul_params = self.param_counts()['non_embedding'] + self.vocab_size * self.d_model
    attention = 12 * self.n_layers * self.n_heads * self.head_dim * seq_len
    return 6.0 * matmul_params + attention


def make_norm(cfg: ModelConfig, name: str) -> nn.Module:
  scale_init = nn.with_logical_partitioning(nn.initializers.ones, ('embed',))
  if cfg.norm == 'rmsnorm':
    return nn.RMSNorm(epsilon=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                      scale_init=scale_init, name=name)
  return nn.LayerNorm(epsilon=cfg.norm_eps, use_bias=cfg.use_bias, dtype=cfg.dtype,
                      param_dtype=cfg.param_dtype, scale_init=scale_init,
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)),
                      name=name)


def rotary(x_BxLxNxDh, positions_BxL, theta: float):
  """Rotary position embedding (Su et al. 2021), rotating the two halves of each head."""
  Dh = x_BxLxNxDh.shape[-1]
  freqs = theta ** (-jnp.arange(0, Dh, 2, dtype=jnp.float32) / Dh)
  angles_BxLxDh2 = positions_BxL.astype(jnp.float32)[..., None] * freqs
  sin, cos = jnp.sin(angles_BxLxDh2)[:, :, None, :], jnp.cos(angles_BxLxDh2)[:, :, None, :]
  x1, x2 = jnp.split(x_BxLxNxDh.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_BxLxNxDh.dtype)


def segment_mask(segments_BxL, causal: bool, window: int | None = None):
  """Which keys each query sees (B x L x L): its own segment, and with `causal` only up to
  itself (and with `window` only that many positions back). Packed examples then never attend
  to each other."""
  mask_BxLxL = segments_BxL[:, :, None] == segments_BxL[:, None, :]
  if causal:
    L = segments_BxL.shape[1]
    mask_BxLxL &= (attention_lib.window_mask(jnp.arange(L), jnp.arange(L), window) if window
                   else jnp.tril(jnp.ones((L, L), bool)))
  return mask_BxLxL


def _dense(cfg: ModelConfig) -> dict:
  return dict(use_bias=cfg.use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
              lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_targets=cfg.lora_targets,
              lowrank_rank=cfg.lowrank_rank, lowrank_targets=cfg.lowrank_targets)


class Attention(nn.Module):
  """Self-attention; with `decode`, keys and values are appended to a cache (the 'cache'
  collection: B x max_len slots per layer, their segment ids, and the next slot's index) and
  every query attends to the cached slots up to its own."""
  cfg: ModelConfig
  deterministic: bool
  decode: bool = False

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, segments_BxL, is_global=False):
    """`is_global` (a bool, or a traced one under nn.scan): this layer ignores the window."""
    cfg = self.cfg
    H, K, Dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    q_BxLxHxDh = Linear((H, Dh), ('embed', 'heads', 'head_dim'), std=cfg.hidden_init_std,
                        name='q', **_dense(cfg))(x_BxLxD)
    kv_BxLx2xKxDh = Linear((2, K, Dh), ('embed', None, 'kv_heads', 'head_dim'),
                           std=cfg.hidden_init_std, name='kv', **_dense(cfg))(x_BxLxD)
    k_BxLxKxDh, v_BxLxKxDh = kv_BxLx2xKxDh[:, :, 0], kv_BxLx2xKxDh[:, :, 1]
    if cfg.positions == 'rope':
      q_BxLxHxDh = rotary(q_BxLxHxDh, positions_BxL, cfg.rope_theta)
      k_BxLxKxDh = rotary(k_BxLxKxDh, positions_BxL, cfg.rope_theta)
    if cfg.mup_query_multiplier != 1:
      q_BxLxHxDh = q_BxLxHxDh * jnp.asarray(cfg.mup_query_multiplier, q_BxLxHxDh.dtype)
    q_BxLxHxDh = nn.with_logical_constraint(q_BxLxHxDh, ('batch', 'length', 'act_heads', None))
    q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh = (checkpoint_name(x, attention_lib.ATTENTION_RESIDUALS)
                                          for x in (q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh))
    masks = lambda window: None   # window -> the mask, when one is needed
    if self.decode:
      k_BxLxKxDh, v_BxLxKxDh, masks = self._cached(k_BxLxKxDh, v_BxLxKxDh, segments_BxL)
    elif segments_BxL is not None:
      masks = lambda window: segment_mask(segments_BxL, cfg.causal, window)
    attend = lambda window: attention_lib.attention(
        q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, causal=cfg.causal, mask=masks(window),
        implementation=cfg.attention, window=window)
    if not cfg.attention_window or is_global is False:
      out_BxLxHxDh = attend(cfg.attention_window)
    elif is_global is True:
      out_BxLxHxDh = attend(None)
    else:   # scanned layers: both kernels compiled, one run
      out_BxLxHxDh = jax.lax.cond(is_global, lambda: attend(None),
                                  lambda: attend(cfg.attention_window))
    # GPT-2's scaled init of residual projections: std / sqrt(2 * n_layers).
    out_std = cfg.hidden_init_std / (2 * cfg.n_layers) ** 0.5
    y_BxLxD = Linear((cfg.d_model,), ('heads', 'head_dim', 'embed'), n_in=2, std=out_std,
                     name='o', **_dense(cfg))(out_BxLxHxDh)
    return nn.Dropout(cfg.dropout, deterministic=self.deterministic)(y_BxLxD)

  def _cached(self, k_BxLxKxDh, v_BxLxKxDh, segments_BxL):
    """Keys and values of every cache slot (B x M) after writing these L, and window -> the
    mask (B x L x M) of slots each query sees: written ones up to its own, of its segment."""
    B, L, K, Dh = k_BxLxKxDh.shape
    M = self.cfg.max_len
    cached_k = self.variable('cache', 'k', jnp.zeros, (B, M, K, Dh), k_BxLxKxDh.dtype)
    cached_v = self.variable('cache', 'v', jnp.zeros, (B, M, K, Dh), v_BxLxKxDh.dtype)
    cached_segments = self.variable('cache', 'segments', jnp.zeros, (B, M), jnp.int32)
    index = self.variable('cache', 'index', lambda: jnp.zeros([], jnp.int32))
    i = index.value
    cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k_BxLxKxDh, (0, i, 0, 0))
    cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v_BxLxKxDh, (0, i, 0, 0))
    cached_segments.value = jax.lax.dynamic_update_slice(
        cached_segments.value, segments_BxL.astype(jnp.int32), (0, i))
    index.value = i + L
    same_segment_BxLxM = cached_segments.value[:, None, :] == segments_BxL[:, :, None]

    def masks(window):
      visible_LxM = jnp.arange(M)[None, :] <= i + jnp.arange(L)[:, None]
      if window:   # slots are indices of the (left-padded) row
        visible_LxM &= attention_lib.window_mask(i + jnp.arange(L), jnp.arange(M), window)
      return visible_LxM & same_segment_BxLxM
    return cached_k.value, cached_v.value, masks


class Mlp(nn.Module):
  cfg: ModelConfig
  deterministic: bool

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.cfg
    if cfg.mlp == 'swiglu':
      gate_up = Linear((2, cfg.d_ff), ('embed', None, 'mlp'), std=cfg.hidden_init_std,
                       name='wi', **_dense(cfg))(x_BxLxD)
      h_BxLxF = nn.silu(gate_up[..., 0, :]) * gate_up[..., 1, :]
    else:
      h_BxLxF = nn.gelu(Linear((cfg.d_ff,), ('embed', 'mlp'), std=cfg.hidden_init_std,
                               name='wi', **_dense(cfg))(x_BxLxD))
    h_BxLxF = nn.with_logical_constraint(h_BxLxF, ('batch', 'length', 'act_mlp'))
    out_std = cfg.hidden_init_std / (2 * cfg.n_layers) ** 0.5
    y_BxLxD = Linear((cfg.d_model,), ('mlp', 'embed'), std=out_std, name='wo',
                     **_dense(cfg))(h_BxLxF)
    return nn.Dropout(cfg.dropout, deterministic=self.deterministic)(y_BxLxD)


class Block(nn.Module):
  """Pre-norm residual block; returns (x, None) so that nn.scan can stack it."""
  cfg: ModelConfig
  deterministic: bool
  decode: bool = False

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, segments_BxL, is_global=False):
    x_BxLxD = x_BxLxD + Attention(self.cfg, self.deterministic, self.decode, name='attn')(
        make_norm(self.cfg, 'norm_attn')(x_BxLxD), positions_BxL, segments_BxL, is_global)
    x_BxLxD = x_BxLxD + Mlp(self.cfg, self.deterministic, name='mlp')(
        make_norm(self.cfg, 'norm_mlp')(x_BxLxD))
    return nn.with_logical_constraint(x_BxLxD, ('batch', 'length', 'act_embed')), None


class Transformer(nn.Module):
  """tokens_BxL -> float32 logits_BxLxV (and with `scores`, float32 scores_BxL from the
  scalar head: `cfg.scalar_head`).

  `positions` (default 0 .. L-1) place each token; `segments` (ids > 0; default all one
  segment) keep packed examples, or padding, from attending to each other. With `decode`,
  attention appends to the 'cache' collection (see Attention), for sampling."""
  cfg: ModelConfig
  decode: bool = False

  @nn.compact
  def __call__(self, tokens_BxL, train: bool = False, *, positions=None, segments=None,
               scores: bool = False):
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1]), tokens_BxL.shape)
    cfg = self.cfg
    embed = nn.Embed(cfg.vocab_size, cfg.d_model, param_dtype=cfg.param_dtype, dtype=cfg.dtype,
                     embedding_init=nn.with_logical_partitioning(
                         nn.initializers.normal(cfg.init_std), ('vocab', 'embed')), name='embed')
    x_BxLxD = self._embed(embed, tokens_BxL, positions, train)
    x_BxLxD = self._layers(x_BxLxD, positions, segments, train)
    return self._head(embed, make_norm(cfg, 'norm_out')(x_BxLxD), scores)

  @nn.nowrap   # a part of __call__: no name of its own in the traced ops
  def _embed(self, embed: nn.Embed, tokens_BxL, positions_BxL, train: bool):
    """Token embeddings (plus learned positions), with dropout."""
    cfg = self.cfg
    x_BxLxD = embed(tokens_BxL)
    if cfg.positions == 'learned':
      pos_MxD = self.param('pos_embed', nn.with_logical_partitioning(
          nn.initializers.normal(cfg.init_std), (None, 'embed')), (cfg.max_len, cfg.d_model),
          cfg.param_dtype)
      x_BxLxD = x_BxLxD + jnp.take(pos_MxD, positions_BxL, axis=0).astype(cfg.dtype)
    x_BxLxD = nn.Dropout(cfg.dropout, deterministic=not train)(x_BxLxD)
    return nn.with_logical_constraint(x_BxLxD, ('batch', 'length', 'act_embed'))

  @nn.nowrap   # a part of __call__: no name of its own in the traced ops
  def _layers(self, x_BxLxD, positions, segments, train: bool):
    """The n_layers blocks, applied one of four ways: unrolled (scan_layers=False), scanned,
    as pipeline stages, or a circular pipeline's stages put back in logical order."""
    cfg = self.cfg
    block = Block
    if cfg.remat != 'none':
      block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    every = cfg.attention_global_every if cfg.attention_window else 0
    is_global = [every > 0 and (i + 1) % every == 0 for i in range(cfg.n_layers)]
    if not cfg.scan_layers:
      for i in range(cfg.n_layers):
        x_BxLxD, _ = block(cfg, not train, self.decode, name=f'layers_{i}')(
            x_BxLxD, positions, segments, is_global[i])
      return x_BxLxD
    layers = _stack(block, cfg.n_layers, bool(every))(cfg, not train, self.decode, name='layers')
    circular = cfg.pipeline_stages > 1 and cfg.pipeline_repeats > 1
    if self.is_initializing() or cfg.pipeline_stages == 1 or (
        cfg.pipeline_microbatches == 0 and not circular):
      return layers(x_BxLxD, positions, segments, *([jnp.array(is_global)] if every else []))[0]
    if cfg.pipeline_microbatches > 0:
      return self._pipelined(block, _layer_variables(layers), x_BxLxD, positions, segments,
                             train)
    # a circular pipeline's layers used unpipelined: stored out of logical order
    order = jnp.array(pipeline.logical_order(cfg.n_layers, cfg.pipeline_stages,
                                             cfg.pipeline_repeats))
    in_order = jax.tree.map(lambda p: p[order], _layer_variables(layers))
    return self._apply_stack(block, cfg.n_layers, in_order, x_BxLxD, (positions, segments),
                             self._dropout_rng(train), train)

  @nn.nowrap   # a part of __call__: no name of its own in the traced ops
  def _head(self, embed: nn.Embed, x_BxLxD, scores: bool):
    """Float32 logits from the final hidden states (the embedding table, or its own head), and
    with `scores` the scalar head's."""
    cfg = self.cfg
    if cfg.tie_embeddings:
      table_VxD = embed.embedding
    else:
      table_VxD = self.param('head', nn.with_logical_partitioning(
          nn.initializers.normal(cfg.init_std), ('vocab', 'embed')),
          (cfg.vocab_size, cfg.d_model), cfg.param_dtype)
    logits_BxLxV = jnp.einsum('bld,vd->blv', x_BxLxD.astype(cfg.dtype),
                              table_VxD.astype(cfg.dtype), preferred_element_type=jnp.float32)
    if cfg.mup_width_multiplier != 1:
      logits_BxLxV = logits_BxLxV / cfg.mup_width_multiplier
    logits_BxLxV = nn.with_logical_constraint(logits_BxLxV, ('batch', 'length', 'act_vocab'))
    if not cfg.scalar_head:
      return logits_BxLxV
    # reward / value head: one number per position from the final hidden state
    score_D = self.param('score_head', nn.with_logical_partitioning(
        nn.initializers.zeros, ('embed',)), (cfg.d_model,), cfg.param_dtype)
    scores_BxL = jnp.einsum('bld,d->bl', x_BxLxD.astype(jnp.float32),
                            score_D.astype(jnp.float32))
    return (logits_BxLxV, scores_BxL) if scores else logits_BxLxV

  def _pipelined(self, block, layer_variables, x_BxLxD, positions, segments, train: bool):
    """The layer stack as GPipe stages over the 'stage' mesh axis (lm/model/pipeline.py)."""
    cfg = self.cfg
    chunk = cfg.n_layers // (cfg.pipeline_stages * cfg.pipeline_repeats)
    stage_fn = lambda variables, x, rows, rng: self._apply_stack(block, chunk, variables, x,
                                                                 rows, rng, train)
    return pipeline.run(stage_fn, layer_variables, x_BxLxD, (positions, segments),
                        stages=cfg.pipeline_stages, microbatches=cfg.pipeline_microbatches,
                        repeats=cfg.pipeline_repeats, rng=self._dropout_rng(train))

  def _apply_stack(self, block, n_layers: int, variables, x_BxLxD, rows, rng, train: bool):
    """n_layers scanned blocks applied functionally to the given (stacked) variables;
    `rows` = (positions, segments) of the rows of x."""
    stack = _stack(block, n_layers)(self.cfg, not train, parent=None)
    rngs = {} if rng is None else {'dropout': rng}
    return stack.apply(variables, x_BxLxD, *rows, rngs=rngs)[0]

  def _dropout_rng(self, train: bool):
    return self.make_rng('dropout') if train and self.cfg.dropout > 0 else None


def _layer_variables(layers: nn.Module) -> dict:
  """The stacked layers' parameters and adapters (what the pipeline cuts into stages)."""
  return {k: v for k, v in layers.variables.items() if k in ('params', 'lora')}


def _stack(block, n_layers: int, per_layer_flag: bool = False):
  """`block` repeated n_layers times with nn.scan: one compiled body, parameters stacked on a
  leading 'layers' axis; with `per_layer_flag` each layer also takes its own is_global."""
  in_axes = (nn.broadcast, nn.broadcast) + ((0,) if per_layer_flag else ())
  return nn.scan(block, variable_axes={'params': 0, 'lora': 0, 'cache': 0},
                 split_rngs={'params': True, 'dropout': True}, in_axes=in_axes,
                 length=n_layers, metadata_params={nn.PARTITION_NAME: 'layers'})

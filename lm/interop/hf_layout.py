"""How `lm` parameters and configs lay out as Hugging Face GPT-2 / Llama ones (`lm/hf.py`
reads and writes by these tables).

Each family is a table: for every parameter of `lm.model.Transformer`, the Hugging Face
tensors it is made of (`Source`). GPT-2's Conv1D stores (in, out) and fuses q, k, v in one
`c_attn`; Llama's `nn.Linear` stores (out, in); both RoPE forms are the half-split one of
`lm.model.transformer.rotary`.
"""
import dataclasses
import math

from lm.config import ConfigError

ARCHITECTURES = {'GPT2LMHeadModel': 'gpt2', 'LlamaForCausalLM': 'llama'}


@dataclasses.dataclass(frozen=True)
class Source:
  """How one `lm` parameter is laid out in Hugging Face tensors.

  The `lm` array is [layers,] *in, [pieces,] *out: `n_in` leading dimensions (after the
  stacked layers) flatten into the tensor's input axis and the rest into its output axis;
  with several `names` (Llama's k and v projections) or `offsets` (GPT-2's fused c_attn),
  each piece is a window of its tensor's output axis starting at its offset. '{}' in a name
  is the layer index. 1-D tensors (biases, norms) have no input axis (n_in = 0)."""
  names: tuple[str, ...]
  n_in: int = 0
  offsets: tuple[int, ...] = (0,)
  transposed: bool = False   # stored (out, in), as torch.nn.Linear
  stacked: bool = False      # one tensor per layer, stacked on the leading axis

  @property
  def pieces(self) -> list[tuple[str, int]]:
    n = max(len(self.names), len(self.offsets))
    return [(self.names[i % len(self.names)], self.offsets[i % len(self.offsets)])
            for i in range(n)]


def _gpt2(cfg) -> dict[str, Source]:
  h, D = 'transformer.h.{}.', cfg.d_model
  layer = lambda name, n_in=0, offsets=(0,): Source((h + name,), n_in, offsets, stacked=True)
  table = {'embed/embedding': Source(('transformer.wte.weight',), 1),
           'pos_embed': Source(('transformer.wpe.weight',), 1),
           'norm_out/scale': Source(('transformer.ln_f.weight',)),
           'norm_out/bias': Source(('transformer.ln_f.bias',)),
           'layers/attn/q/kernel': layer('attn.c_attn.weight', 1),
           'layers/attn/kv/kernel': layer('attn.c_attn.weight', 1, (D, 2 * D)),
           'layers/attn/q/bias': layer('attn.c_attn.bias'),
           'layers/attn/kv/bias': layer('attn.c_attn.bias', 0, (D, 2 * D)),
           'layers/attn/o/kernel': layer('attn.c_proj.weight', 2),
           'layers/attn/o/bias': layer('attn.c_proj.bias'),
           'layers/mlp/wi/kernel': layer('mlp.c_fc.weight', 1),
           'layers/mlp/wi/bias': layer('mlp.c_fc.bias'),
           'layers/mlp/wo/kernel': layer('mlp.c_proj.weight', 1),
           'layers/mlp/wo/bias': layer('mlp.c_proj.bias')}
  for norm, name in (('norm_attn', 'ln_1'), ('norm_mlp', 'ln_2')):
    table[f'layers/{norm}/scale'] = layer(f'{name}.weight')
    table[f'layers/{norm}/bias'] = layer(f'{name}.bias')
  if not cfg.tie_embeddings:
    table['head'] = Source(('lm_head.weight',), 1)
  return table


def _llama(cfg) -> dict[str, Source]:
  h = 'model.layers.{}.'
  linear = lambda names, n_in=1: Source(tuple(h + n for n in names), n_in, transposed=True,
                                        stacked=True)
  table = {'embed/embedding': Source(('model.embed_tokens.weight',), 1),
           'norm_out/scale': Source(('model.norm.weight',)),
           'layers/norm_attn/scale': Source((h + 'input_layernorm.weight',), stacked=True),
           'layers/norm_mlp/scale': Source((h + 'post_attention_layernorm.weight',),
                                           stacked=True),
           'layers/attn/q/kernel': linear(['self_attn.q_proj.weight']),
           'layers/attn/kv/kernel': linear(['self_attn.k_proj.weight', 'self_attn.v_proj.weight']),
           'layers/attn/o/kernel': linear(['self_attn.o_proj.weight'], 2),
           'layers/mlp/wi/kernel': linear(['mlp.gate_proj.weight', 'mlp.up_proj.weight']),
           'layers/mlp/wo/kernel': linear(['mlp.down_proj.weight'])}
  if not cfg.tie_embeddings:
    table['head'] = Source(('lm_head.weight',), 1)
  return table


TABLES = {'gpt2': _gpt2, 'llama': _llama}



def lm_model_config(hf: dict, where: str) -> tuple[str, dict]:
  """(family, config.model values) of a Hugging Face config.json; ConfigError naming the
  field for what `lm.model` cannot represent."""
  arch = (hf.get('architectures') or [None])[0]
  family = ARCHITECTURES.get(arch) or {'gpt2': 'gpt2', 'llama': 'llama'}.get(hf.get('model_type'))
  if family is None:
    raise ConfigError(f'{where}: architectures={hf.get("architectures")} (model_type='
                      f'{hf.get("model_type")!r}) is not supported; supported: '
                      f'{list(ARCHITECTURES)}')

  def refuse_unless(ok: bool, field: str, why: str):
    if not ok:
      raise ConfigError(f'{where}: {field}={hf.get(field)!r} is not supported ({why})')

  if family == 'gpt2':
    refuse_unless(hf.get('activation_function', 'gelu_new') in ('gelu_new', 'gelu_pytorch_tanh'),
                  'activation_function', "lm's GELU is the tanh approximation")
    refuse_unless(hf.get('scale_attn_weights', True), 'scale_attn_weights',
                  'attention is always scaled by 1/sqrt(head_dim)')
    refuse_unless(not hf.get('scale_attn_by_inverse_layer_idx'), 'scale_attn_by_inverse_layer_idx',
                  'no per-layer attention scale')
    refuse_unless(not hf.get('add_cross_attention'), 'add_cross_attention', 'decoder only')
    d = hf['n_embd']
    model = dict(vocab_size=hf['vocab_size'], n_layers=hf['n_layer'], d_model=d,
                 n_heads=hf['n_head'], n_kv_heads=hf['n_head'], d_ff=hf.get('n_inner') or 4 * d,
                 max_len=hf['n_positions'], positions='learned', norm='layernorm',
                 norm_eps=hf.get('layer_norm_epsilon', 1e-5), mlp='gelu', use_bias=True,
                 tie_embeddings=hf.get('tie_word_embeddings', True))
  else:
    rope = hf.get('rope_parameters') or {}
    refuse_unless(hf.get('hidden_act', 'silu') == 'silu', 'hidden_act', 'SwiGLU uses SiLU')
    refuse_unless(not hf.get('rope_scaling') and rope.get('rope_type', 'default') == 'default',
                  'rope_scaling' if hf.get('rope_scaling') else 'rope_parameters',
                  'only unscaled RoPE')
    for field in ('attention_bias', 'mlp_bias'):
      refuse_unless(not hf.get(field), field, 'Llama layers have no biases in lm')
    d, heads = hf['hidden_size'], hf['num_attention_heads']
    refuse_unless(hf.get('head_dim') in (None, d // heads), 'head_dim',
                  f'lm uses hidden_size / num_attention_heads = {d // heads}')
    model = dict(vocab_size=hf['vocab_size'], n_layers=hf['num_hidden_layers'], d_model=d,
                 n_heads=heads, n_kv_heads=hf.get('num_key_value_heads') or heads,
                 d_ff=hf['intermediate_size'], max_len=hf['max_position_embeddings'],
                 positions='rope', rope_theta=rope.get('rope_theta', hf.get('rope_theta', 1e4)),
                 norm='rmsnorm', norm_eps=hf.get('rms_norm_eps', 1e-6), mlp='swiglu',
                 use_bias=False, tie_embeddings=hf.get('tie_word_embeddings', False))
  if d % model['n_heads']:
    raise ConfigError(f'{where}: hidden size {d} is not divisible by {model["n_heads"]} heads')
  return family, model


def family_of(m) -> str:
  """'gpt2' or 'llama': the Hugging Face family an `lm` model config is an instance of."""
  gpt2 = dict(positions='learned', norm='layernorm', mlp='gelu', use_bias=True)
  llama = dict(positions='rope', norm='rmsnorm', mlp='swiglu', use_bias=False)
  for family, wanted in (('gpt2', gpt2), ('llama', llama)):
    if all(m[k] == v for k, v in wanted.items()):
      if family == 'gpt2' and m.n_kv_heads != m.n_heads:
        raise ConfigError(f'config.model.n_kv_heads={m.n_kv_heads}: GPT-2 has no grouped-query '
                          'attention')
      if not m.causal:
        raise ConfigError('config.model.causal=False: only causal language models export')
      return family
  raise ConfigError('config.model (positions, norm, mlp, use_bias) = '
                    f'({m.positions}, {m.norm}, {m.mlp}, {m.use_bias}) is neither GPT-2 '
                    '(learned, layernorm, gelu, True) nor Llama (rope, rmsnorm, swiglu, False)')


def hf_config(m, family: str, tokenizer, dtype: str) -> dict:
  """A Hugging Face config.json for the `lm` model config `m`."""
  special = {f'{k}_token_id': getattr(tokenizer, f'{k}_id', None) for k in ('bos', 'eos', 'pad')}
  if family == 'gpt2':
    return dict(architectures=['GPT2LMHeadModel'], model_type='gpt2', vocab_size=m.vocab_size,
                n_layer=m.n_layers, n_embd=m.d_model, n_head=m.n_heads, n_inner=m.d_ff,
                n_positions=m.max_len, activation_function='gelu_new',
                layer_norm_epsilon=m.norm_eps, tie_word_embeddings=m.tie_embeddings,
                attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0, dtype=dtype, **special)
  return dict(architectures=['LlamaForCausalLM'], model_type='llama', vocab_size=m.vocab_size,
              num_hidden_layers=m.n_layers, hidden_size=m.d_model,
              num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads,
              head_dim=m.d_model // m.n_heads, intermediate_size=m.d_ff,
              max_position_embeddings=m.max_len, hidden_act='silu', rms_norm_eps=m.norm_eps,
              rope_parameters={'rope_type': 'default', 'rope_theta': m.rope_theta},
              attention_bias=False, mlp_bias=False, tie_word_embeddings=m.tie_embeddings,
              dtype=dtype, **special)


def hf_shapes(table: dict[str, Source], shapes: dict[str, tuple]) -> dict[str, tuple]:
  """The shape of every Hugging Face tensor of the table, given the `lm` parameters' shapes."""
  rows, widths, transposed = {}, {}, {}
  for path, source in table.items():
    shape = shapes[path]
    dims = shape[int(source.stacked):]
    n_out = math.prod(dims[source.n_in + (len(source.pieces) > 1):])
    for layer in range(shape[0]) if source.stacked else [None]:
      for name, offset in source.pieces:
        name = name.format(layer)
        widths[name] = max(widths.get(name, 0), offset + n_out)
        rows[name] = math.prod(dims[:source.n_in]) if source.n_in else None
        transposed[name] = source.transposed
  return {n: (widths[n],) if rows[n] is None else
          (widths[n], rows[n]) if transposed[n] else (rows[n], widths[n]) for n in widths}

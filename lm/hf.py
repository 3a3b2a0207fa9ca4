"""Hugging Face GPT-2 / Llama checkpoints and tokenizers, in and out.

    python -m lm.hf import --from HF_DIR --workdir RUN [--mesh_shape 1,2,4,1]
    python -m lm.hf export --workdir RUN --out HF_DIR [--dtype bfloat16] [--max_shard_size 2GB]

Each family is a table: for every parameter of `lm.model.Transformer`, the Hugging Face
tensors it is made of (`Source`). The same table reads (import) and writes (export), so the
two cannot disagree. Import reads every device's slice of every parameter straight from the
safetensors files (`safe_open(...).get_slice`, `jax.make_array_from_callback`), never the
whole model on one host. Layouts: GPT-2's Conv1D stores (in, out) and fuses q, k, v in one
`c_attn`; Llama's `nn.Linear` stores (out, in); both RoPE forms are the half-split one of
`lm.model.rotary`.
"""
import argparse
import contextlib
import dataclasses
import json
import math
import re
import resource
import sys

import jax
import ml_collections
import numpy as np
import safetensors
import safetensors.numpy
from etils import epath

from lm import config as config_lib
from lm import peft, runs, sharding, steps
from lm.config import ConfigError
from lm.data import tokenizers

ARCHITECTURES = {'GPT2LMHeadModel': 'gpt2', 'LlamaForCausalLM': 'llama'}
INDEX = 'model.safetensors.index.json'


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


# ----------------------------------------------------------------------------- configs


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


# ----------------------------------------------------------------------------- reading


class SafetensorsFiles:
  """The tensors of a model directory's safetensors file(s), by name, opened lazily."""

  def __init__(self, directory: epath.Path, stack: contextlib.ExitStack):
    self.directory, self._stack, self._open = directory, stack, {}
    if (directory / INDEX).exists():
      self.files = json.loads((directory / INDEX).read_text())['weight_map']
    elif (directory / 'model.safetensors').exists():
      with safetensors.safe_open(directory / 'model.safetensors', 'np') as f:
        self.files = {name: 'model.safetensors' for name in f.keys()}
    else:
      raise ConfigError(f'--from={directory}: no model.safetensors or {INDEX} (PyTorch .bin '
                        'weights are not read: save them with safe_serialization)')

  def name(self, name: str) -> str | None:
    """The stored name (checkpoints of GPT2Model lack the 'transformer.' prefix)."""
    for candidate in (name, name.removeprefix('transformer.')):
      if candidate in self.files:
        return candidate
    return None

  def slice(self, name: str):
    file = self.files[name]
    if file not in self._open:
      self._open[file] = self._stack.enter_context(
          safetensors.safe_open(self.directory / file, 'np'))
    return self._open[file].get_slice(name)


def _flat_indices(ranges: list[range], dims: tuple[int, ...]) -> np.ndarray:
  """Row-major flat indices into `dims` of the block `ranges` (shape: their lengths)."""
  if not dims:
    return np.zeros((), np.int64)
  return np.ravel_multi_index(np.meshgrid(*[np.array(r) for r in ranges], indexing='ij'), dims)


def _read_block(tensor, rows: np.ndarray, cols: np.ndarray, source: Source) -> np.ndarray:
  """tensor[rows, cols] (input, output axes; rows of shape *in, cols of shape *out) reading
  only their bounding box from the file."""
  if source.n_in == 0:
    lo, hi = int(cols.min()), int(cols.max()) + 1
    return tensor[lo:hi][cols - lo]
  (r0, r1), (c0, c1) = ((int(a.min()), int(a.max()) + 1) for a in (rows, cols))
  box = tensor[c0:c1, r0:r1].T if source.transposed else tensor[r0:r1, c0:c1]
  picked = box[np.ix_(rows.ravel() - r0, cols.ravel() - c0)]
  return picked.reshape(rows.shape + cols.shape)


def read_slice(files: SafetensorsFiles, source: Source, shape: tuple[int, ...], index,
               dtype) -> np.ndarray:
  """The block `index` (slices over `shape`, the `lm` parameter's shape) of one parameter."""
  ranges = [range(*s.indices(n)) for s, n in zip(index, shape)]
  layers = ranges.pop(0) if source.stacked else [None]
  dims = shape[int(source.stacked):]
  pieces = source.pieces
  in_dims, in_ranges = dims[:source.n_in], ranges[:source.n_in]
  rest, rest_ranges = dims[source.n_in:], ranges[source.n_in:]
  if len(pieces) > 1:
    pieces = [pieces[p] for p in rest_ranges[0]]
    rest, rest_ranges = rest[1:], rest_ranges[1:]
  rows, cols = _flat_indices(in_ranges, in_dims), _flat_indices(rest_ranges, rest)
  out = []
  for layer in layers:
    blocks = [_read_block(files.slice(files.name(name.format(layer))), rows, cols + offset,
                          source).astype(dtype) for name, offset in pieces]
    out.append(np.stack(blocks, axis=source.n_in) if len(source.pieces) > 1 else blocks[0])
  return np.stack(out) if source.stacked else out[0]


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


def check_tensors(files: SafetensorsFiles, table: dict[str, Source], abstract: dict,
                  where: str) -> None:
  """Every tensor the table needs is there, with the shape the config implies."""
  for name, want in hf_shapes(table, {k: v.shape for k, v in abstract.items()}).items():
    stored = files.name(name)
    if stored is None:
      raise ConfigError(f'{where}: tensor {name} is missing from the safetensors files')
    got = tuple(files.slice(stored).get_shape())
    if got != want:
      raise ConfigError(f'{where}: tensor {stored} has shape {list(got)}, the config implies '
                        f'{list(want)}')


def read_params(files: SafetensorsFiles, table: dict[str, Source], abstract: dict) -> dict:
  """Every parameter as a global jax.Array on its sharding, each device's block read from
  the files on its own."""
  arrays = {}
  for path, source in table.items():
    leaf = abstract[path]
    arrays[path] = jax.make_array_from_callback(
        leaf.shape, leaf.sharding,
        lambda index, s=source, a=leaf: read_slice(files, s, a.shape, index, a.dtype))
  return arrays


def _flatten(tree: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}/'))
    else:
      out[prefix + k] = v
  return out


def _unflatten(flat: dict) -> dict:
  tree: dict = {}
  for path, v in flat.items():
    *parents, leaf = path.split('/')
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def import_model(hf_dir: str, workdir: str, mesh_shape=(1, 1, 1, 1),
                 param_dtype: str = 'float32') -> dict:
  """Writes a run directory from a Hugging Face model directory; returns a summary (the
  family, parameter count, peak host memory) and the params ('params', on the mesh)."""
  directory = epath.Path(hf_dir)
  where = f'--from={hf_dir}'
  if (epath.Path(workdir) / 'checkpoints').exists():   # before reading anything
    raise ConfigError(f'--workdir={workdir} already holds checkpoints')
  if not (directory / 'config.json').exists():
    raise ConfigError(f'{where}: no config.json')
  hf = json.loads((directory / 'config.json').read_text())
  family, model = lm_model_config(hf, f'{directory / "config.json"}')
  tokenizer = tokenizers.HuggingFaceTokenizer.from_path(str(directory))
  if tokenizer.vocab_size > model['vocab_size']:
    raise ConfigError(f'{where}: the tokenizer has {tokenizer.vocab_size} tokens, the embedding '
                      f'only {model["vocab_size"]} rows (vocab_size)')
  config = config_lib.get_base_config()
  config.model.update(model, dtype='float32', param_dtype=param_dtype, scan_layers=True)
  config.data.update(tokenizer=f'hf:{directory.resolve()}',
                     seq_len=min(config.data.seq_len, model['max_len']))
  config = config_lib.resolve(config, tokenizer.vocab_size).unlock()
  config_lib.validate(config, 1)   # the run as saved (on any number of devices)
  devices = math.prod(mesh_shape)
  on_mesh = ml_collections.ConfigDict(config.to_dict())
  on_mesh.mesh.shape = tuple(mesh_shape)
  on_mesh.train.update(batch_size=devices, eval_batch_size=devices)   # not used here
  config_lib.validate(on_mesh, devices)   # the model divides over --mesh_shape
  program = steps.build(on_mesh, sharding.make_mesh(tuple(mesh_shape),
                                                    jax.devices()[:devices]))
  abstract = _flatten(program.abstract_state.params)
  table = TABLES[family](program.model_config)
  if set(table) != set(abstract):   # the table and lm.model out of step: a bug here
    raise AssertionError(sorted(set(table) ^ set(abstract)))
  rss_at_start = _reset_peak_rss()
  with contextlib.ExitStack() as stack:
    files = SafetensorsFiles(directory, stack)
    check_tensors(files, table, abstract, where)
    params = _unflatten(read_params(files, table, abstract))
    jax.block_until_ready(params)
    # resident after reading: the parameters (anonymous) and the safetensors pages mapped
    # while reading (file-backed page cache, which the kernel may reclaim)
    after_read = {f'rss_{k.lower()[3:]}_after_read_mib': round(_status_mib(k) or 0.0, 1)
                  for k in ('RssAnon', 'RssFile')}
    runs.write(epath.Path(workdir), config, params, tokenizer, step=0)
  return {'family': family, 'parameters': sum(x.size for x in jax.tree.leaves(params)),
          'rss_at_start_mib': round(rss_at_start, 1), **after_read,
          'peak_host_memory_mib': round(_peak_rss_mib(), 1),
          'params': params}


def _status_mib(field: str) -> float | None:
  """A memory line of /proc/self/status (Linux), in MiB."""
  try:
    for line in epath.Path('/proc/self/status').read_text().splitlines():
      if line.startswith(field + ':'):
        return int(line.split()[1]) / 1024
  except OSError:
    pass
  return None


def _reset_peak_rss() -> float:
  """Restarts the kernel's count of peak resident memory (VmHWM) so that the import's own
  peak is measured; returns the resident memory now, in MiB."""
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
  except OSError:
    pass
  return _status_mib('VmRSS') or 0.0


def _peak_rss_mib() -> float:
  """Peak resident memory (since the last reset where Linux allows it), in MiB."""
  peak = _status_mib('VmHWM')
  return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------- writing


def hf_tensors(params: dict, table: dict[str, Source], dtype) -> dict[str, np.ndarray]:
  """The Hugging Face tensors of `lm` parameters (as host arrays), by the same table."""
  flat = {k: np.asarray(jax.device_get(v)) for k, v in _flatten(params).items()}
  tensors = {name: np.zeros(shape, dtype) for name, shape in
             hf_shapes(table, {k: v.shape for k, v in flat.items()}).items()}
  for path, source in table.items():
    for layer, value in enumerate(flat[path]) if source.stacked else [(None, flat[path])]:
      n_in = math.prod(value.shape[:source.n_in])
      for p, (name, offset) in enumerate(source.pieces):
        block = np.take(value, p, axis=source.n_in) if len(source.pieces) > 1 else value
        block = block.reshape(n_in, -1) if source.n_in else block.reshape(-1)
        target, width = tensors[name.format(layer)], block.shape[-1]
        if source.n_in == 0:
          target[offset:offset + width] = block
        elif source.transposed:
          target[offset:offset + width, :] = block.T
        else:
          target[:, offset:offset + width] = block
  return tensors


def write_safetensors(tensors: dict[str, np.ndarray], out: epath.Path,
                      max_shard_bytes: int) -> list[str]:
  """model.safetensors, or model-0000i-of-0000n.safetensors plus the index when the tensors
  exceed max_shard_bytes; returns the file names."""
  shards, size = [[]], 0
  for name in sorted(tensors):
    nbytes = tensors[name].nbytes
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += nbytes
  names = (['model.safetensors'] if len(shards) == 1 else
           [f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors' for i in range(len(shards))])
  for file, shard in zip(names, shards):
    safetensors.numpy.save_file({n: np.ascontiguousarray(tensors[n]) for n in shard},
                                str(out / file), metadata={'format': 'pt'})
  if len(shards) > 1:
    index = {'metadata': {'total_size': sum(t.nbytes for t in tensors.values())},
             'weight_map': {n: f for f, shard in zip(names, shards) for n in shard}}
    (out / INDEX).write_text(json.dumps(index, indent=2))
  return names


def write_tokenizer(tokenizer, out: epath.Path, max_len: int) -> None:
  """tokenizer.json + tokenizer_config.json, for transformers.AutoTokenizer."""
  if not isinstance(tokenizer, tokenizers.HuggingFaceTokenizer):
    raise ConfigError(f'the run\'s {tokenizer.kind!r} tokenizer has no tokenizer.json form; '
                      'train with config.data.tokenizer=hf:PATH, or export with --no_tokenizer')
  (out / 'tokenizer.json').write_bytes(tokenizer.spec)
  names = {f'{k}_token': tokenizer.token(getattr(tokenizer, f'{k}_id')) for k in tokenizer.SPECIAL}
  (out / 'tokenizer_config.json').write_text(json.dumps(
      {'tokenizer_class': 'PreTrainedTokenizerFast', 'model_max_length': max_len,
       **{k: v for k, v in names.items() if v is not None}}, indent=2))


def export_model(workdir: str, out: str, dtype: str = 'float32',
                 max_shard_bytes: int = 2 << 30, with_tokenizer: bool = True) -> list[str]:
  """Writes a Hugging Face model directory from a run (LoRA adapters merged first)."""
  run = runs.load(workdir, '--workdir')
  family = family_of(run.config.model)
  params = run.variables['params']
  if 'lora' in run.variables:
    params = peft.merge_lora(params, run.variables['lora'], run.config.lora.alpha,
                             run.config.lora.rank)
  params = {k: v for k, v in params.items() if k != 'score_head'}
  target = epath.Path(out)
  target.mkdir(parents=True, exist_ok=True)
  if with_tokenizer:
    write_tokenizer(run.tokenizer, target, run.model_config.max_len)
  table = TABLES[family](run.model_config)
  np_dtype = {'float32': np.float32, 'bfloat16': jax.numpy.bfloat16,
              'float16': np.float16}[dtype]
  files = write_safetensors(hf_tensors(params, table, np_dtype), target, max_shard_bytes)
  config = hf_config(run.config.model, family, run.tokenizer, dtype)
  (target / 'config.json').write_text(json.dumps(config, indent=2))
  return files


def _size(text: str) -> int:
  match = re.fullmatch(r'(\d+(?:\.\d+)?)\s*([KMG]?B)', text.strip().upper())
  if not match:
    raise ConfigError(f'--max_shard_size={text!r} is not a size like 500MB or 2GB')
  return int(float(match[1]) * {'B': 1, 'KB': 1 << 10, 'MB': 1 << 20, 'GB': 1 << 30}[match[2]])


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(prog='python -m lm.hf', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest='command', required=True)
  imp = commands.add_parser('import', help='a Hugging Face model directory -> a run directory')
  imp.add_argument('--from', dest='hf_dir', required=True, help='Hugging Face model directory')
  imp.add_argument('--workdir', required=True, help='the run directory to write')
  imp.add_argument('--mesh_shape', default='1,1,1,1',
                   help='data,fsdp,tensor,stage sizes of the mesh the parameters are read onto')
  imp.add_argument('--param_dtype', default='float32', choices=('float32', 'bfloat16'))
  exp = commands.add_parser('export', help='a run directory -> a Hugging Face model directory')
  exp.add_argument('--workdir', required=True, help='run directory or RUN/checkpoints/STEP')
  exp.add_argument('--out', required=True, help='the Hugging Face model directory to write')
  exp.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16', 'float16'))
  exp.add_argument('--max_shard_size', default='2GB', help='split the safetensors above this')
  exp.add_argument('--no_tokenizer', action='store_true', help='write the model only')
  args = parser.parse_args(argv)
  try:
    if args.command == 'import':
      shape = tuple(int(s) for s in args.mesh_shape.split(','))
      summary = import_model(args.hf_dir, args.workdir, shape, args.param_dtype)
      summary.pop('params')
      print(json.dumps(summary))
    else:
      files = export_model(args.workdir, args.out, args.dtype, _size(args.max_shard_size),
                           not args.no_tokenizer)
      print(f'exported {args.out}: {", ".join(files)}')
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  main(sys.argv[1:])

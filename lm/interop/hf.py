"""Hugging Face GPT-2 / Llama checkpoints and tokenizers, in and out.

    python -m lm.hf import --from HF_DIR --workdir RUN [--mesh_shape 1,2,4,1]
    python -m lm.hf export --workdir RUN --out HF_DIR [--dtype bfloat16] [--max_shard_size 2GB]

The per-family tables of `lm/interop/hf_layout.py` say which Hugging Face tensors make each `lm`
parameter; import and export both read them, so the two cannot disagree. Import reads every
device's slice of every parameter straight from the safetensors files
(`safe_open(...).get_slice`, `jax.make_array_from_callback`), never the whole model on one
host.
"""
import contextlib
import json
import math
import resource

import jax
import ml_collections
import numpy as np
import safetensors
import safetensors.numpy
from etils import epath
from flax import traverse_util

from lm import config as config_lib
from lm.compress import svd
from lm.config import ConfigError, RunDir
from lm.data import tokenizers
from lm.interop import hf_layout as layout
from lm.parallel import sharding
from lm.training import runs, steps

INDEX = 'model.safetensors.index.json'


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


def _read_block(tensor, rows: np.ndarray, cols: np.ndarray, source: layout.Source) -> np.ndarray:
  """tensor[rows, cols] (input, output axes; rows of shape *in, cols of shape *out) reading
  only their bounding box from the file."""
  if source.n_in == 0:
    lo, hi = int(cols.min()), int(cols.max()) + 1
    return tensor[lo:hi][cols - lo]
  (r0, r1), (c0, c1) = ((int(a.min()), int(a.max()) + 1) for a in (rows, cols))
  box = tensor[c0:c1, r0:r1].T if source.transposed else tensor[r0:r1, c0:c1]
  picked = box[np.ix_(rows.ravel() - r0, cols.ravel() - c0)]
  return picked.reshape(rows.shape + cols.shape)


def read_slice(files: SafetensorsFiles, source: layout.Source, shape: tuple[int, ...], index,
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


def check_tensors(files: SafetensorsFiles, table: dict[str, layout.Source], abstract: dict,
                  where: str) -> None:
  """Every tensor the table needs is there, with the shape the config implies."""
  for name, want in layout.hf_shapes(table, {k: v.shape for k, v in abstract.items()}).items():
    stored = files.name(name)
    if stored is None:
      raise ConfigError(f'{where}: tensor {name} is missing from the safetensors files')
    got = tuple(files.slice(stored).get_shape())
    if got != want:
      raise ConfigError(f'{where}: tensor {stored} has shape {list(got)}, the config implies '
                        f'{list(want)}')


def read_params(files: SafetensorsFiles, table: dict[str, layout.Source], abstract: dict) -> dict:
  """Every parameter as a global jax.Array on its sharding, each device's block read from
  the files on its own."""
  arrays = {}
  for path, source in table.items():
    leaf = abstract[path]
    arrays[path] = jax.make_array_from_callback(
        leaf.shape, leaf.sharding,
        lambda index, s=source, a=leaf: read_slice(files, s, a.shape, index, a.dtype))
  return arrays


def import_model(hf_dir: str, workdir: str, mesh_shape=(1, 1, 1, 1),
                 param_dtype: str = 'float32') -> dict:
  """Writes a run directory from a Hugging Face model directory; returns a summary (the
  family, parameter count, peak host memory) and the params ('params', on the mesh)."""
  directory = epath.Path(hf_dir)
  where = f'--from={hf_dir}'
  if RunDir(workdir).checkpoints.exists():   # before reading anything
    raise ConfigError(f'--workdir={workdir} already holds checkpoints')
  if not (directory / 'config.json').exists():
    raise ConfigError(f'{where}: no config.json')
  hf = json.loads((directory / 'config.json').read_text())
  family, model = layout.lm_model_config(hf, f'{directory / "config.json"}')
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
  abstract = traverse_util.flatten_dict(program.abstract_state.params, sep='/')
  table = layout.TABLES[family](program.model_config)
  if set(table) != set(abstract):   # the table and lm.model out of step: a bug here
    raise AssertionError(sorted(set(table) ^ set(abstract)))
  rss_at_start = _reset_peak_rss()
  with contextlib.ExitStack() as stack:
    files = SafetensorsFiles(directory, stack)
    check_tensors(files, table, abstract, where)
    params = traverse_util.unflatten_dict(read_params(files, table, abstract), sep='/')
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


def hf_tensors(params: dict, table: dict[str, layout.Source], dtype) -> dict[str, np.ndarray]:
  """The Hugging Face tensors of `lm` parameters (as host arrays), by the same table."""
  flat = {k: np.asarray(jax.device_get(v))
          for k, v in traverse_util.flatten_dict(params, sep='/').items()}
  tensors = {name: np.zeros(shape, dtype) for name, shape in
             layout.hf_shapes(table, {k: v.shape for k, v in flat.items()}).items()}
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
  """Writes a Hugging Face model directory from a run (LoRA adapters merged, low-rank kernels
  multiplied out, quantized ones dequantized first)."""
  run = runs.load(workdir, '--workdir')
  family = layout.family_of(run.config.model)
  params = svd.folded(jax.device_get(runs.merged_params(run)))
  if 'layers_0' in params:   # unrolled layers: stacked, as the tables read them
    unrolled = [params.pop(f'layers_{i}') for i in range(run.model_config.n_layers)]
    params['layers'] = jax.tree.map(lambda *layers: np.stack(layers), *unrolled)
  params = {k: v for k, v in params.items() if k != 'score_head'}
  target = epath.Path(out)
  target.mkdir(parents=True, exist_ok=True)
  if with_tokenizer:
    write_tokenizer(run.tokenizer, target, run.model_config.max_len)
  table = layout.TABLES[family](run.model_config)
  np_dtype = {'float32': np.float32, 'bfloat16': jax.numpy.bfloat16,
              'float16': np.float16}[dtype]
  files = write_safetensors(hf_tensors(params, table, np_dtype), target, max_shard_bytes)
  config = layout.hf_config(run.config.model, family, run.tokenizer, dtype)
  (target / 'config.json').write_text(json.dumps(config, indent=2))
  return files

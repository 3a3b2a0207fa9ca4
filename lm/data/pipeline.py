"""Grain pipelines from documents to fixed-length training and evaluation batches.

'window' packing tokenizes a split into one stream (documents joined, with an EOS between
them if asked) and cuts windows of seq_len + 1 tokens from it: training windows start
anywhere on a grid of `window_stride` and are drawn in a seeded shuffle, epoch after epoch;
evaluation windows tile the stream in order. The shuffle is over global batches, and every
process takes its own rows of each, so a run sees the same data whatever its process count.
'pack' streams documents (for corpora too large to hold) through Grain's
concatenate-then-split packing, each process reading its own documents.

Batches are dicts of int32 arrays: inputs_BxL and targets_BxL (inputs shifted by one).
"""
import dataclasses
import fcntl
import os
import tempfile
from typing import Any

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from lm import distributed
from lm.config import ConfigError
from lm.data import local_text, tokenizers

SHAKESPEARE = epath.Path(__file__).parent / 'tinyshakespeare.txt'
EVAL_SPLITS = ('validation', 'test')


@dataclasses.dataclass
class Data:
  tokenizer: Any
  train: grain.DatasetIterator             # local batches; checkpointable (get_state / set_state)
  eval: dict[str, list[dict[str, np.ndarray]]]   # 'validation' / 'test' -> local batches


def check_text_file(path: epath.Path, field: str) -> None:
  """A clear error for a missing, empty or non-UTF-8 corpus file."""
  if not path.exists():
    raise ConfigError(f'{field}: file not found: {path}')
  raw = path.read_bytes()
  if not raw.strip():
    raise ConfigError(f'{field}: file is empty: {path}')
  try:
    raw.decode('utf-8')
  except UnicodeDecodeError as e:
    raise ConfigError(f'{field}: {path} is not UTF-8 text (bad byte at offset {e.start})') from None


def documents(data_cfg) -> dict[str, grain.MapDataset]:
  """Split name -> random-access dataset of document strings, read through TFDS."""
  kind, _, name = data_cfg.source.partition(':')
  data_dir = data_cfg.tfds_data_dir or None
  if kind == 'shakespeare':
    kind, name = 'text', str(SHAKESPEARE)
  if kind in ('text', 'jsonl'):
    check_text_file(epath.Path(name), 'config.data.source')
    builder_config = local_text.LocalTextConfig(path=name, fmt=kind, text_key=data_cfg.text_key,
                                                fractions=tuple(data_cfg.split_fractions))
    # one process of this machine prepares the files; the others (parallel sweep points)
    # wait for it and then read them
    lock = os.path.join(tempfile.gettempdir(), f'lm-tfds-{builder_config.name}.lock')
    with open(lock, 'w') as f:
      fcntl.flock(f, fcntl.LOCK_EX)
      builder = local_text.LocalText(config=builder_config, data_dir=data_dir,
                                     file_format='array_record')
      tfds.display_progress_bar(False)   # one small file: its per-split bars are only noise
      builder.download_and_prepare()
    sources = {split: builder.as_data_source(split) for split in local_text.SPLITS}
    key = 'text'
  elif kind == 'tfds':
    sources = {split: tfds.data_source(name, split=tfds_split, data_dir=data_dir,
                                       download=True)
               for split, tfds_split in zip(local_text.SPLITS, data_cfg.tfds_splits)}
    key = data_cfg.text_key
  else:
    raise ConfigError(f"config.data.source={data_cfg.source!r} must be 'shakespeare', "
                      "'text:PATH', 'jsonl:PATH' or 'tfds:NAME'")
  return {split: grain.MapDataset.source(src).map(lambda ex: _as_text(ex[key]))
          for split, src in sources.items()}


def _as_text(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def token_stream(docs: grain.MapDataset, tokenizer, add_eos: bool) -> np.ndarray:
  eos = [np.array([tokenizer.eos_id], np.int32)] if add_eos else []
  pieces = [piece for doc in docs for piece in [tokenizer.encode(doc), *eos]]
  return np.concatenate(pieces) if pieces else np.zeros([0], np.int32)


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
  w = tokens[starts[:, None] + np.arange(seq_len + 1)]
  return {'inputs': w[:, :-1], 'targets': w[:, 1:]}


def window_batches(tokens: np.ndarray, *, seq_len: int, stride: int, batch_size: int,
                   seed: int | None, process_index: int, process_count: int) -> grain.MapDataset:
  """Global batches of windows (shuffled and repeated when a seed is given); each process
  keeps its own rows."""
  starts = grain.MapDataset.range(0, len(tokens) - seq_len, stride)
  if seed is not None:
    starts = starts.shuffle(seed).repeat()
  local = batch_size // process_count
  rows = slice(process_index * local, (process_index + 1) * local)
  return (starts.batch(batch_size, drop_remainder=True)
          .map(lambda s: _windows(tokens, np.asarray(s)[rows], seq_len)))


def packed_batches(docs: grain.MapDataset, tokenizer, *, seq_len: int, batch_size: int,
                   add_eos: bool, seed: int | None, process_index: int,
                   process_count: int) -> grain.IterDataset:
  """Documents tokenized, concatenated and split into seq_len + 1 tokens, batched."""
  docs = docs[process_index::process_count]
  if seed is not None:
    docs = docs.shuffle(seed).repeat()
  eos = [tokenizer.eos_id] if add_eos else []
  tokens = docs.map(
      lambda d: {'tokens': np.concatenate([tokenizer.encode(d), eos]).astype(np.int32)})
  packed = grain.experimental.ConcatThenSplitIterDataset(
      tokens.to_iter_dataset(), length_struct={'tokens': seq_len + 1})
  return packed.batch(batch_size // process_count, drop_remainder=True).map(
      lambda b: {'inputs': b['tokens'][:, :-1], 'targets': b['tokens'][:, 1:]})


def make_data(config, workdir: epath.Path | None) -> Data:
  """Tokenizer (saved in / reloaded from the workdir), training iterator and eval batches."""
  d, t = config.data, config.train
  p, n = jax.process_index(), jax.process_count()
  # Process 0 prepares the TFDS files and builds the tokenizer before the others read both,
  # so that every process has the same vocabulary (SentencePiece training is threaded).
  if p != 0:
    distributed.barrier('tokenizer built')
  docs = documents(d)
  texts = docs['train'] if d.tokenizer.startswith('spm') else _all(docs)
  tokenizer = tokenizers.load_or_build(d.tokenizer, texts, d.spm_vocab_size,
                                       workdir / 'tokenizer.json' if workdir else None)
  if p == 0:
    distributed.barrier('tokenizer built')
  if d.add_eos and tokenizer.eos_id is None:
    raise ConfigError(f'config.data.add_eos=True but the {d.tokenizer!r} tokenizer has no EOS')
  eval_batches = {}
  if d.packing == 'window':
    streams = {split: token_stream(docs[split], tokenizer, d.add_eos) for split in docs}
    for split, tokens in streams.items():
      if len(tokens) <= d.seq_len:
        raise ConfigError(f'config.data.source={d.source!r}: the {split} split has '
                          f'{len(tokens)} tokens, fewer than one sequence '
                          f'(config.data.seq_len={d.seq_len} + 1)')
    train = window_batches(streams['train'], seq_len=d.seq_len, stride=d.window_stride,
                           batch_size=t.batch_size, seed=t.seed, process_index=p,
                           process_count=n)
    for split in EVAL_SPLITS:
      ds = window_batches(streams[split], seq_len=d.seq_len, stride=d.seq_len,
                          batch_size=t.eval_batch_size, seed=None, process_index=p,
                          process_count=n)
      eval_batches[split] = [ds[i] for i in range(min(len(ds), t.eval_batches))]
    train = train.to_iter_dataset()
  else:
    pack = dict(seq_len=d.seq_len, add_eos=d.add_eos, process_index=p, process_count=n)
    train = packed_batches(docs['train'], tokenizer, batch_size=t.batch_size, seed=t.seed, **pack)
    for split in EVAL_SPLITS:
      it = iter(packed_batches(docs[split], tokenizer, batch_size=t.eval_batch_size, seed=None,
                               **pack))
      eval_batches[split] = [b for _, b in zip(range(t.eval_batches), it)]
  for split, batches in eval_batches.items():
    if not batches:
      raise ConfigError(f'config.data.source={d.source!r}: the {split} split is shorter than '
                        f'one evaluation batch (config.train.eval_batch_size={t.eval_batch_size} '
                        f'x seq_len {d.seq_len})')
  return Data(tokenizer=tokenizer, train=iter(train), eval=eval_batches)


def _all(docs: dict[str, grain.MapDataset]):
  for split in local_text.SPLITS:
    yield from docs[split]


"""Grain pipelines from documents to fixed-length training and evaluation batches.

'window' packing tokenizes each split once into a token file under `config.data.dir`
(documents joined, with an EOS between them if asked; uint16 or uint32 by vocabulary size),
memory-maps it, and cuts windows of seq_len + 1 tokens from it: training windows start
anywhere on a grid of `window_stride` and are drawn in a seeded shuffle, epoch after epoch;
evaluation windows tile the stream in order. 'pack' streams documents (for corpora too large
to tokenize ahead) through Grain's concatenate-then-split packing.

Batches are global: every process keeps its own rows of each (`rows`, from the batch
sharding), so a run sees the same data whatever its process count, and processes whose
devices hold the same rows (tensor or stage axes across hosts) read the same rows.
Evaluation batches are the same on every process; in 'pack' mode the last one is padded
with zero-weight rows.

Batches are dicts of int32 arrays inputs_BxL and targets_BxL (inputs shifted by one), and
float32 weights_BxL where rows may be padding.
"""
import dataclasses
import mmap
import os
from collections.abc import Callable
from typing import Any

import grain
import numpy as np
import tqdm
from etils import epath

from lm.config import ConfigError, RunDir
from lm.data import sources, tokenizers
from lm.parallel import distributed

EVAL_SPLITS = ('validation', 'test')
Rows = Callable[[int], slice]   # global batch size -> this process's rows


@dataclasses.dataclass
class Data:
  tokenizer: Any
  train: grain.DatasetIterator             # local batches; checkpointable (get_state / set_state)
  eval: dict[str, list[dict[str, np.ndarray]]]   # 'validation' / 'test' -> local batches
  examples: dict[str, list[dict]] | None = None  # post-training JSONL objects of each split


def all_rows(batch_size: int) -> slice:
  return slice(0, batch_size)


def token_file(docs: grain.MapDataset, tokenizer, add_eos: bool, path: epath.Path) -> np.ndarray:
  """The split's token stream, memory-mapped from `path` (written there first if missing)."""
  dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
  if not path.exists():
    eos = np.array([tokenizer.eos_id] if add_eos else [], dtype)
    tmp = path.with_name(f'{path.name}.tmp{os.getpid()}')
    with open(tmp, 'wb') as f:
      for doc in tqdm.tqdm(docs, total=len(docs), desc=f'tokenizing {path.name}', leave=False,
                           disable=None, mininterval=2.0):
        f.write(tokenizer.encode(doc).astype(dtype).tobytes())
        f.write(eos.tobytes())
    tmp.rename(path)   # atomic: a reader never sees a partial file
  if path.stat().length == 0:
    return np.zeros([0], dtype)
  with open(path, 'rb') as f:
    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
  mapped.madvise(mmap.MADV_RANDOM)   # windows are drawn at random: no read-ahead
  return np.frombuffer(mapped, dtype)


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
  w = tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)
  return {'inputs': w[:, :-1], 'targets': w[:, 1:]}


def window_batches(tokens: np.ndarray, *, seq_len: int, stride: int, batch_size: int,
                   seed: int | None, rows: slice) -> grain.MapDataset:
  """Global batches of windows (shuffled and repeated when a seed is given); this process
  keeps `rows` of each."""
  starts = grain.MapDataset.range(0, len(tokens) - seq_len, stride)
  if seed is not None:
    starts = starts.shuffle(seed).repeat()
  return (starts.batch(batch_size, drop_remainder=True)
          .map(lambda s: _windows(tokens, np.asarray(s)[rows], seq_len)))


def packed_batches(docs: grain.MapDataset, tokenizer, *, seq_len: int, batch_size: int,
                   add_eos: bool, seed: int | None, shard: int = 0, shards: int = 1,
                   drop_remainder: bool = True) -> grain.IterDataset:
  """Documents tokenized, concatenated and split into seq_len + 1 tokens, in batches of
  batch_size rows; shard i of n reads documents i, i + n, ..."""
  docs = docs[shard::shards]
  if seed is not None:
    docs = docs.shuffle(seed).repeat()
  eos = [tokenizer.eos_id] if add_eos else []
  tokens = docs.map(
      lambda d: {'tokens': np.concatenate([tokenizer.encode(d), eos]).astype(np.int32)})
  packed = grain.experimental.ConcatThenSplitIterDataset(
      tokens.to_iter_dataset(), length_struct={'tokens': seq_len + 1})
  return packed.batch(batch_size, drop_remainder=drop_remainder).map(
      lambda b: {'inputs': b['tokens'][:, :-1], 'targets': b['tokens'][:, 1:]})


def _padded(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
  """`batch` filled up to `size` rows, with weights 0 on the added rows."""
  n, length = batch['inputs'].shape
  weights = np.zeros((size, length), np.float32)
  weights[:n] = 1.0
  pad = lambda x: np.concatenate([x, np.zeros((size - n, length), x.dtype)])
  return {'inputs': pad(batch['inputs']), 'targets': pad(batch['targets']), 'weights': weights}


def _eval_batches(corpus_split, streams, split: str, d, t, tokenizer, rows: slice):
  if d.packing == 'window':
    ds = window_batches(streams[split], seq_len=d.seq_len, stride=d.seq_len,
                        batch_size=t.eval_batch_size, seed=None, rows=rows)
    return [ds[i] for i in range(min(len(ds), t.eval_batches))]
  # every process packs the split's first documents alike and keeps its rows: the same
  # number of batches everywhere, and a loss that does not depend on the process count
  it = iter(packed_batches(corpus_split, tokenizer, seq_len=d.seq_len, add_eos=d.add_eos,
                           batch_size=t.eval_batch_size, seed=None, drop_remainder=False))
  batches = [_padded(b, t.eval_batch_size) for _, b in zip(range(t.eval_batches), it)]
  return [{k: v[rows] for k, v in b.items()} for b in batches]


def text_data(config, workdir: epath.Path | None, rows: Rows = all_rows,
              tokenizer_from: epath.Path | None = None) -> Data:
  """`pipeline.make_data` for config.data.format='text': windows of a token file or packed
  documents."""
  d, t = config.data, config.train

  def prepare():
    corpus = sources.documents(d)
    path = RunDir(workdir).tokenizer if workdir else None
    if path and tokenizer_from and not path.exists():
      tokenizers.copy(RunDir(tokenizer_from).tokenizer, path)
    texts = corpus.splits['train'] if d.tokenizer.startswith('spm') else _all(corpus.splits)
    tokenizer = tokenizers.load_or_build(d.tokenizer, texts, d.spm_vocab_size, path)
    if d.add_eos and tokenizer.eos_id is None:
      raise ConfigError(f'config.data.add_eos=True but the {d.tokenizer!r} tokenizer has no EOS')
    streams = {}
    if d.packing == 'window':
      directory = sources.data_dir(d) / 'tokens'
      directory.mkdir(parents=True, exist_ok=True)
      for split, docs in corpus.splits.items():
        name = f'{corpus.name}-{split}-{tokenizer.fingerprint}{"-eos" if d.add_eos else ""}.bin'
        with sources.file_lock(sources.data_dir(d), name):
          streams[split] = token_file(docs, tokenizer, d.add_eos, directory / name)
    return corpus, tokenizer, streams

  corpus, tokenizer, streams = distributed.main_first(prepare, 'preparing the data')
  for split, tokens in streams.items():
    if len(tokens) <= d.seq_len:
      raise ConfigError(f'config.data.source={d.source!r}: the {split} split has '
                        f'{len(tokens)} tokens, fewer than one sequence '
                        f'(config.data.seq_len={d.seq_len} + 1)')
  train_rows = rows(t.batch_size)
  if d.packing == 'window':
    # windows of a memory-mapped file are cheap to cut: read them in this thread, on demand,
    # rather than with Grain's default 16 threads and 500 batches read ahead
    train = window_batches(streams['train'], seq_len=d.seq_len, stride=d.window_stride,
                           batch_size=t.batch_size, seed=t.seed, rows=train_rows
                           ).to_iter_dataset(grain.ReadOptions(num_threads=0))
  else:   # processes with the same rows read the same documents
    local = train_rows.stop - train_rows.start
    train = packed_batches(corpus.splits['train'], tokenizer, seq_len=d.seq_len,
                           batch_size=local, add_eos=d.add_eos, seed=t.seed,
                           shard=train_rows.start // local, shards=t.batch_size // local)
  eval_batches = {split: _eval_batches(corpus.splits[split], streams, split, d, t, tokenizer,
                                       rows(t.eval_batch_size)) for split in EVAL_SPLITS}
  for split, batches in eval_batches.items():
    if not batches:
      raise ConfigError(f'config.data.source={d.source!r}: the {split} split is shorter than '
                        f'one evaluation batch (config.train.eval_batch_size={t.eval_batch_size} '
                        f'x seq_len {d.seq_len})')
  return Data(tokenizer=tokenizer, train=iter(train), eval=eval_batches)


def _all(splits: dict[str, grain.MapDataset]):
  for split in ('train', *EVAL_SPLITS):
    yield from splits[split]

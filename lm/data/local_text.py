"""A TFDS builder for local text and JSONL files, with contiguous train / validation / test splits.

Plain text is cut at byte fractions (moved to the next line start), so the three splits
concatenate back to the file and share no text; each split is stored as records of whole
lines. JSONL files are cut by document count, one document per non-empty line. Records are
written in file order (shuffling disabled) as array_record, which `as_data_source()` reads
without TensorFlow. Files are read line by line: memory does not grow with the corpus.
"""
import contextlib
import hashlib
import json
from collections.abc import Iterator

import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import shuffle as tfds_shuffle

from lm.config import ConfigError

SPLITS = ('train', 'validation', 'test')
RECORD_BYTES = 1 << 16   # plain text is stored in records of whole lines, about this long
WRITE_BUFFER_BYTES = 32 << 20
KEY_SPACE = 1 << 128     # TFDS's key space: spreading keys over it spreads its temporary buckets


class LocalTextConfig(tfds.core.BuilderConfig):
  """One file, its format, and how to split it."""

  def __init__(self, *, path: str, fmt: str, text_key: str, fractions: tuple[float, ...]):
    stat = epath.Path(path).stat()
    key = json.dumps([str(epath.Path(path).resolve()), stat.length, stat.mtime, fmt, text_key,
                      list(fractions)])
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    super().__init__(name=f'{epath.Path(path).stem}-{digest}', version='1.1.0',
                     description=f'{fmt} file {path}')
    self.path, self.fmt, self.text_key, self.fractions = path, fmt, text_key, tuple(fractions)


class LocalText(tfds.core.GeneratorBasedBuilder):
  """Documents of a local text / JSONL file, split into train / validation / test."""
  VERSION = tfds.core.Version('1.1.0')

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({'text': tfds.features.Text()}),
        disable_shuffling=True, description=self.builder_config.description)

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    if cfg.fmt == 'jsonl':   # documents: non-empty lines
      total = sum(1 for line in _lines(cfg.path, 0, None) if line.strip())
      cuts, unit = _cuts(total, cfg.fractions), 'documents'
    else:                    # bytes, each cut moved to the next line start
      total = epath.Path(cfg.path).stat().length
      cuts = [_next_line_start(cfg.path, cut) for cut in _cuts(total, cfg.fractions)]
      unit = 'bytes'
    for name, start, stop in zip(SPLITS, cuts[:-1], cuts[1:]):
      if start == stop:
        raise ConfigError(f'config.data.source: {cfg.path} ({total} {unit}) leaves the {name} '
                          f'split empty with config.data.split_fractions={cfg.fractions}; use a '
                          'longer file or other fractions')
    return {name: self._generate_examples((cfg.fmt, start, stop))
            for name, start, stop in zip(SPLITS, cuts[:-1], cuts[1:])}

  def _generate_examples(self, piece: tuple[str, int, int]):
    """(key, example) of a byte range of a text file or a document range of a JSONL file; keys
    grow with the position, spread over TFDS's key space so that its temporary buckets (and
    the memory it sorts them in) stay small."""
    fmt, start, stop = piece
    return self._generate_jsonl(start, stop) if fmt == 'jsonl' else self._generate_text(start, stop)

  def _generate_text(self, start: int, end: int):
    spread = KEY_SPACE // ((end - start) // RECORD_BYTES + 2)
    record, size, i = [], 0, 0
    for line in _lines(self.builder_config.path, start, end):
      record.append(line)
      size += len(line)
      if size >= RECORD_BYTES:
        yield i * spread, {'text': b''.join(record).decode('utf-8')}
        record, size, i = [], 0, i + 1
    if record:
      yield i * spread, {'text': b''.join(record).decode('utf-8')}

  def _generate_jsonl(self, first: int, stop: int):
    cfg = self.builder_config
    spread = KEY_SPACE // (stop - first + 1)
    doc = 0
    for line_number, line in enumerate(_lines(cfg.path, 0, None), 1):
      if not line.strip():
        continue
      if first <= doc < stop:
        yield (doc - first) * spread, {'text': _jsonl_text(line, cfg, line_number)}
      doc += 1
      if doc >= stop:
        return

  def prepare(self) -> None:
    """download_and_prepare with TFDS's in-memory write buffer capped: it otherwise holds up to
    1 GB of examples (a whole split of a small corpus) before spilling them to disk."""
    with _write_buffer(WRITE_BUFFER_BYTES):
      self.download_and_prepare()


@contextlib.contextmanager
def _write_buffer(limit: int):
  saved = tfds_shuffle.MAX_MEM_BUFFER_SIZE
  tfds_shuffle.MAX_MEM_BUFFER_SIZE = limit
  try:
    yield
  finally:
    tfds_shuffle.MAX_MEM_BUFFER_SIZE = saved


def _lines(path: str, start: int, end: int | None) -> Iterator[bytes]:
  """The lines (bytes, with their newline) from byte `start` up to byte `end`."""
  with open(path, 'rb') as f:
    f.seek(start)
    position = start
    for line in f:
      if end is not None and position >= end:
        return
      position += len(line)
      yield line


def _cuts(total: int, fractions) -> list[int]:
  cuts, cumulative = [0], 0.0
  for fraction in fractions:
    cumulative += fraction
    cuts.append(min(total, round(total * cumulative)))
  return cuts


def _next_line_start(path: str, offset: int) -> int:
  """`offset` moved forward to the start of a line (or the end of the file)."""
  if offset == 0:
    return 0
  with open(path, 'rb') as f:
    f.seek(offset - 1)
    return offset - 1 + len(f.readline())


def _jsonl_text(line: bytes, cfg: LocalTextConfig, line_number: int) -> str:
  try:
    value = json.loads(line)[cfg.text_key]
  except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
    raise ConfigError(f'config.data.source: {cfg.path}:{line_number}: not a JSON object with a '
                      f'string field {cfg.text_key!r} (config.data.text_key): '
                      f'{type(e).__name__} {e}') from None
  if not isinstance(value, str):
    raise ConfigError(f'config.data.source: {cfg.path}:{line_number}: field {cfg.text_key!r} is '
                      'not a string')
  return value

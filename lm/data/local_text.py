"""A TFDS builder for local text and JSONL files, with contiguous train / validation / test splits.

Plain text is cut at byte fractions (moved to the next line start), so the three splits
concatenate back to the file and share no text; each split is stored as records of whole
lines. JSONL files are cut by document count, one document per non-empty line. The files
are read line by line and written shard by shard, in file order, as array_record
(`tfds.core.ShardBasedBuilder`: TFDS's generator builder would hold a whole split in memory
to sort it), which `as_data_source()` reads without TensorFlow.
"""
import functools
import hashlib
import json
from collections.abc import Iterator

import tensorflow_datasets as tfds
from etils import epath

from lm.config import ConfigError

SPLITS = ('train', 'validation', 'test')
RECORD_BYTES = 1 << 16   # plain text is stored in records of whole lines, about this long
SHARD_BYTES = 16 << 20   # memory while preparing grows with this, not with the file


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


class LocalText(tfds.core.ShardBasedBuilder):
  """Documents of a local text / JSONL file, split into train / validation / test."""
  VERSION = tfds.core.Version('1.1.0')

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({'text': tfds.features.Text()}),
        disable_shuffling=True, description=self.builder_config.description)

  def _shard_iterators_per_split(self, dl_manager):
    cfg = self.builder_config
    plan = _jsonl_plan(cfg) if cfg.fmt == 'jsonl' else _text_plan(cfg)
    generate = self._jsonl if cfg.fmt == 'jsonl' else self._text
    return {name: [functools.partial(generate, *shard) for shard in shards]
            for name, shards in zip(SPLITS, plan)}

  def _text(self, start: int, stop: int, first_line: int):
    """Records of whole lines of the bytes start .. stop."""
    del first_line
    record, size, i = [], 0, 0
    for line in _lines(self.builder_config.path, start, stop):
      record.append(line)
      size += len(line)
      if size >= RECORD_BYTES:
        yield i, {'text': b''.join(record).decode('utf-8')}
        record, size, i = [], 0, i + 1
    if record:
      yield i, {'text': b''.join(record).decode('utf-8')}

  def _jsonl(self, start: int, stop: int, first_line: int):
    """One document per non-empty line of the bytes start .. stop."""
    cfg = self.builder_config
    i = 0
    for number, line in enumerate(_lines(cfg.path, start, stop), first_line):
      if line.strip():
        yield i, {'text': _jsonl_text(line, cfg, number)}
        i += 1


Shard = tuple[int, int, int]   # byte offsets start, stop (at line starts); number of its first line


def _text_plan(cfg: LocalTextConfig) -> list[list[Shard]]:
  """Splits cut at byte fractions moved to line starts, in shards of about SHARD_BYTES."""
  size = epath.Path(cfg.path).stat().length
  cuts = [_next_line_start(cfg.path, cut) for cut in _cuts(size, cfg.fractions)]
  _check_nonempty(cfg, cuts, f'{size} bytes')
  plan = []
  for start, stop in zip(cuts[:-1], cuts[1:]):
    bounds = sorted({start, stop, *(_next_line_start(cfg.path, b)
                                    for b in range(start + SHARD_BYTES, stop, SHARD_BYTES))})
    plan.append([(a, b, 0) for a, b in zip(bounds[:-1], bounds[1:])])
  return plan


def _jsonl_plan(cfg: LocalTextConfig) -> list[list[Shard]]:
  """Splits cut by document (non-empty line) count, in shards of about SHARD_BYTES: one pass
  counts the documents, a second marks where splits and shards begin."""
  with open(cfg.path, 'rb') as f:
    total = sum(1 for line in f if line.strip())
  cuts = _cuts(total, cfg.fractions)
  _check_nonempty(cfg, cuts, f'{total} documents')
  marks, doc, offset, number, shard_end = [], 0, 0, 0, 0   # marks: (offset, line, document)
  with open(cfg.path, 'rb') as f:
    for number, line in enumerate(f, 1):
      if line.strip():
        if doc in cuts or offset >= shard_end:
          marks.append((offset, number, doc))
          shard_end = offset + SHARD_BYTES
        doc += 1
      offset += len(line)
  marks.append((offset, number + 1, doc))
  return [[(a[0], b[0], a[1]) for a, b in zip(marks, marks[1:]) if lo <= a[2] < hi]
          for lo, hi in zip(cuts[:-1], cuts[1:])]


def _check_nonempty(cfg: LocalTextConfig, cuts: list[int], total: str) -> None:
  for name, start, stop in zip(SPLITS, cuts[:-1], cuts[1:]):
    if start == stop:
      raise ConfigError(f'config.data.source: {cfg.path} ({total}) leaves the {name} split '
                        f'empty with config.data.split_fractions={cfg.fractions}; use a longer '
                        'file or other fractions')


def _lines(path: str, start: int, stop: int) -> Iterator[bytes]:
  """The lines (bytes, with their newline) from byte `start` up to byte `stop`."""
  with open(path, 'rb') as f:
    f.seek(start)
    position = start
    for line in f:
      if position >= stop:
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

"""A TFDS builder for local text and JSONL files, with contiguous train / validation / test splits.

Plain text is cut at character fractions (moved to the next line start), so the three splits
concatenate back to the file and share no text; each split is stored as records of whole
lines. JSONL files are cut by document count, one document per line. Records are written in
file order (shuffling disabled) as array_record, which `as_data_source()` reads without
TensorFlow.
"""
import hashlib
import json

import tensorflow_datasets as tfds
from etils import epath

SPLITS = ('train', 'validation', 'test')
RECORD_CHARS = 1 << 16   # plain text is stored in records of whole lines, about this long


class LocalTextConfig(tfds.core.BuilderConfig):
  """One file, its format, and how to split it."""

  def __init__(self, *, path: str, fmt: str, text_key: str, fractions: tuple[float, ...]):
    stat = epath.Path(path).stat()
    key = json.dumps([str(epath.Path(path).resolve()), stat.length, stat.mtime, fmt, text_key,
                      list(fractions)])
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    super().__init__(name=f'{epath.Path(path).stem}-{digest}', version='1.0.0',
                     description=f'{fmt} file {path}')
    self.path, self.fmt, self.text_key, self.fractions = path, fmt, text_key, tuple(fractions)


class LocalText(tfds.core.GeneratorBasedBuilder):
  """Documents of a local text / JSONL file, split into train / validation / test."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({'text': tfds.features.Text()}),
        disable_shuffling=True, description=self.builder_config.description)

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    text = epath.Path(cfg.path).read_text(encoding='utf-8')
    if cfg.fmt == 'jsonl':
      docs = [_jsonl_text(line, cfg, i + 1) for i, line in enumerate(text.splitlines())
              if line.strip()]
      pieces = _cut(docs, cfg.fractions)
    else:
      pieces = [_records(piece) for piece in _cut(text, cfg.fractions)]
    return {name: self._generate_examples(piece) for name, piece in zip(SPLITS, pieces)}

  def _generate_examples(self, docs):
    for i, doc in enumerate(docs):
      yield i, {'text': doc}


def _jsonl_text(line: str, cfg: LocalTextConfig, line_number: int) -> str:
  try:
    value = json.loads(line)[cfg.text_key]
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise ValueError(f'{cfg.path}:{line_number}: not a JSON object with a string field '
                     f'{cfg.text_key!r} (config.data.text_key): {type(e).__name__} {e}') from None
  if not isinstance(value, str):
    raise ValueError(f'{cfg.path}:{line_number}: field {cfg.text_key!r} is not a string')
  return value


def _cut(items, fractions):
  """Consecutive pieces of `items` (a list, or text cut only at line starts) of the given
  fractions."""
  cuts, total = [0], 0.0
  for fraction in fractions:
    total += fraction
    cut = min(len(items), round(len(items) * total))
    cuts.append(_next_line(items, cut) if isinstance(items, str) else cut)
  return [items[a:b] for a, b in zip(cuts[:-1], cuts[1:])]


def _next_line(text: str, i: int) -> int:
  if i == 0 or i >= len(text) or text[i - 1] == '\n':
    return i
  j = text.find('\n', i)
  return len(text) if j < 0 else j + 1


def _records(text: str) -> list[str]:
  """Whole lines grouped into records of about RECORD_CHARS characters."""
  records, start = [], 0
  while start < len(text):
    end = _next_line(text, min(len(text), start + RECORD_CHARS))
    records.append(text[start:end])
    start = end
  return records

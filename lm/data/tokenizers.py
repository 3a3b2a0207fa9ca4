"""Tokenizers built from the corpus and saved in the workdir: characters, bytes, SentencePiece.

`load_or_build` reuses the file saved by an earlier run of the same workdir, so a resumed run
tokenizes exactly as the interrupted one did.
"""
import io
import json
import os
from collections.abc import Iterable, Iterator

import numpy as np
import sentencepiece as spm
from etils import epath


class CharTokenizer:
  """One id per distinct character of the corpus, in sorted order (as nanoGPT does)."""
  eos_id = None

  def __init__(self, chars: str):
    self.chars = chars
    self._codepoints = np.array([ord(c) for c in chars], np.int64)
    self._order = np.argsort(self._codepoints)
    self.vocab_size = len(chars)

  @classmethod
  def build(cls, texts: Iterable[str]) -> 'CharTokenizer':
    seen: set[str] = set()
    for text in texts:
      seen.update(text)
    return cls(''.join(sorted(seen)))

  def encode(self, text: str) -> np.ndarray:
    codes = np.frombuffer(text.encode('utf-32-le'), np.uint32).astype(np.int64)
    pos = np.searchsorted(self._codepoints[self._order], codes)
    pos = np.minimum(pos, len(self._order) - 1)
    ids = self._order[pos]
    unknown = self._codepoints[ids] != codes
    if unknown.any():
      bad = sorted({chr(c) for c in codes[unknown]})[:5]
      raise ValueError(f'characters not in the vocabulary: {bad}')
    return ids.astype(np.int32)

  def decode(self, ids) -> str:
    return ''.join(self.chars[i] for i in np.asarray(ids).tolist() if i < self.vocab_size)

  def save(self, path: epath.Path) -> None:
    path.write_text(json.dumps({'kind': 'char', 'chars': self.chars}))


class ByteTokenizer:
  """UTF-8 bytes (ids 0-255) plus an end-of-document id 256."""
  eos_id = 256
  vocab_size = 257

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode('utf-8'), np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    return bytes(i for i in np.asarray(ids).tolist() if i < 256).decode('utf-8', 'replace')

  def save(self, path: epath.Path) -> None:
    path.write_text(json.dumps({'kind': 'byte'}))


class SentencePieceTokenizer:
  """A SentencePiece BPE or unigram model trained on the training split."""

  def __init__(self, model_proto: bytes):
    self.model_proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = self._sp.get_piece_size()
    self.eos_id = self._sp.eos_id()

  @classmethod
  def train(cls, texts: Iterable[str], vocab_size: int,
            model_type: str) -> 'SentencePieceTokenizer':
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_lines(texts), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, character_coverage=1.0, byte_fallback=True,
        bos_id=-1, eos_id=1, unk_id=0, pad_id=-1, num_threads=os.cpu_count() or 1,
        input_sentence_size=2_000_000, shuffle_input_sentence=True,
        remove_extra_whitespaces=False, normalization_rule_name='identity', minloglevel=2)
    return cls(model.getvalue())

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), np.int32)

  def decode(self, ids) -> str:
    return self._sp.decode([i for i in np.asarray(ids).tolist() if i < self.vocab_size])

  def save(self, path: epath.Path) -> None:
    path.with_suffix('.model').write_bytes(self.model_proto)
    path.write_text(json.dumps({'kind': 'sentencepiece', 'model': path.with_suffix('.model').name}))


def _lines(texts: Iterable[str]) -> Iterator[str]:
  for text in texts:
    for line in text.splitlines():
      if line.strip():
        yield line


def load(path: epath.Path):
  spec = json.loads(path.read_text())
  if spec['kind'] == 'char':
    return CharTokenizer(spec['chars'])
  if spec['kind'] == 'byte':
    return ByteTokenizer()
  return SentencePieceTokenizer((path.parent / spec['model']).read_bytes())


def load_or_build(kind: str, texts: Iterable[str], spm_vocab_size: int,
                  path: epath.Path | None):
  """The tokenizer saved at `path`, or a new one built from `texts` (and saved there)."""
  if path is not None and path.exists():
    return load(path)
  if kind == 'char':
    tokenizer = CharTokenizer.build(texts)
  elif kind == 'byte':
    tokenizer = ByteTokenizer()
  else:
    tokenizer = SentencePieceTokenizer.train(texts, spm_vocab_size, kind.removeprefix('spm_'))
  if path is not None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(path)
  return tokenizer

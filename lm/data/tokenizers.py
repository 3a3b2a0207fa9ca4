"""Tokenizers saved in the workdir: characters, bytes, SentencePiece (built from the corpus),
or a Hugging Face `tokenizer.json` (`hf:PATH`, an imported model's own vocabulary).

`load_or_build` reuses the file saved by an earlier run of the same workdir, so a resumed run
tokenizes exactly as the interrupted one did.
"""
import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator

import numpy as np
import sentencepiece as spm
import tokenizers as hf_tokenizers
from etils import epath

from lm.config import ConfigError


class CharTokenizer:
  """One id per distinct character of the corpus, in sorted order (as nanoGPT does)."""
  eos_id = None
  kind = 'char'

  def __init__(self, chars: str):
    self.chars = chars
    self.fingerprint = _fingerprint(chars.encode('utf-8'))
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
  kind = 'byte'
  fingerprint = 'byte'

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode('utf-8'), np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    return bytes(i for i in np.asarray(ids).tolist() if i < 256).decode('utf-8', 'replace')

  def save(self, path: epath.Path) -> None:
    path.write_text(json.dumps({'kind': 'byte'}))


class SentencePieceTokenizer:
  """A SentencePiece BPE or unigram model trained on the training split."""

  def __init__(self, model_proto: bytes, kind: str):
    self.model_proto, self.kind = model_proto, kind
    self.fingerprint = _fingerprint(model_proto)
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
    return cls(model.getvalue(), f'spm_{model_type}')

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), np.int32)

  def decode(self, ids) -> str:
    return self._sp.decode([i for i in np.asarray(ids).tolist() if i < self.vocab_size])

  def save(self, path: epath.Path) -> None:
    path.with_suffix('.model').write_bytes(self.model_proto)
    path.write_text(json.dumps({'kind': 'sentencepiece', 'config': self.kind,
                                'model': path.with_suffix('.model').name}))


class HuggingFaceTokenizer:
  """A Hugging Face fast tokenizer (`tokenizer.json`, through the `tokenizers` package).

  Text is encoded without the special tokens the tokenizer's post-processor would add (a
  Llama BOS), so that pieces of an example (prompt, response) concatenate exactly; the BOS /
  EOS / pad ids are those of the model directory (config.json, else tokenizer_config.json)."""
  kind = 'hf'
  SPECIAL = ('bos', 'eos', 'pad')

  def __init__(self, spec: bytes, special_ids: dict[str, int | None]):
    self.spec, self.special_ids = spec, special_ids
    self._tokenizer = hf_tokenizers.Tokenizer.from_str(spec.decode('utf-8'))
    self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
    self.bos_id, self.eos_id, self.pad_id = (special_ids.get(f'{k}_id') for k in self.SPECIAL)
    self.fingerprint = _fingerprint(spec + json.dumps(special_ids, sort_keys=True).encode())

  @classmethod
  def from_path(cls, path: str) -> 'HuggingFaceTokenizer':
    """From a `tokenizer.json`, or a directory holding one (and the model's config.json /
    tokenizer_config.json, which name the special tokens)."""
    path = epath.Path(path)
    file = path / 'tokenizer.json' if path.is_dir() else path
    if not file.exists():
      raise ConfigError(f'hf:{path}: no tokenizer.json there (save the tokenizer with '
                        'transformers\' save_pretrained to get one)')
    try:
      tokenizer = cls(file.read_bytes(), {})
    except Exception as e:   # the tokenizers package raises its own exception type
      raise ConfigError(f'hf:{path}: {file} is not a tokenizer.json: {e}') from None
    return cls(tokenizer.spec, tokenizer.special_ids_from(file.parent))

  def special_ids_from(self, directory: epath.Path) -> dict[str, int | None]:
    model = _json_or_empty(directory / 'config.json')
    names = _json_or_empty(directory / 'tokenizer_config.json')
    ids = {}
    for k in self.SPECIAL:
      value = model.get(f'{k}_token_id')
      if isinstance(value, list):   # several EOS ids: the first ends our samples
        value = value[0] if value else None
      if value is None:
        token = names.get(f'{k}_token')
        token = token.get('content') if isinstance(token, dict) else token
        value = self._tokenizer.token_to_id(token) if token else None
      ids[f'{k}_id'] = value
    return ids

  def token(self, i: int | None) -> str | None:
    return None if i is None else self._tokenizer.id_to_token(i)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

  def decode(self, ids) -> str:
    return self._tokenizer.decode([i for i in np.asarray(ids).tolist() if i < self.vocab_size],
                                  skip_special_tokens=False)

  def save(self, path: epath.Path) -> None:
    path.with_suffix('.hf.json').write_bytes(self.spec)
    path.write_text(json.dumps({'kind': 'hf', 'model': path.with_suffix('.hf.json').name,
                                **self.special_ids}))


def _json_or_empty(path: epath.Path) -> dict:
  return json.loads(path.read_text()) if path.exists() else {}


def _fingerprint(spec: bytes) -> str:
  """A short hash of what the tokenizer maps: names its token files."""
  return hashlib.sha1(spec).hexdigest()[:12]


def _lines(texts: Iterable[str]) -> Iterator[str]:
  for text in texts:
    for line in text.splitlines():
      if line.strip():
        yield line


def family(kind: str) -> str:
  """config.data.tokenizer without the path of an hf:PATH (a saved one no longer reads it)."""
  return 'hf' if kind.startswith('hf:') else kind


def load(path: epath.Path, kind: str):
  """The tokenizer saved at `path`, which must be of the configured `kind`."""
  spec = json.loads(path.read_text())
  saved = spec['kind'] if spec['kind'] in ('char', 'byte', 'hf') else spec.get(
      'config', kind if kind.startswith('spm') else 'sentencepiece')   # older files: no 'config'
  if saved != family(kind):
    raise ConfigError(f'config.data.tokenizer={kind!r}, but {path} holds a {saved!r} tokenizer '
                      '(runs keep the tokenizer they started with)')
  if kind == 'char':
    return CharTokenizer(spec['chars'])
  if kind == 'byte':
    return ByteTokenizer()
  if saved == 'hf':
    special = {k: v for k, v in spec.items() if k.endswith('_id')}
    return HuggingFaceTokenizer((path.parent / spec['model']).read_bytes(), special)
  return SentencePieceTokenizer((path.parent / spec['model']).read_bytes(), kind)


def copy(source: epath.Path, target: epath.Path) -> None:
  """Copies a saved tokenizer (its JSON and model file) from another run."""
  if not source.exists():
    raise ConfigError(f'config.train.init_from: {source} not found (the run to start from '
                      'keeps its tokenizer there)')
  target.parent.mkdir(parents=True, exist_ok=True)
  model = json.loads(source.read_text()).get('model')
  if model:
    (source.parent / model).copy(target.parent / model, overwrite=True)
  source.copy(target, overwrite=True)


def load_or_build(kind: str, texts: Iterable[str], spm_vocab_size: int,
                  path: epath.Path | None):
  """The tokenizer saved at `path`, or a new one built from `texts` (and saved there)."""
  if path is not None and path.exists():
    return load(path, kind)
  if kind == 'char':
    tokenizer = CharTokenizer.build(texts)
  elif kind == 'byte':
    tokenizer = ByteTokenizer()
  elif kind.startswith('hf:'):
    tokenizer = HuggingFaceTokenizer.from_path(kind.removeprefix('hf:'))
  else:
    tokenizer = SentencePieceTokenizer.train(texts, spm_vocab_size, kind.removeprefix('spm_'))
  if path is not None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(path)
  return tokenizer

"""Where documents come from: the shipped corpus, local text / JSONL files, TFDS datasets.

Everything prepared (TFDS array_record files, token files) goes under `config.data.dir`, one
directory shared by runs, so a corpus is prepared once per machine.
"""
import codecs
import contextlib
import dataclasses
import fcntl
import io

import grain
import tensorflow_datasets as tfds
from absl import logging as absl_logging
from etils import epath

from lm.config import DEFAULT_DATA_DIR, ConfigError
from lm.data import local_text

SHAKESPEARE = epath.Path(__file__).parent / 'tinyshakespeare.txt'
CHUNK_BYTES = 1 << 20


@dataclasses.dataclass
class Corpus:
  name: str                              # identifies the prepared files (source and splits)
  splits: dict[str, grain.MapDataset]    # 'train' / 'validation' / 'test' -> document strings


def data_dir(data_cfg) -> epath.Path:
  path = epath.Path(data_cfg.dir or DEFAULT_DATA_DIR).expanduser()
  if '://' in str(path):
    raise ConfigError(f'config.data.dir={data_cfg.dir!r} must be a local directory (token files '
                      'are memory-mapped)')
  path.mkdir(parents=True, exist_ok=True)
  return path


@contextlib.contextmanager
def file_lock(directory: epath.Path, name: str):
  """Exclusive among the processes of this machine (parallel sweep points, local hosts)."""
  locks = directory / 'locks'
  locks.mkdir(parents=True, exist_ok=True)
  with open(locks / f'{name}.lock', 'w') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    yield


@contextlib.contextmanager
def _quiet_absl():
  """Hides TFDS's warning that a builder config is not among its predefined ones (ours never
  are) so that a bad-input error stays the one line on stderr."""
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    yield
  finally:
    absl_logging.set_verbosity(verbosity)


def check_text_file(path: epath.Path, field: str) -> None:
  """A clear error for a missing, empty or non-UTF-8 corpus file, read in chunks."""
  if not path.exists():
    raise ConfigError(f'{field}: file not found: {path}')
  decoder, offset, blank = codecs.getincrementaldecoder('utf-8')(), 0, True
  with path.open('rb') as f:
    while chunk := f.read(CHUNK_BYTES):
      pending = len(decoder.getstate()[0])   # bytes of a character cut by the last chunk
      try:
        decoder.decode(chunk)
      except UnicodeDecodeError as e:
        raise ConfigError(f'{field}: {path} is not UTF-8 text (bad byte at offset '
                          f'{offset - pending + e.start})') from None
      blank = blank and not chunk.strip()
      offset += len(chunk)
    try:
      decoder.decode(b'', final=True)
    except UnicodeDecodeError:
      raise ConfigError(f'{field}: {path} is not UTF-8 text (truncated character at the '
                        'end)') from None
  if blank:
    raise ConfigError(f'{field}: file is empty: {path}')


def documents(data_cfg) -> Corpus:
  """The corpus's splits as random-access datasets of document strings, read through TFDS."""
  kind, _, name = data_cfg.source.partition(':')
  directory = data_dir(data_cfg)
  if kind == 'shakespeare':
    kind, name = 'text', str(SHAKESPEARE)
  if kind in ('text', 'jsonl'):
    check_text_file(epath.Path(name), 'config.data.source')
    builder_config = local_text.LocalTextConfig(path=name, fmt=kind, text_key=data_cfg.text_key,
                                                fractions=tuple(data_cfg.split_fractions))
    # one process of this machine prepares the files; the others wait for it, then read them
    with file_lock(directory, builder_config.name), _quiet_absl():
      builder = local_text.LocalText(config=builder_config, data_dir=str(directory),
                                     file_format='array_record')
      tfds.display_progress_bar(False)   # per-split bars of a local file: only noise
      if not builder.is_prepared():
        print(f'preparing {epath.Path(name).name} for its first use, in {builder.data_dir}',
              flush=True)
      # TFDS's own lines speak of a download and of unknown sizes: not this file's case
      with contextlib.redirect_stdout(io.StringIO()):
        builder.download_and_prepare()
    sources = {split: builder.as_data_source(split) for split in local_text.SPLITS}
    key, corpus_name = 'text', builder_config.name
  elif kind == 'tfds':
    sources = {split: tfds.data_source(name, split=tfds_split, data_dir=str(directory),
                                       download=True)
               for split, tfds_split in zip(local_text.SPLITS, data_cfg.tfds_splits)}
    key = data_cfg.text_key
    corpus_name = '-'.join([name, *data_cfg.tfds_splits, key]).replace('/', '_')
  else:
    raise ConfigError(f"config.data.source={data_cfg.source!r} must be 'shakespeare', "
                      "'text:PATH', 'jsonl:PATH' or 'tfds:NAME'")
  splits = {split: grain.MapDataset.source(src).map(lambda ex: _as_text(ex[key]))
            for split, src in sources.items()}
  return Corpus(corpus_name, splits)


def _as_text(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)

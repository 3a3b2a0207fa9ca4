"""Every checkpoint proves its bytes: at save, the size and CRC32C of each of a step's files go
into STEP/checksums.json before Orbax commits the step (renames it from its temporary name,
through the CHECKSUMMED temporary-path classes); at restore the files are checked against it
before any array is read. Across processes each checks a share of the files and all learn the
result. (TensorStore's crc32c codec, which Orbax puts only on the index of each array's shard
file, would leave the chunks themselves and Orbax's own metadata unchecked.)"""
import asyncio
import concurrent.futures
import json

import google_crc32c
import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint._src.path import atomicity

CHECKSUMS = 'checksums.json'
# Orbax writes these into the step at commit, after the checksums: its commit time and marker
COMMITTED_LATER = ('_CHECKPOINT_METADATA', 'commit_success.txt')
_CHUNK = 16 << 20


class CorruptCheckpoint(Exception):
  """A checkpoint file whose bytes differ from those saved (or that is missing)."""


def file_crc32c(path: epath.Path) -> tuple[int, str]:
  """(size, CRC32C as 8 hex digits) of a file, read in 16 MiB pieces."""
  crc, size = google_crc32c.Checksum(), 0
  with path.open('rb') as f:
    while piece := f.read(_CHUNK):
      crc.update(piece)
      size += len(piece)
  return size, crc.hexdigest().decode()


def _files(directory: epath.Path) -> list[str]:
  """The files of a checkpoint step, relative to it, that its checksums cover."""
  return sorted(str((root / name).relative_to(directory)) for root, _, names in directory.walk()
                for name in names if name not in (CHECKSUMS, *COMMITTED_LATER))


def _map(fn, items: list) -> list:
  """fn over items on a few threads: the CRC and the reads release the GIL."""
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    return list(pool.map(fn, items))


def write(directory: epath.Path) -> None:
  """Writes STEP/checksums.json: {file: [bytes, crc32c]} for every file of the step."""
  names = _files(directory)
  sums = _map(lambda name: list(file_crc32c(directory / name)), names)
  (directory / CHECKSUMS).write_text(json.dumps(
      {'algorithm': 'crc32c', 'files': dict(zip(names, sums))}, indent=0))


def check_files(directory: epath.Path) -> tuple[list[str], list[tuple[int, str]]] | None:
  """This process's share of a step's files checked against checksums.json: (every file's
  name, [(index, problem)] of the share's bad ones); None when the step has no checksums
  (saved before they were kept). Touches no JAX collective, so it may run on a thread."""
  manifest = directory / CHECKSUMS
  if not manifest.exists():
    return None
  try:
    files = json.loads(manifest.read_text())['files']
  except (ValueError, KeyError) as e:
    raise CorruptCheckpoint(f'{manifest} does not parse ({e})') from e
  names = sorted(files)
  mine = list(range(len(names)))[jax.process_index()::jax.process_count()]

  def problem(index: int) -> str | None:
    path = directory / names[index]
    if not path.exists():
      return f'{path} is missing'
    size, crc = file_crc32c(path)
    saved_size, saved_crc = files[names[index]]
    if size != saved_size:
      return f'{path} has {size} bytes, {saved_size} when saved'
    return (None if crc == saved_crc else
            f'{path} fails its checksum (crc32c {crc}, {saved_crc} when saved)')
  return names, [(i, p) for i, p in zip(mine, _map(problem, mine)) if p]


def agree(directory: epath.Path, names: list[str], problems: list[tuple[int, str]]) -> None:
  """Raises CorruptCheckpoint naming the first bad file that any process found (every
  process must call it: across processes it is a collective)."""
  first = problems[0][0] if problems else len(names)
  if jax.process_count() > 1:
    first = int(np.min(multihost_utils.process_allgather(np.int32(first))))
  if first < len(names):
    raise CorruptCheckpoint(dict(problems).get(first) or f'{directory / names[first]} fails '
                            'its checksum (found by another process)')


def verify(directory: epath.Path) -> bool:
  """Raises CorruptCheckpoint naming the first file (of a step directory, or of a file
  checkpoint inside one) whose size or CRC32C differs from checksums.json, or that is
  missing. False when the step has no checksums (saved before they were kept), else True.
  Across processes each checks a share of the files and all learn the result: together they
  read every byte once, where each reading the whole checkpoint from shared storage would
  read it process-count times."""
  found = check_files(directory)
  if found is not None:
    agree(directory, *found)
  return found is not None


def _checksummed(base: type) -> type:
  """Orbax's temporary-directory protocol for a step with checksums written into the step
  before it is committed: a step that exists under its final name has them."""
  class Checksummed(base):
    async def finalize(self, *args, **kwargs):
      await asyncio.to_thread(write, self.get())
      await super().finalize(*args, **kwargs)
  Checksummed.__name__ = f'Checksummed{base.__name__}'
  return Checksummed


CHECKSUMMED = {base: _checksummed(base) for base in (atomicity.AtomicRenameTemporaryPath,
                                                     atomicity.CommitFileTemporaryPath)}

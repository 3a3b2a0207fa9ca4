"""Orbax checkpoints of the train state, the data iterator and what the run depends on.

A checkpoint holds everything a run needs to continue exactly: params, optimizer state,
step, RNG key (`state`), the Grain iterator position of every process (`data`) and the run's
record (`run`): its signature (the settings the state and the data position depend on, see
`signature`) and the learning-rate schedule it started with.

Resuming is exact or refused, never silent: a different signature or a state of other
shapes stops the run with one line naming each difference. Only an unreadable checkpoint
(truncated, corrupt) is skipped for an older one; it is renamed to STEP.corrupt so that later
saves are not refused, and a directory where no checkpoint restores is an error.

Every checkpoint proves its bytes (`lm.training.checksums`): a step's files are checked
against the checksums written before it was committed, before any array is read, and a
mismatch counts as unreadable.
"""
import concurrent.futures
import errno
import json
import logging
import shutil

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint._src.path import atomicity_defaults

from lm import config as config_lib
from lm.config import ConfigError, rundir
from lm.parallel import distributed
from lm.training import checksums

# Config fields that a checkpoint depends on: the parameters' shapes, dtypes and function,
# the optimizer state's structure, and what the data iterator's position means.
SIGNATURE_FIELDS = (
    *(f'model.{k}' for k, v in config_lib.ARCHITECTURE.items() if v == config_lib.EVERY_CHECKPOINT),
    'model.scan_layers', 'optim.name',
    'data.source', 'data.text_key', 'data.split_fractions', 'data.tfds_splits', 'data.tokenizer',
    'data.seq_len', 'data.packing', 'data.window_stride', 'data.add_eos',
    'train.batch_size', 'train.seed')
# Fields added later (post-training, compression), recorded when they differ from these
# defaults (so that checkpoints written before they existed still resume).
LATER_FIELDS = {'train.objective': 'lm', 'data.format': 'text', 'lora.rank': 0,
                'lora.targets': None, 'lora.rslora': False, 'lora.train_also': '',
                'data.overlong': 'truncate', 'quant.scheme': 'none', 'quant.group_size': 0,
                **{f'model.{k}': v for k, v in config_lib.ARCHITECTURE.items()
                   if v != config_lib.EVERY_CHECKPOINT}}
# fields that matter only beside another: recorded only while it is set
WITH = {'lora.targets': 'lora.rank', 'model.lowrank_targets': 'model.lowrank_rank'}


class ResumeError(ConfigError):
  """A checkpoint that this run cannot continue from (reported as one line, exit 2)."""


def signature(config, tokenizer_fingerprint: str, stages: int) -> dict:
  """What a checkpoint of this run depends on, as {field: value}."""
  sig = {field: _get(config, field) for field in SIGNATURE_FIELDS}
  sig.update({field: _get(config, field) for field, default in LATER_FIELDS.items()
              if _get(config, field) != default and (field not in WITH
                                                      or _get(config, WITH[field]))})
  repeats = config.model.pipeline_repeats
  # a circular pipeline stores its layers in stage-major order (lm.model.pipeline.logical_order)
  sig['layer order'] = f'{stages} stages x {repeats} repeats' if repeats > 1 else 'logical'
  sig['gradient clipping'] = config.optim.clip_norm > 0
  sig['process count'] = jax.process_count()   # Grain saves one iterator state per process
  sig['tokenizer'] = tokenizer_fingerprint
  return json.loads(json.dumps(sig))   # tuples as lists, as they come back from JSON


def _get(config, dotted: str):
  section, name = dotted.split('.')
  value = config[section][name]
  return list(value) if isinstance(value, tuple) else value


def differences(saved: dict, current: dict) -> list[str]:
  """'field: was A, now B' for each field that differs."""
  out = []
  for field in sorted(set(saved) | set(current)):
    old, new = saved.get(field, '(absent)'), current.get(field, '(absent)')
    if old != new:
      name = f'config.{field}' if '.' in field else field
      out.append(f'{name} was {old!r}, now {new!r}')
  return out


def shapes(tree) -> dict[str, tuple]:
  """'params/layers/attn/q/kernel' -> (shape, dtype) for every array of a state-like tree."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(_key(k) for k in path): (tuple(leaf.shape), str(leaf.dtype))
          for path, leaf in flat if hasattr(leaf, 'shape')}


def _key(entry) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def shape_differences(saved: dict[str, tuple], wanted: dict[str, tuple], prefix: str) -> list[str]:
  """Paths under `prefix` whose shape or dtype differ, or that only one side has."""
  out = []
  for path in sorted(set(saved) | set(wanted)):
    if not path.startswith(prefix):
      continue
    old, new = saved.get(path), wanted.get(path)
    if old != new:
      show = lambda s: 'absent' if s is None else f'{s[1]}{list(s[0])}'
      out.append(f'{path.removeprefix(prefix)} {show(old)} in the checkpoint, {show(new)} here')
  return out


def state_handler() -> ocp.PyTreeCheckpointHandler:
  """Orbax's handler for the train state. On CPU a replicated array is written whole by its
  first replica: Orbax's default (replica-parallel) writes a slice from each replica, which
  compiles a slicing program per array shape and replica count (24 for the CPU recipe's
  state on its two devices: 1.4 of the 1.5 s its first two saves took), where the replicas
  share one host's memory anyway."""
  if jax.default_backend() != 'cpu':
    return ocp.PyTreeCheckpointHandler()
  arrays = ocp.type_handlers.ArrayHandler(use_replica_parallel=False)
  return ocp.PyTreeCheckpointHandler(
      type_handler_registry=ocp.type_handlers.create_type_handler_registry((jax.Array, arrays)))


class StorageError(Exception):
  """The run directory's storage refused a checkpoint (full, read-only, gone): reported as one
  line, exit code 3 (`lm.main`), the partial checkpoint removed, the last good one kept."""


# what a refused write says, by errno and by the text TensorStore's errors carry instead
STORAGE_PROBLEMS = {errno.ENOSPC: 'No space left on device', errno.EDQUOT: 'Disk quota exceeded',
                    errno.EROFS: 'Read-only file system', errno.EACCES: 'Permission denied',
                    errno.ENOENT: 'No such file or directory'}
GONE = 'the directory is gone'   # TensorStore's NOT_FOUND when a path vanished under a write


def storage_problem(error: BaseException, under: str) -> str | None:
  """What the storage said when it refused a write under the directory `under` ('No space
  left on device', ...) if that is what `error` (or an error it came from) is, else None."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    text = str(error)
    # an OSError names its file, if any (tensorboardX's flush on a full disk names none)
    if isinstance(error, OSError) and error.errno in STORAGE_PROBLEMS and str(
        error.filename or under).startswith(under):
      return STORAGE_PROBLEMS[error.errno]
    if under in text:
      for problem in STORAGE_PROBLEMS.values():
        if problem in text:
          return problem
      if 'NOT_FOUND: ' in text:
        return GONE
    error = error.__cause__ or error.__context__
  return None


def verified(step_dir: epath.Path, field: str) -> epath.Path:
  """`step_dir` once its files match their checksums; else ResumeError naming the file (and
  the run's previous checkpoint, to use instead)."""
  try:
    checksums.verify(step_dir)
  except checksums.CorruptCheckpoint as e:
    older = sorted((int(p.name) for p in step_dir.parent.glob('*') if p.name.isdigit()
                    and int(p.name) < int(step_dir.name)) if step_dir.name.isdigit() else [])
    instead = f'; the previous checkpoint is {step_dir.parent / str(older[-1])}' if older else ''
    raise ResumeError(f'{field}: checkpoint {step_dir} is corrupted: {e}{instead}') from e
  return step_dir


class Checkpointer:
  """Keeps the last `keep` checkpoints under `directory`; every process must take part."""

  def __init__(self, directory: epath.Path, keep: int, async_save: bool = True):
    self.directory = directory
    self.set_aside = []   # (step, new name, why) of the checkpoints found unreadable
    self._in_flight = None   # the step of the last save begun
    protocol = atomicity_defaults.get_default_temporary_path_class(directory)
    self.manager = ocp.CheckpointManager(
        directory,
        # a save killed part-way leaves a temporary directory: removed when the run restarts
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True, temporary_path_class=checksums.CHECKSUMMED[protocol]),
        item_handlers={'state': state_handler(),
                       'data': grain.checkpoint.CheckpointHandler(),
                       'run': ocp.JsonCheckpointHandler()})

  def save(self, step: int, state, data_iterator: grain.DatasetIterator, run: dict) -> None:
    """Saves in the background (when async); a storage failure of this save or of the one
    before ends in StorageError."""
    self.wait()   # the previous save first: its failure is reported as its own
    self._check_space(step, state)
    saved = self._storage_guard(step, lambda: self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(state), data=grain.checkpoint.CheckpointSave(data_iterator),
        run=ocp.args.JsonSave(run))))
    if not saved:   # Orbax skips a step at or below its latest one without an error
      raise RuntimeError(f'checkpoint {step} was not written: {self.directory} already holds '
                         f'step {self.manager.latest_step()}')
    self._in_flight = step

  def _committed(self) -> list[int]:
    return sorted(int(p.name) for p in self.directory.glob('*') if p.name.isdigit())

  def _size(self, step: int) -> int | None:
    """Bytes of a committed checkpoint, from its checksums (None without them)."""
    manifest = self.directory / str(step) / checksums.CHECKSUMS
    if not manifest.exists():
      return None
    return sum(size for size, _ in json.loads(manifest.read_text())['files'].values())

  def _resume_hint(self) -> str:
    steps = self._committed()
    return (f'checkpoint {steps[-1]} is intact: free the space (or give the run a writable '
            f'directory) and rerun the same command to resume from step {steps[-1]}' if steps
            else 'no checkpoint was written: rerun the same command once the directory is '
            'writable, to start again')

  def _check_space(self, step: int, state) -> None:
    """StorageError before writing when a local disk lacks the space of the newest checkpoint
    (of the state's bytes for the first): refused now, the write would fail part-way."""
    if not self.directory.exists() or '://' in str(self.directory):  # gs:// has no disk to fill
      return
    steps = self._committed()
    needed = (steps and self._size(steps[-1])) or sum(
        getattr(leaf, 'nbytes', 0) for leaf in jax.tree.leaves(state))
    free = shutil.disk_usage(self.directory).free
    # one process decides for all: hosts that see other disks still stop together
    short = distributed.broadcast_text(str(free) if free < needed else '')
    if short:
      raise StorageError(
          f'checkpoint {step} would not fit in {self.directory}: {int(short):,} bytes free, '
          f'about {needed:,} needed; {self._resume_hint()}')

  def _storage_guard(self, step: int, fn):
    """fn(); when the storage refused a write, the partial checkpoint removed and
    StorageError with one line saying what happened and how to resume."""
    try:
      return fn()
    except Exception as e:  # noqa: BLE001 - storage failures are reported, others re-raised
      problem = storage_problem(e, str(self.directory))
      if problem is None:
        raise
      removed = self._remove_partial()
      raise StorageError(
          f'checkpoint {step} could not be written to {self.directory}: {problem}'
          + (f' (about {self._size(self._committed()[-1]):,} bytes needed)'
             if problem == STORAGE_PROBLEMS[errno.ENOSPC] and self._committed()
             and self._size(self._committed()[-1]) else '')
          + f'; {removed}; {self._resume_hint()}') from None

  def _remove_partial(self) -> str:
    """Removes the temporary directories of unfinished saves; says what it did."""
    if jax.process_index() != 0:
      return 'process 0 removes the partial checkpoint'
    partial = (list(self.directory.glob('*.orbax-checkpoint-tmp*'))
               if self.directory.exists() else [])
    try:
      for path in partial:
        shutil.rmtree(path)
    except OSError as e:
      return f'the partial checkpoint {partial[0]} could not be removed ({e.strerror})'
    return 'the partial checkpoint was removed' if partial else 'nothing partial was left'

  def latest_run(self) -> tuple[int, dict] | None:
    """(step, run record) of the newest checkpoint whose record reads, or None."""
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        run = self._run(step)
      except Exception:  # noqa: BLE001 - unreadable: restore_latest reports and moves it
        continue
      return None if run is None else (step, run)
    return None

  def _run(self, step: int) -> dict | None:
    """The run record of a checkpoint; None for one written before records were kept."""
    if not (self.directory / str(step) / 'run').exists():
      return None
    return self.manager.restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore()))['run']

  def restore_latest(self, abstract_state, data_iterator: grain.DatasetIterator, run: dict,
                     hint: str):
    """The newest checkpoint's state (data_iterator moved to its position), or None when the
    directory holds none. Raises ResumeError when it belongs to another configuration (`hint`
    says what to do) or when no checkpoint can be read."""
    wanted = shapes(abstract_state)
    for step in sorted(self.manager.all_steps(), reverse=True):
      # the files are checked on a thread while the arrays are read (the check costs a second
      # read of every byte), and nothing read is used, or reported, before the check is done
      with concurrent.futures.ThreadPoolExecutor(1) as pool:
        checked = pool.submit(checksums.check_files, self.directory / str(step))
        try:
          restored, error = self._restore(step, abstract_state, data_iterator, run, wanted,
                                          hint), None
        except Exception as e:  # noqa: BLE001 - decided below, once the files are checked
          restored, error = None, e
        try:
          found = checked.result()
          if found is not None:
            checksums.agree(self.directory / str(step), *found)
        except checksums.CorruptCheckpoint as corrupt:
          error = corrupt
      if isinstance(error, ResumeError):
        raise error
      if error is None:
        return restored
      self._set_aside(step, error)   # unreadable: the files are bad
    set_aside = sorted(p.name for p in self.directory.glob('*.corrupt*'))
    if set_aside:
      raise ResumeError(f'{self.directory} holds no readable checkpoint (unreadable: '
                        f'{", ".join(set_aside)}); never starting over in a directory that '
                        'holds a run: use a new --workdir, or remove them to start afresh')
    return None

  def _restore(self, step: int, abstract_state, data_iterator: grain.DatasetIterator,
               run: dict, wanted: dict, hint: str):
    """One checkpoint's state; ResumeError, before any array is read, when it belongs to
    another configuration."""
    saved_run = self._run(step)
    saved_shapes = shapes(self.manager.item_metadata(step)['state'])
    problems = differences(saved_run['signature'], run['signature']) if saved_run else []
    if not problems:   # same settings but other shapes: say which arrays
      problems = shape_differences(saved_shapes, wanted, 'params/') or shape_differences(
          saved_shapes, wanted, '')
    if problems:
      raise ResumeError(f'cannot resume {self.directory.parent} from step {step}: '
                        + '; '.join(problems) + f'. {hint}')
    return self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            abstract_state, ocp.checkpoint_utils.construct_restore_args(abstract_state)),
        data=grain.checkpoint.CheckpointRestore(data_iterator)))['state']

  def _set_aside(self, step: int, error: Exception) -> None:
    """Renames an unreadable checkpoint to STEP.corrupt (STEP.corrupt1, ... when taken),
    warning, so the next save of that step is not skipped; `set_aside` records it."""
    message = str(error).splitlines()[0] if str(error) else ''
    why = (message if isinstance(error, checksums.CorruptCheckpoint)
           else f'{type(error).__name__}: {message}')
    target, n = self.directory / f'{step}.corrupt', 1
    while target.exists():
      target, n = self.directory / f'{step}.corrupt{n}', n + 1
    self.set_aside.append((step, target.name, why))
    logging.warning('checkpoint %d in %s could not be read (%s); falling back to the '
                    'previous one and renaming it to %s', step, self.directory, why, target.name)
    distributed.barrier(f'checkpoint {step} checked')   # every process has looked at the names
    if jax.process_index() == 0:
      (self.directory / str(step)).rename(target)
    distributed.barrier(f'checkpoint {step} set aside')
    self.manager.reload()

  def wait(self) -> None:
    """Waits for the save in flight; StorageError if the storage refused it."""
    self._storage_guard(self._in_flight, self.manager.wait_until_finished)

  def close(self) -> None:
    self._storage_guard(self._in_flight, self.manager.close)


def load_params(step_dir: epath.Path, abstract_params, run: dict, field: str, fresh=None):
  """The parameters of another run's checkpoint, onto this run's shardings; ResumeError
  naming every parameter whose shape or dtype differs from this model's. Entries of `fresh`
  (new heads, e.g. a reward model's started from a language model) that the checkpoint
  lacks are taken from it."""
  verified(step_dir, field)
  saved_run = step_dir / 'run'
  if saved_run.exists():
    saved = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(saved_run)
    order = saved['signature']['layer order']
    if order != run['signature']['layer order']:
      raise ResumeError(f'{field}: {step_dir} stores its layers in {order} order, this run in '
                        f'{run["signature"]["layer order"]} order (pipeline stages x repeats)')
  checkpointer = ocp.PyTreeCheckpointer()
  metadata = checkpointer.metadata(step_dir / rundir.STATE).item_metadata
  new = {k for k in (fresh or {}) if k not in metadata['params']}
  wanted = {k: v for k, v in abstract_params.items() if k not in new}
  problems = shape_differences(shapes({'params': metadata['params']}),
                               shapes({'params': wanted}), 'params/')
  if problems:
    shown = problems[:6] + ([f'and {len(problems) - 6} more'] if len(problems) > 6 else [])
    raise ResumeError(f'{field}: the parameters of {step_dir} do not fit this model: '
                      + '; '.join(shown))
  target = {'params': wanted}
  restored = checkpointer.restore(step_dir / rundir.STATE, args=ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=True))
  return {**restored['params'], **{k: fresh[k] for k in new}}

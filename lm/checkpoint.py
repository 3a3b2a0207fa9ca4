"""Orbax checkpoints of the train state, the data iterator and what the run depends on.

A checkpoint holds everything a run needs to continue exactly: params, optimizer state,
step, RNG key (`state`), the Grain iterator position of every process (`data`) and the run's
record (`run`): its signature (the settings the state and the data position depend on, see
`signature`) and the learning-rate schedule it started with.

Resuming is exact or refused, never silent: a different signature or a state of other
shapes stops the run with one line naming each difference. Only an unreadable checkpoint
(truncated, corrupt) is skipped for an older one; it is renamed to STEP.corrupt so that later
saves are not refused, and a directory where no checkpoint restores is an error.
"""
import json
import logging
import os

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from lm import distributed
from lm.config import ConfigError

# Config fields that a checkpoint depends on: the parameters' shapes, dtypes and function,
# the optimizer state's structure, and what the data iterator's position means.
SIGNATURE_FIELDS = (
    'model.vocab_size', 'model.n_layers', 'model.d_model', 'model.n_heads', 'model.n_kv_heads',
    'model.d_ff', 'model.max_len', 'model.causal', 'model.positions', 'model.rope_theta',
    'model.norm', 'model.norm_eps', 'model.mlp', 'model.use_bias', 'model.tie_embeddings',
    'model.param_dtype', 'model.scan_layers', 'optim.name',
    'data.source', 'data.text_key', 'data.split_fractions', 'data.tfds_splits', 'data.tokenizer',
    'data.seq_len', 'data.packing', 'data.window_stride', 'data.add_eos',
    'train.batch_size', 'train.seed')
# Fields added later (post-training, compression), recorded when they differ from these
# defaults (so that checkpoints written before they existed still resume).
LATER_FIELDS = {'train.objective': 'lm', 'data.format': 'text', 'lora.rank': 0,
                'lora.targets': None, 'data.overlong': 'truncate',
                'model.attention_window': None, 'quant.scheme': 'none', 'quant.group_size': 0,
                'model.lowrank_rank': 0, 'model.attention_global_every': 0}


class ResumeError(ConfigError):
  """A checkpoint that this run cannot continue from (reported as one line, exit 2)."""


def signature(config, tokenizer_fingerprint: str, stages: int) -> dict:
  """What a checkpoint of this run depends on, as {field: value}."""
  sig = {field: _get(config, field) for field in SIGNATURE_FIELDS}
  sig.update({field: _get(config, field) for field, default in LATER_FIELDS.items()
              if _get(config, field) != default and not (field == 'lora.targets'
                                                          and not config.lora.rank)})
  repeats = config.model.pipeline_repeats
  # a circular pipeline stores its layers in stage-major order (lm.pipeline.logical_order)
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


class Checkpointer:
  """Keeps the last `keep` checkpoints under `directory`; every process must take part."""

  def __init__(self, directory: epath.Path, keep: int, async_save: bool = True):
    self.directory = directory
    self.manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save),
        item_handlers={'state': state_handler(),
                       'data': grain.checkpoint.CheckpointHandler(),
                       'run': ocp.JsonCheckpointHandler()})

  def save(self, step: int, state, data_iterator: grain.DatasetIterator, run: dict) -> None:
    saved = self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(state), data=grain.checkpoint.CheckpointSave(data_iterator),
        run=ocp.args.JsonSave(run)))
    if not saved:   # Orbax skips a step at or below its latest one without an error
      raise RuntimeError(f'checkpoint {step} was not written: {self.directory} already holds '
                         f'step {self.manager.latest_step()}')

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
      try:
        saved_run = self._run(step)
        saved_shapes = shapes(self.manager.item_metadata(step)['state'])
      except Exception as e:  # noqa: BLE001 - any failure to read means: unreadable
        self._set_aside(step, e)
        continue
      problems = differences(saved_run['signature'], run['signature']) if saved_run else []
      if not problems:   # same settings but other shapes: say which arrays
        problems = shape_differences(saved_shapes, wanted, 'params/') or shape_differences(
            saved_shapes, wanted, '')
      if problems:
        raise ResumeError(f'cannot resume {self.directory.parent} from step {step}: '
                          + '; '.join(problems) + f'. {hint}')
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                abstract_state, ocp.checkpoint_utils.construct_restore_args(abstract_state)),
            data=grain.checkpoint.CheckpointRestore(data_iterator)))
        return restored['state']
      except Exception as e:  # noqa: BLE001 - the settings match, so the files are bad
        self._set_aside(step, e)
    set_aside = sorted(p.name for p in self.directory.glob('*.corrupt*'))
    if set_aside:
      raise ResumeError(f'{self.directory} holds no readable checkpoint (unreadable: '
                        f'{", ".join(set_aside)}); never starting over in a directory that '
                        'holds a run: use a new --workdir, or remove them to start afresh')
    return None

  def _set_aside(self, step: int, error: Exception) -> None:
    """Renames an unreadable checkpoint to STEP.corrupt, warning, so the next save of that
    step is not skipped."""
    message = str(error).splitlines()[0] if str(error) else ''
    logging.warning('checkpoint %d in %s could not be read (%s: %s); falling back to the '
                    'previous one and renaming it to %d.corrupt', step, self.directory,
                    type(error).__name__, message, step)
    if jax.process_index() == 0:
      target, n = self.directory / f'{step}.corrupt', 1
      while target.exists():
        target, n = self.directory / f'{step}.corrupt{n}', n + 1
      (self.directory / str(step)).rename(target)
    distributed.barrier(f'checkpoint {step} set aside')
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def absolute(path) -> epath.Path:
  """`path` made absolute: Orbax refuses relative paths (gs:// ones are absolute)."""
  path = epath.Path(path)
  return path if path.is_absolute() else epath.Path(os.path.abspath(path))


def warm_start_dirs(init_from: str, field: str = 'config.train.init_from'
                    ) -> tuple[epath.Path, epath.Path]:
  """(run directory, checkpoint step directory) of a run directory (its newest checkpoint)
  or one of its checkpoints/STEP directories."""
  path = absolute(init_from)
  if (path / 'state').exists():
    return path.parent.parent, path
  steps = [int(p.name) for p in (path / 'checkpoints').glob('*') if p.name.isdigit()]
  if not steps:
    raise ConfigError(f'{field}={init_from!r} holds no checkpoint (give a run '
                      'directory or RUN_DIR/checkpoints/STEP)')
  return path, path / 'checkpoints' / str(max(steps))


def load_params(step_dir: epath.Path, abstract_params, run: dict, field: str, fresh=None):
  """The parameters of another run's checkpoint, onto this run's shardings; ResumeError
  naming every parameter whose shape or dtype differs from this model's. Entries of `fresh`
  (new heads, e.g. a reward model's started from a language model) that the checkpoint
  lacks are taken from it."""
  saved_run = step_dir / 'run'
  if saved_run.exists():
    saved = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(saved_run)
    order = saved['signature']['layer order']
    if order != run['signature']['layer order']:
      raise ResumeError(f'{field}: {step_dir} stores its layers in {order} order, this run in '
                        f'{run["signature"]["layer order"]} order (pipeline stages x repeats)')
  checkpointer = ocp.PyTreeCheckpointer()
  metadata = checkpointer.metadata(step_dir / 'state').item_metadata
  new = {k for k in (fresh or {}) if k not in metadata['params']}
  wanted = {k: v for k, v in abstract_params.items() if k not in new}
  problems = shape_differences(shapes({'params': metadata['params']}),
                               shapes({'params': wanted}), 'params/')
  if problems:
    shown = problems[:6] + ([f'and {len(problems) - 6} more'] if len(problems) > 6 else [])
    raise ResumeError(f'{field}: the parameters of {step_dir} do not fit this model: '
                      + '; '.join(shown))
  target = {'params': wanted}
  restored = checkpointer.restore(step_dir / 'state', args=ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=True))
  return {**restored['params'], **{k: fresh[k] for k in new}}

"""Orbax checkpoints of the train state and the data iterator, saved asynchronously.

A checkpoint holds everything a run needs to continue exactly: params, optimizer state,
step, RNG key (`state`) and the Grain iterator position of every process (`data`).
"""
import logging

import grain
import orbax.checkpoint as ocp
from etils import epath


class Checkpointer:
  """Keeps the last `keep` checkpoints under `directory`; every process must take part."""

  def __init__(self, directory: epath.Path, keep: int, async_save: bool = True):
    self.manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save),
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': grain.checkpoint.CheckpointHandler()})

  def save(self, step: int, state, data_iterator: grain.DatasetIterator) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator)))

  def restore_latest(self, abstract_state, data_iterator: grain.DatasetIterator):
    """The newest readable checkpoint's state (data_iterator is moved to its position), or
    None when there is none. An unreadable checkpoint is reported and the previous one used."""
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(data_iterator)))
        return restored['state']
      except Exception as e:  # noqa: BLE001 - any failure to read means: try an older one
        logging.warning('checkpoint %d in %s could not be restored (%s: %s); falling back to '
                        'the previous one', step, self.manager.directory, type(e).__name__,
                        str(e).splitlines()[0] if str(e) else '')
    return None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()

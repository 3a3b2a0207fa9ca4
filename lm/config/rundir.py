"""A run directory's layout, said once; every module that reads or writes one asks `RunDir`.

    RUN/config.json          the resolved config of the run (`lm.config.saved` reads it)
    RUN/tokenizer.json       its tokenizer, of any kind (`lm.data.tokenizers`)
    RUN/checkpoints/STEP/    one Orbax step: state/ (the train state), the data iterator's
                             position, the run record and checksums.json
    RUN/frozen/              what the objective reads but never trains (LoRA base, reference,
                             teacher), saved once when the run starts
    RUN/metrics.jsonl        one JSON line per logged step; RUN/tensorboard/ the same
    RUN/heartbeat.json       the last logged step, its time, and the wall-clock seconds of
                             each process segment of the run (a sweep's status reads it)
    RUN/final.json           the final metrics, written last: the run finished

It lives with the config, on the lowest floor, because the config (warm starts), the data
(the tokenizer) and the analysis commands read run directories as well as training.
"""
import dataclasses
import os

from etils import epath

from lm.config.checks import ConfigError

STATE = 'state'   # a step directory's item holding the train state (or a run's parameters)


def absolute(path: str | os.PathLike) -> epath.Path:
  """`path` made absolute: Orbax refuses relative paths (gs:// ones are absolute)."""
  path = epath.Path(path)
  return path if path.is_absolute() else epath.Path(os.path.abspath(path))


@dataclasses.dataclass(frozen=True)
class RunDir:
  path: epath.Path

  def __post_init__(self):
    object.__setattr__(self, 'path', absolute(self.path))

  config = property(lambda self: self.path / 'config.json')
  tokenizer = property(lambda self: self.path / 'tokenizer.json')
  checkpoints = property(lambda self: self.path / 'checkpoints')
  frozen = property(lambda self: self.path / 'frozen')
  metrics = property(lambda self: self.path / 'metrics.jsonl')
  tensorboard = property(lambda self: self.path / 'tensorboard')
  heartbeat = property(lambda self: self.path / 'heartbeat.json')
  final = property(lambda self: self.path / 'final.json')

  def step(self, step: int) -> epath.Path:
    return self.checkpoints / str(step)

  def steps(self) -> list[int]:
    """The steps of the checkpoint directories, oldest first (set-aside ones excluded)."""
    if not self.checkpoints.exists():
      return []
    return sorted(int(p.name) for p in self.checkpoints.iterdir() if p.name.isdigit())

  @classmethod
  def locate(cls, path: str | os.PathLike, field: str) -> tuple['RunDir', epath.Path]:
    """(the run, a step directory) of a run directory (its newest checkpoint) or of one of its
    RUN/checkpoints/STEP directories; `field` names the flag or key in the error."""
    given = absolute(path)
    if (given / STATE).exists():
      return cls(given.parent.parent), given
    run = cls(given)
    if not run.steps():
      raise ConfigError(f'{field}={os.fspath(path)!r} holds no checkpoint (give a run '
                        'directory or RUN_DIR/checkpoints/STEP)')
    return run, run.step(run.steps()[-1])

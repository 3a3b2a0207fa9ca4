"""A sweep's work queue, kept next to its runs (a local directory or gs://): runners on any
number of slices take points from it, one at a time, and no point goes to two runners.

    SWEEP/queue/<point>/point.json      the point: its overrides, workdir, command
    SWEEP/queue/<point>/claim-N.json    attempt N: which runner took it, when
    SWEEP/queue/<point>/beat-N.json     the runner of attempt N is alive (rewritten)
    SWEEP/queue/<point>/end-N.json      attempt N ended: exit code (a clean exit or a failure)
    SWEEP/queue/<point>/failed.json     given up after max_failures failed attempts

Taking a point is creating claim-(N+1) only if it does not exist yet: `O_EXCL` on a local
disk, `ifGenerationMatch=0` on GCS (fsspec's `mode='create'`), atomic on both, so of two
runners racing for a point exactly one wins. Attempt N is live while its runner rewrites
beat-N; one silent for longer than the heartbeat timeout (a preempted slice, a killed
process) leaves the point claimable again, and the next claim resumes it from its last
checkpoint. A point is done when its workdir holds final.json (written by lm.training.loop).
"""
import dataclasses
import functools
import json
import os
import re
import socket
import tempfile
import time
import uuid

import fsspec

QUEUE = 'queue'
STATES = ('pending', 'running', 'preempted', 'done', 'failed')


def _fs(path: str):
  fs, root = fsspec.core.url_to_fs(str(path))
  return fs, root.rstrip('/')


def read_json(fs, path: str) -> dict | None:
  """A small JSON file, None when it does not exist."""
  try:
    return json.loads(fs.cat_file(path))
  except FileNotFoundError:
    return None


def write_json(fs, path: str, record: dict, create: bool = False) -> bool:
  """Writes a small JSON file whole, so that a reader never sees it half written; with
  create=True only if it does not exist yet (returns False if it did). On a local disk
  through a temporary file linked (create) or renamed into place; on an object store an
  upload is atomic, and `mode='create'` makes it conditional (ifGenerationMatch=0)."""
  data = json.dumps(record).encode()
  directory = path.rsplit('/', 1)[0]
  fs.makedirs(directory, exist_ok=True)
  if 'file' not in fs.protocol:
    try:
      fs.pipe_file(path, data, mode='create' if create else 'overwrite')
    except FileExistsError:
      return False
    return True
  fd, tmp = tempfile.mkstemp(dir=directory, suffix='.tmp')
  with os.fdopen(fd, 'wb') as f:
    f.write(data)
  if not create:
    os.replace(tmp, path)
    return True
  try:
    os.link(tmp, path)   # atomic, and fails if path exists
  except FileExistsError:
    return False
  finally:
    os.unlink(tmp)
  return True


@dataclasses.dataclass
class Point:
  name: str
  workdir: str
  command: list[str]        # run as is; the point's overrides are part of it
  overrides: dict
  first_attempt: int = 1    # failures before a relaunch of the sweep do not count


@dataclasses.dataclass
class Claim:
  point: Point
  attempt: int
  runner: str


@dataclasses.dataclass
class PointState:
  point: Point
  state: str                # one of STATES
  attempts: int             # claims so far
  failures: int             # failed attempts since first_attempt
  runner: str | None        # of the newest claim
  token: str | None         # the process that made it
  beat_age_s: float | None  # since the newest claim's runner last showed it was alive


class Queue:
  """The queue of one sweep directory."""

  def __init__(self, sweep_dir: str, heartbeat_timeout_s: float = 600.0,
               max_failures: int = 3):
    self.sweep_dir = str(sweep_dir).rstrip('/')
    self.timeout = heartbeat_timeout_s
    self.max_failures = max_failures
    self.token = uuid.uuid4().hex   # tells this process's claims from a restarted runner's

  @functools.cached_property
  def _store(self):   # on first use: a dry run of a gs:// sweep needs no GCS client
    return _fs(self.sweep_dir)

  @property
  def fs(self):
    return self._store[0]

  @property
  def root(self) -> str:
    return self._store[1]

  # -- files -------------------------------------------------------------------------------
  def _path(self, name: str, file: str = '') -> str:
    return '/'.join(p for p in (self.root, QUEUE, name, file) if p)

  def _read(self, path: str) -> dict | None:
    return read_json(self.fs, path)

  def _write(self, path: str, record: dict, create: bool = False) -> bool:
    return write_json(self.fs, path, record, create)

  def _files(self, name: str) -> list[str]:
    directory = self._path(name)
    self.fs.invalidate_cache(directory)   # gcsfs caches listings; the queue changes under us
    try:
      return [p.rsplit('/', 1)[-1] for p in self.fs.ls(directory, detail=False)]
    except FileNotFoundError:
      return []

  # -- the sweep's side --------------------------------------------------------------------
  def add(self, points: list[Point]) -> None:
    """Puts the points in the queue (again). A point that had failed is retried from the next
    attempt on; a finished one stays finished (its final.json)."""
    for point in points:
      failed = self._path(point.name, 'failed.json')
      if self.exists(failed):   # retried: its earlier failures no longer count
        point.first_attempt = self._attempts(self._files(point.name)) + 1
        self.fs.rm_file(failed)
      else:
        stored = self._read(self._path(point.name, 'point.json'))
        point.first_attempt = stored['first_attempt'] if stored else 1
      self._write(self._path(point.name, 'point.json'), dataclasses.asdict(point))

  def exists(self, path: str) -> bool:
    self.fs.invalidate_cache(path.rsplit('/', 1)[0])
    return self.fs.exists(path)

  def points(self) -> list[Point]:
    directory = '/'.join((self.root, QUEUE))
    self.fs.invalidate_cache(directory)
    if not self.fs.exists(directory):
      return []
    names = sorted(p.rsplit('/', 1)[-1] for p in self.fs.ls(directory, detail=False))
    records = [self._read(self._path(name, 'point.json')) for name in names]
    return [Point(**r) for r in records if r]

  # -- state -------------------------------------------------------------------------------
  @staticmethod
  def _attempts(files: list[str]) -> int:
    numbers = [int(m.group(1)) for f in files if (m := re.fullmatch(r'claim-(\d+)\.json', f))]
    return max(numbers, default=0)

  def state(self, point: Point, now: float | None = None) -> PointState:
    now = time.time() if now is None else now
    files = self._files(point.name)
    attempt = self._attempts(files)
    failures = 0
    for n in range(point.first_attempt, attempt + 1):
      end = self._read(self._path(point.name, f'end-{n}.json')) if f'end-{n}.json' in files \
          else None
      failures += bool(end and end['exit_code'])
    claim = self._read(self._path(point.name, f'claim-{attempt}.json')) if attempt else None
    beat = self._read(self._path(point.name, f'beat-{attempt}.json')) if attempt else None
    age = now - max(claim['time'], beat['time'] if beat else 0) if claim else None
    if self.done(point):
      state = 'done'
    elif 'failed.json' in files:
      state = 'failed'
    elif not attempt or f'end-{attempt}.json' in files:
      state = 'pending'
    else:
      state = 'running' if age < self.timeout else 'preempted'
    return PointState(point, state, attempt, failures, claim and claim['runner'],
                      claim and claim.get('token'), age)

  def done(self, point: Point) -> bool:
    return self.exists(f'{_fs(point.workdir)[1]}/final.json')

  def states(self) -> list[PointState]:
    return [self.state(p) for p in self.points()]

  # -- the runner's side -------------------------------------------------------------------
  def claim(self, runner: str) -> Claim | None:
    """Takes the next point that is pending or whose runner went silent: first one held under
    this runner's name by an earlier process (the runner was restarted: its slice recreated),
    then in order. None when no point is left to take."""
    states = [s for s in self.states() if s.state in ('pending', 'preempted')
              or (s.state == 'running' and s.runner == runner and s.token != self.token)]
    states.sort(key=lambda s: s.runner != runner)
    for s in states:
      attempt = s.attempts + 1
      if self._write(self._path(s.point.name, f'claim-{attempt}.json'),
                     {'runner': runner, 'host': socket.gethostname(), 'pid': os.getpid(),
                      'token': self.token, 'time': time.time()},
                     create=True):
        return Claim(s.point, attempt, runner)
    return None

  def beat(self, claim: Claim) -> bool:
    """Shows the claim's runner is alive; False when another runner has taken the point since
    (this one was silent too long) and this one must stop."""
    if self._attempts(self._files(claim.point.name)) != claim.attempt:
      return False
    self._write(self._path(claim.point.name, f'beat-{claim.attempt}.json'),
                {'runner': claim.runner, 'time': time.time()})
    return True

  def end(self, claim: Claim, exit_code: int, log_tail: str = '') -> str:
    """Records how the attempt ended; returns the point's state after it ('failed' once it
    has failed max_failures times)."""
    self._write(self._path(claim.point.name, f'end-{claim.attempt}.json'),
                {'exit_code': exit_code, 'time': time.time()})
    state = self.state(claim.point)
    if exit_code and state.failures >= self.max_failures:
      self._write(self._path(claim.point.name, 'failed.json'),
                  {'failures': state.failures, 'log_tail': log_tail, 'time': time.time()})
      return 'failed'
    return state.state

  def unfinished(self, states: list[PointState] | None = None) -> bool:
    states = self.states() if states is None else states
    return any(s.state not in ('done', 'failed') for s in states)

  def claimable(self, states: list[PointState] | None = None) -> bool:
    states = self.states() if states is None else states
    return any(s.state in ('pending', 'preempted') for s in states)

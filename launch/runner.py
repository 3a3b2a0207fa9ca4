"""A runner: takes sweep points from the queue (launch/queue.py) one at a time and runs each
to its end, until none is left to take.

    python -m launch.runner --sweep_dir DIR --slice NAME [--worker N|auto --workers W]
        [--max_failures 3] [--heartbeat_s 30] [--heartbeat_timeout_s 600]

One runs on every worker (host) of a slice. Worker 0 claims the points, keeps the claim
alive while the point runs and records how it ended; it announces each point in
DIR/slices/NAME.json, and the other workers run the same command beside it (the hosts of one
multi-host run). A point's output goes to its workdir's log.txt (copied there at every
heartbeat when the workdir is on GCS). Exit status 0 once the queue has nothing left to take.
"""
import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import fsspec

from launch import queue as queue_lib
from lm.config import arguments

LOG_TAIL_LINES = 40
METADATA = ('http://metadata.google.internal/computeMetadata/v1/instance/attributes/'
            'agent-worker-number')


def _die_with_parent() -> None:
  """The point's process is killed with its runner (PR_SET_PDEATHSIG), as a preempted host's
  would be: no run goes on writing to a workdir whose claim has lapsed."""
  if sys.platform.startswith('linux'):
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)


class _Log:
  """The point's output: appended to WORKDIR/log.txt, or for a workdir on an object store
  written locally and copied there by sync()."""

  def __init__(self, workdir: str, name: str = 'log.txt'):
    self.fs, root = fsspec.core.url_to_fs(workdir)
    self.target = f'{root.rstrip("/")}/{name}'
    self.fs.makedirs(root, exist_ok=True)
    local = 'file' in self.fs.protocol
    self.path = self.target if local else tempfile.mkstemp(suffix='.log')[1]
    self.remote = not local
    self.file = open(self.path, 'ab')

  def sync(self) -> None:
    self.file.flush()
    if self.remote:
      self.fs.put_file(self.path, self.target)

  def tail(self) -> str:
    self.sync()
    with open(self.path, 'rb') as f:
      return b''.join(f.readlines()[-LOG_TAIL_LINES:]).decode(errors='replace')


def run_point(queue: queue_lib.Queue, claim: queue_lib.Claim, heartbeat_s: float) -> int:
  """Runs the claimed point, beating while it runs; returns its exit code."""
  log = _Log(claim.point.workdir)
  log.file.write(f'\n== attempt {claim.attempt} by {claim.runner} at {time.ctime()} ==\n'
                 .encode())
  log.sync()
  proc = subprocess.Popen(claim.point.command, stdout=log.file, stderr=subprocess.STDOUT,
                          preexec_fn=_die_with_parent)
  while True:
    try:
      code = proc.wait(timeout=heartbeat_s)
      break
    except subprocess.TimeoutExpired:
      log.sync()
      if not queue.beat(claim):   # silent too long: another runner has it now
        proc.kill()
        proc.wait()
        print(f'{claim.point.name}: claim lost to another runner; stopped', flush=True)
        return -1
  state = queue.end(claim, code, log.tail() if code else '')
  if state == 'failed':
    fs, root = fsspec.core.url_to_fs(claim.point.workdir)
    fs.pipe_file(f'{root.rstrip("/")}/failure.txt', log.tail().encode())
  print(f'{claim.point.name}: exit {code} ({state})', flush=True)
  return code


def lead(queue: queue_lib.Queue, runner: str, heartbeat_s: float, announce) -> None:
  """Worker 0: claims and runs points until none is left."""
  while (claim := queue.claim(runner)) is not None:
    announce({'point': claim.point.name, 'attempt': claim.attempt})
    run_point(queue, claim, heartbeat_s)
  announce({'point': None})
  print(f'{runner}: nothing left to take', flush=True)


def follow(queue: queue_lib.Queue, read, worker: int, poll_s: float) -> None:
  """Workers 1..W-1: run each point worker 0 announces, beside it, while that attempt is the
  point's live one (an announcement left from before a preemption is not run again)."""
  started, last = time.time(), None
  while True:
    record = read()
    if record and record['point'] is None and record['time'] > started:
      return
    if record and record['point'] is not None and (record['point'], record['attempt']) != last:
      point = next((p for p in queue.points() if p.name == record['point']), None)
      live = point and queue.state(point)
      if live and live.state == 'running' and live.attempts == record['attempt']:
        last = (record['point'], record['attempt'])
        log = _Log(point.workdir, f'log-worker-{worker}.txt')
        subprocess.run(point.command, stdout=log.file, stderr=subprocess.STDOUT,
                       preexec_fn=_die_with_parent)
        log.sync()
    time.sleep(poll_s)


def worker_number(value: str) -> int:
  """--worker: a number, or 'auto' = this TPU VM's worker number from the metadata server."""
  if value != 'auto':
    return int(value)
  request = urllib.request.Request(METADATA, headers={'Metadata-Flavor': 'Google'})
  try:
    with urllib.request.urlopen(request, timeout=5) as response:
      return int(response.read())
  except OSError:   # not on a TPU VM: a single host
    return 0


def main(argv=None) -> None:
  parser = arguments.parser('python -m launch.runner', __doc__.split('\n')[0])
  parser.add_argument('--sweep_dir', required=True, help='the sweep (its queue/ and points)')
  parser.add_argument('--slice', required=True, help='this runner\'s name (its slice)')
  parser.add_argument('--worker', default='0', help="this host's number in the slice, or auto")
  parser.add_argument('--workers', type=int, default=1, help='hosts in the slice')
  parser.add_argument('--max_failures', type=int, default=3,
                      help='failed attempts before a point is marked failed')
  parser.add_argument('--heartbeat_s', type=float, default=30.0,
                      help="seconds between this runner's heartbeats")
  parser.add_argument('--heartbeat_timeout_s', type=float, default=600.0,
                      help='a point whose runner is silent this long is taken by another')
  args = parser.parse_args(argv)
  queue = queue_lib.Queue(args.sweep_dir, args.heartbeat_timeout_s, args.max_failures)
  fs, root = fsspec.core.url_to_fs(args.sweep_dir)
  board = f'{root.rstrip("/")}/slices/{args.slice}.json'
  worker = worker_number(args.worker)
  if worker == 0:
    def announce(record):
      if args.workers > 1:
        queue_lib.write_json(fs, board, {**record, 'time': time.time()})
    lead(queue, args.slice, args.heartbeat_s, announce)
  else:
    def read():
      fs.invalidate_cache(board.rsplit('/', 1)[0])
      return queue_lib.read_json(fs, board)
    follow(queue, read, worker, poll_s=min(args.heartbeat_s, 5.0))


if __name__ == '__main__':
  os.environ.setdefault('PYTHONUNBUFFERED', '1')
  main()

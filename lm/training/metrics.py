"""Throughput and model FLOPs utilisation, and the writers: metrics.jsonl and TensorBoard."""
import json
import math
import sys
import tempfile
import time

import jax
from etils import epath

from lm.config import RunDir
from lm.parallel import tpus

# Dense bf16 peak FLOP/s per device, from the vendors' data sheets; matched against
# jax.Device.device_kind in order (so 'TPU v5 lite' is matched before 'TPU v5').
PEAK_FLOPS = tuple((g.device_kind, g.peak_flops) for g in tpus.GENERATIONS.values()) + (
    ('H200', 989e12), ('H100', 989e12), ('A100', 312e12),
)


def peak_flops(device: jax.Device) -> float | None:
  """Peak FLOP/s of one device, or None where unknown (CPUs among them)."""
  for kind, peak in PEAK_FLOPS:
    if kind.lower() in device.device_kind.lower():
      return peak
  return None


def throughput(steps: int, seconds: float, tokens_per_step: int, flops_per_token: float,
               devices: list[jax.Device]) -> dict[str, float | None]:
  """Step time, tokens/s, achieved TFLOP/s and MFU (None where the peak is unknown)."""
  tokens_per_s = steps * tokens_per_step / seconds
  flops = tokens_per_s * flops_per_token
  peak = peak_flops(devices[0])
  return {'step_ms': 1e3 * seconds / steps, 'tokens_per_s': tokens_per_s,
          'tflops': flops / 1e12, 'mfu': flops / (peak * len(devices)) if peak else None}


class MetricsWriter:
  """Appends `{'step': n, name: value, ...}` lines to metrics.jsonl and TensorBoard events.

  On resume from `start_step`, lines and events logged after it by the interrupted run
  are dropped, so the files read as one uninterrupted run. On object stores (gs://), which
  cannot append, metrics.jsonl is rewritten whole and TensorBoard events are written
  locally and copied to the workdir's tensorboard/ at every write.

  Every write also rewrites heartbeat.json (step, total steps, time, last validation loss):
  a few bytes that a sweep's status table reads instead of the whole metrics file. It also
  holds the run's `segments`, one per process that trained it ({start_step, end_step,
  wall_s}, this one's from `started`, a time.perf_counter()), so that a run's wall-clock time
  sums every segment's, those of interrupted processes included.

  A run's final evaluation is logged once: on resume its test_* line is dropped."""

  def __init__(self, workdir: epath.Path, start_step: int = 0, enabled: bool = True,
               total_steps: int | None = None, started: float | None = None):
    self.enabled = enabled
    self.started = time.perf_counter() if started is None else started
    if not enabled:
      return
    run = RunDir(workdir)
    self.path, self.heartbeat_path = run.metrics, run.heartbeat
    previous = json.loads(run.heartbeat.read_text()) if run.heartbeat.exists() else {}
    self.segments = [*previous.get('segments', []),
                     {'start_step': start_step, 'end_step': start_step, 'wall_s': 0.0}]
    self.heartbeat = {'steps': total_steps, 'val_loss': None, 'segments': self.segments}
    self.remote = is_remote(workdir)
    self.lines = []
    if self.path.exists():
      self.lines = [line + '\n' for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)['step'] <= start_step
                    and not any(k.startswith('test_') for k in json.loads(line))]
      self.path.write_text(''.join(self.lines))
      losses = [row['val_loss'] for row in map(json.loads, self.lines) if 'val_loss' in row]
      self.heartbeat['val_loss'] = losses[-1] if losses else None
    self.tb_dir = run.tensorboard
    local_tb = tempfile.mkdtemp(prefix='lm-tensorboard-') if self.remote else str(self.tb_dir)
    self.tb = _summary_writer()(local_tb, purge_step=start_step + 1 if start_step else None)

  def write(self, step: int, metrics: dict[str, float | None]) -> None:
    if not self.enabled:
      return
    clean = {k: _plain(v) for k, v in metrics.items()}
    line = json.dumps({'step': step, **clean}) + '\n'
    self.lines.append(line)
    if self.remote:
      self.path.write_text(''.join(self.lines))
    else:
      with self.path.open('a') as f:   # appending loses nothing if the process is killed
        f.write(line)
    self.segments_now(step)
    self.heartbeat.update(step=step, time=time.time(),
                          val_loss=clean.get('val_loss', self.heartbeat['val_loss']))
    self.heartbeat_path.write_text(json.dumps(self.heartbeat))
    for name, value in clean.items():
      if value is not None and not isinstance(value, str):
        self.tb.add_scalar(name, value, step)
    self.tb.flush()
    if self.remote:
      self.tb_dir.mkdir(parents=True, exist_ok=True)
      for event_file in epath.Path(self.tb.logdir).iterdir():
        event_file.copy(self.tb_dir / event_file.name, overwrite=True)

  def segments_now(self, step: int) -> list[dict]:
    """The run's segments with this one's ended now, at `step` (this process's alone where
    it does not write the metrics)."""
    now = {'end_step': step, 'wall_s': round(time.perf_counter() - self.started, 3)}
    if not self.enabled:
      return [now]
    self.segments[-1].update(now)
    return self.segments

  def close(self) -> None:
    if self.enabled:
      self.tb.close()


def _summary_writer():
  """tensorboardX's SummaryWriter, imported here (only the logging process needs it) without
  the optional modules it imports wherever they are installed and lm does not use: PyTorch
  (to accept its tensors) and Google Cloud Storage (lm writes events locally, then copies
  them). They took 3.1 of the 3.6 s `import tensorboardX` took here."""
  unused = [name for name in ('torch', 'google.cloud.storage') if name not in sys.modules]
  for name in unused:
    sys.modules[name] = None   # importing it raises ImportError, which tensorboardX expects
  try:
    from tensorboardX import SummaryWriter
  finally:
    for name in unused:
      del sys.modules[name]
  return SummaryWriter


def is_remote(path: epath.Path) -> bool:
  """An object-store path (gs://, s3://): no appending, no local file handles."""
  return '://' in str(path)


def _plain(value):
  if value is None or isinstance(value, str):
    return value
  value = float(value)
  return value if math.isfinite(value) else str(value)

"""MFU against the peak table, and the metrics writers (local and object-store paths)."""
import json
import subprocess
import sys
import time
import types

import pytest
from etils import epath

from lm.training import metrics


@pytest.mark.parametrize('kind, peak', [('TPU v5 lite', 197e12), ('TPU v5p', 459e12),
                                        ('NVIDIA H100 80GB HBM3', 989e12), ('cpu', None)])
def test_peak_flops_and_mfu(kind, peak):
  device = types.SimpleNamespace(device_kind=kind)
  assert metrics.peak_flops(device) == peak
  t = metrics.throughput(steps=10, seconds=2.0, tokens_per_step=1000, flops_per_token=1e9,
                         devices=[device] * 4)
  assert t['tokens_per_s'] == 5000 and t['step_ms'] == 200 and t['tflops'] == 5.0
  assert t['mfu'] == (5e12 / (4 * peak) if peak else None)


def test_resume_drops_what_the_interrupted_run_logged_after_the_checkpoint(tmp_path):
  workdir = epath.Path(tmp_path)
  writer = metrics.MetricsWriter(workdir)
  for step in (10, 20, 30):
    writer.write(step, {'loss': 1.0 / step, 'mfu': None, 'bad': float('nan')})
  writer.close()
  resumed = metrics.MetricsWriter(workdir, start_step=20)
  resumed.write(30, {'loss': 0.5})
  lines = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [m['step'] for m in lines] == [10, 20, 30] and lines[-1]['loss'] == 0.5
  assert lines[0]['mfu'] is None and lines[0]['bad'] == 'nan'


def test_heartbeat_has_the_step_the_total_and_the_last_validation_loss(tmp_path):
  workdir = epath.Path(tmp_path)
  writer = metrics.MetricsWriter(workdir, total_steps=50)
  before = time.time()
  writer.write(10, {'loss': 3.0})
  writer.write(10, {'val_loss': 2.75})
  writer.write(20, {'loss': 2.5})
  beat = json.loads((workdir / 'heartbeat.json').read_text())
  assert (beat['step'], beat['steps'], beat['val_loss']) == (20, 50, 2.75)
  assert before <= beat['time'] <= time.time()   # the time of the last write
  writer.close()
  resumed = metrics.MetricsWriter(workdir, start_step=10, total_steps=50)   # kept on resume
  resumed.write(11, {'loss': 2.4})
  beat = json.loads((workdir / 'heartbeat.json').read_text())
  assert (beat['step'], beat['val_loss']) == (11, 2.75)


def test_object_store_workdirs_rewrite_metrics_and_copy_events(tmp_path, monkeypatch):
  """gs:// cannot append: the writer rewrites metrics.jsonl and copies TensorBoard events
  (exercised on a local directory that the writer is told is remote)."""
  workdir = epath.Path(tmp_path)
  monkeypatch.setattr(metrics, 'is_remote', lambda path: True)
  writer = metrics.MetricsWriter(workdir)
  writer.write(1, {'loss': 2.0})
  writer.write(2, {'loss': 1.5})
  assert (workdir / 'metrics.jsonl').read_text().count('\n') == 2
  assert writer.remote
  events = list((workdir / 'tensorboard').iterdir())
  assert events and all(p.name.startswith('events.out.tfevents') for p in events)


def test_tensorboard_events_are_written_without_importing_torch_or_cloud_storage(tmp_path):
  """tensorboardX imports PyTorch and Google Cloud Storage wherever they are installed (3.1 s
  of every run's start); the writer keeps them out, and both still import afterwards."""
  unused = ('torch', 'google.cloud.storage')
  code = ('import importlib, sys; from etils import epath; from lm.training import metrics; '
          f'w = metrics.MetricsWriter(epath.Path({str(tmp_path)!r})); '
          'w.write(1, {"loss": 2.0}); w.close(); '
          f'print([m in sys.modules for m in {unused}]); '
          f'print([importlib.import_module(m).__name__ for m in {unused}])')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  assert out.stdout.splitlines() == ['[False, False]', str(list(unused))]
  (events,) = (tmp_path / 'tensorboard').iterdir()
  assert b'loss' in events.read_bytes()

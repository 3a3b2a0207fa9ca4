"""Training throughput of an experiment: prints one JSON line.

    python benchmarks/throughput.py --config experiments/shakespeare_char.py [--steps 200]
        [--config.model.remat=full ...] [--compare KEY=V1,V2,... ...]
        [--profile N [--profile_steps 20]]

Keys: compile_s (first step, tracing + compilation), step_ms (median over windows of 10
steps dispatched back to back),
tokens_per_s, tflops (achieved, model FLOPs of lm.model.ModelConfig.flops_per_token),
mfu (where the device's peak is known), pipeline_stages and pipeline_bubble (the idle
fraction of stage-ticks, (S - 1) / (R M + S - 1)), peak_memory_gb (device allocator peak, or
the process's peak resident memory on CPU).

`--profile N` then traces `--profile_steps` more steps with `jax.profiler` and adds
`profile`: where the step's time goes, measured. Each kernel the trace records (an XLA:CPU
thunk, a GPU kernel) is named by the JAX operation it came from, as `lm.plan --breakdown`
names TPU estimates (`lm.planning.hlo`): `kernel_ms`, the kernels' time per step summed over the
devices (threads run them side by side, so it can exceed `step_ms`), `operations`, the N
largest operations in milliseconds per step, and `traced_step_ms`, the traced steps'
wall-clock (the tracer's own cost included: about 1.5-2x `step_ms` on CPU).

`--compare KEY=V1,V2,...` (as lm.plan's --sweep; several flags: every combination) builds
the step of each value in this one process and times their windows in turns, so that all
see the same moments of a noisy machine: one line per value, with its overrides under
`point` and, after the first, `vs_first`, the median over windows of its window's time over
the first value's window beside it. Values that change the devices (mesh.cpu_devices) cannot
be compared in one process.
"""
import collections
import json
import pathlib
import resource
import tempfile
import time

import jax
import numpy as np

from lm import cli
from lm import config as config_lib
from lm.config import ConfigError, arguments, sweeps
from lm.model import pipeline
from lm.planning import hlo
from lm.training import loop as train
from lm.training import metrics
from lm.training import start as start_lib

WINDOW = 10   # steps per timed window


def _peak_memory_gb() -> float:
  stats = jax.local_devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return stats['peak_bytes_in_use'] / 1e9
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6   # kB on Linux


class Stepper:
  """One config's compiled train step, its state and 16 batches, stepped a window at a time."""

  def __init__(self, config, experiment: str):
    config_lib.validate(config_lib.resolve(config, None), jax.device_count())
    ready = start_lib.setup(config, None)
    self.config, data, self.program = ready.config, ready.data, ready.program
    self.experiment = experiment
    self.state = self.program.init(jax.random.PRNGKey(0))
    self.batches = [train.global_batch(self.program, next(data.train),
                                       self.config.train.batch_size) for _ in range(16)]
    self.times, self.steps = [], 0
    start = time.perf_counter()
    self.window(1)
    self.compile_s = time.perf_counter() - start
    self.window(WINDOW)   # warm-up

  def window(self, steps: int) -> float:
    """Seconds per step of `steps` steps dispatched back to back, as the training loop does
    (the host queues step n + 1 while step n runs), blocking only at the end: the host's share
    is what a run pays (on a GPU or TPU it overlaps the device's)."""
    start = time.perf_counter()
    for _ in range(steps):
      self.state, m = self.program.train_step(self.state, self.batches[self.steps % 16])
      self.steps += 1
    jax.block_until_ready(m)
    return (time.perf_counter() - start) / steps

  def profile(self, top: int, steps: int) -> dict:
    """`profile` of the module docstring: `steps` steps traced, their kernels' time by
    the JAX operation each came from (the step's HLO, compiled again as the run compiled it)."""
    text = self.program.lower_train_step(self.state, self.batches[0],
                                         self.program.frozen).compile().as_text()
    module = text.split(',', 1)[0].removeprefix('HloModule ')   # jit_train_step
    with tempfile.TemporaryDirectory() as trace:
      jax.profiler.start_trace(trace)
      traced_s = self.window(steps)
      jax.profiler.stop_trace()
      kernel_ns = _kernel_ns(next(pathlib.Path(trace).rglob('*.xplane.pb')), module)
    ms = {name: ns / 1e6 / steps
          for name, ns in hlo.by_operation(text, kernel_ns).items()}
    return {'traced_step_ms': round(1e3 * traced_s, 2), 'kernel_ms': round(sum(ms.values()), 2),
            'operations': [[name, round(ms[name], 3)]
                           for name in sorted(ms, key=ms.get, reverse=True)[:top]]}

  def row(self) -> dict:
    config, program = self.config, self.program
    stages = program.mesh.shape['stage']
    result = metrics.throughput(1, float(np.median(self.times)),
                                config.train.batch_size * config.data.seq_len,
                                program.model_config.flops_per_token(config.data.seq_len),
                                jax.devices())
    return {
        'experiment': self.experiment,
        'device': jax.devices()[0].device_kind, 'devices': jax.device_count(),
        'compile_s': round(self.compile_s, 2), 'step_ms': round(result['step_ms'], 2),
        'tokens_per_s': round(result['tokens_per_s']), 'tflops': round(result['tflops'], 4),
        'mfu': result['mfu'] and round(result['mfu'], 4),
        'pipeline_stages': stages,
        'pipeline_bubble': round(pipeline.bubble_fraction(
            stages, config.model.pipeline_microbatches, config.model.pipeline_repeats), 4),
        'peak_memory_gb': round(_peak_memory_gb(), 3)}


def _kernel_ns(xplane: pathlib.Path, module: str) -> collections.Counter:
  """Nanoseconds by HLO instruction of the kernels of `module` in a trace: events that carry
  `hlo_module` and `hlo_op`, on the device planes where any has them (GPU), else on the host's
  (XLA:CPU runs its kernels on host threads)."""
  planes = collections.defaultdict(collections.Counter)
  for plane in jax.profiler.ProfileData.from_file(str(xplane)).planes:
    for line in plane.lines:
      for event in line.events:
        stats = dict(event.stats)
        if stats.get('hlo_module') == module and 'hlo_op' in stats:
          planes[plane.name][stats['hlo_op']] += event.duration_ns
  devices = [name for name in planes if name.startswith('/device:')]
  return sum((planes[name] for name in devices or planes), collections.Counter())


def _parser():
  parser = arguments.parser('python benchmarks/throughput.py', __doc__)
  arguments.add_config(parser, lock=False)
  parser.add_argument('--steps', type=int, default=200,
                      help='timed steps (after one compile step and 10 warm-up)')
  parser.add_argument('--compare', action='append', default=[], metavar='KEY=V1,V2,...',
                      help='time the step with each value, in turns in this process')
  parser.add_argument('--profile', type=int, default=0, metavar='N', help='N > 0: also trace '
                      'steps and list the N operations whose kernels took the most time')
  parser.add_argument('--profile_steps', type=int, default=20, help='steps traced for --profile')
  return parser


def main(argv: list[str]) -> None:
  args = arguments.parse(_parser(), argv)
  try:
    points = sweeps.sweep_points(args.compare, '--compare')
    if any('mesh.cpu_devices' in point for point in points):
      raise ConfigError('--compare: mesh.cpu_devices sets the devices of the process; compare '
                        'it across runs of this command')
    configs = [sweeps.apply(args.config, point) for point in points]
  except ConfigError as e:
    arguments.fail(str(e))
  cli.split_cpu(args.config.mesh.cpu_devices)
  steppers = [Stepper(config, args.experiment) for config in configs]
  for _ in range(0, args.steps, WINDOW):
    for stepper in steppers:
      stepper.times.append(stepper.window(WINDOW))
  for point, stepper in zip(points, steppers):
    row = stepper.row()
    if args.profile > 0:
      row['profile'] = stepper.profile(args.profile, args.profile_steps)
    if len(points) > 1:
      row['point'] = point
      row['vs_first'] = round(float(np.median(np.divide(stepper.times, steppers[0].times))), 3)
    print(json.dumps(row))


if __name__ == '__main__':
  cli.run(main)

"""Training throughput of an experiment: prints one JSON line.

    python benchmarks/throughput.py --config experiments/shakespeare_char.py [--steps 200]
        [--config.model.remat=full ...]

Keys: compile_s (first step, tracing + compilation), step_ms (median over windows of 10
steps dispatched back to back),
tokens_per_s, tflops (achieved, model FLOPs of lm.model.ModelConfig.flops_per_token),
mfu (where the device's peak is known), pipeline_stages and pipeline_bubble (the idle
fraction of stage-ticks, (S - 1) / (R M + S - 1)), peak_memory_gb (device allocator peak, or
the process's peak resident memory on CPU).
"""
import json
import resource
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from lm import cli, metrics, pipeline, train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment file.')
_STEPS = flags.DEFINE_integer('steps', 200, 'Timed steps (after one compile step and 10 warm-up).')
WINDOW = 10   # steps per timed window


def _peak_memory_gb() -> float:
  stats = jax.local_devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return stats['peak_bytes_in_use'] / 1e9
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6   # kB on Linux


def main(argv) -> None:
  del argv
  cli.split_cpu(_CONFIG.value.mesh.cpu_devices)
  config, data, program = train.setup(_CONFIG.value, None)
  state = program.init(jax.random.PRNGKey(0))
  batches = [train.global_batch(program, next(data.train), config.train.batch_size)
             for _ in range(16)]
  start = time.perf_counter()
  state, m = program.train_step(state, batches[0])
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - start
  for i in range(10):
    state, m = program.train_step(state, batches[i % 16])
  jax.block_until_ready(m)
  # Steps are dispatched back to back as in the training loop (the host queues step n + 1
  # while step n runs) and timed in windows of WINDOW steps, blocking only at a window's end,
  # so that the host's share is what a run pays (on a GPU or TPU it overlaps the device's).
  times = []
  for start_step in range(0, _STEPS.value, WINDOW):
    start = time.perf_counter()
    for i in range(start_step, start_step + WINDOW):
      state, m = program.train_step(state, batches[i % 16])
    jax.block_until_ready(m)
    times.append((time.perf_counter() - start) / WINDOW)
  step_s = float(np.median(times))
  stages = program.mesh.shape['stage']
  tokens = config.train.batch_size * config.data.seq_len
  result = metrics.throughput(1, step_s, tokens,
                              program.model_config.flops_per_token(config.data.seq_len),
                              jax.devices())
  print(json.dumps({
      'experiment': config_flags.get_config_filename(flags.FLAGS['config']),
      'device': jax.devices()[0].device_kind, 'devices': jax.device_count(),
      'compile_s': round(compile_s, 2), 'step_ms': round(result['step_ms'], 2),
      'tokens_per_s': round(result['tokens_per_s']), 'tflops': round(result['tflops'], 4),
      'mfu': result['mfu'] and round(result['mfu'], 4),
      'pipeline_stages': stages,
      'pipeline_bubble': round(pipeline.bubble_fraction(
          stages, config.model.pipeline_microbatches, config.model.pipeline_repeats), 4),
      'peak_memory_gb': round(_peak_memory_gb(), 3)}))


if __name__ == '__main__':
  app.run(main)

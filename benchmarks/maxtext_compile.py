"""MaxText's train step AOT-compiled for a TPU slice on this CPU machine, read back as one JSON
line: run by benchmarks/vs_maxtext.py with MaxText's interpreter (imports jax and maxtext,
never lm).

    python benchmarks/maxtext_compile.py [--kernels_free] [--hlo_out=PATH] KEY=VALUE ...

KEY=VALUE are MaxText's own settings (model_name=llama3-8b compile_topology=v5p-8 ...), passed
to its `train_compile` over its base.yml. `--kernels_free` drops the cost estimate of every
Pallas kernel before XLA sees it, so that its estimate counts each kernel as free (what a
kernel without an estimate gets anyway). `--hlo_out=PATH` writes the compiled program's HLO
text there (libtpu's `estimated_cycles` per instruction: set beside `lm.plan --breakdown`).
"""
import collections
import json
import os
import sys
import time

GB = 1e9


def watch_pallas_cost_estimates(drop: bool) -> collections.Counter:
  """Counts the Pallas TPU kernels lowered from now on by whether they carry a cost estimate
  ('costed' / 'uncosted'); with `drop`, removes the estimates. XLA's step estimate counts a
  custom call only by the estimate it carries: one side's kernel with an estimate and the
  other's without would not count the same work. (The compiled HLO text does not show a
  kernel's backend config, so it is seen here, where the kernel is lowered.)"""
  from jax._src import tpu_custom_call
  seen = collections.Counter()
  config = tpu_custom_call.CustomCallBackendConfig
  post_init = config.__post_init__

  def watched(self):
    seen['uncosted' if self.cost_estimate is None else 'costed'] += 1
    if drop:
      object.__setattr__(self, 'cost_estimate', None)
    post_init(self)
  config.__post_init__ = watched
  return seen


def costed(seen: collections.Counter) -> str | None:
  """Whether the kernels lowered carried a cost estimate: 'yes', 'no', 'some' (None without
  kernels)."""
  return (None if not seen else 'yes' if not seen['uncosted'] else
          'no' if not seen['costed'] else 'some')


def kernels(hlo: str, seen: collections.Counter) -> dict:
  """How many Pallas kernels the compiled program calls, and whether they carried estimates."""
  return {'pallas_kernels': hlo.count('custom_call_target="tpu_custom_call"'),
          'kernels_costed': costed(seen)}


def main(argv: list[str]) -> None:
  free = '--kernels_free' in argv
  hlo_out = [a.partition('=')[2] for a in argv if a.startswith('--hlo_out=')]
  argv = [a for a in argv if a != '--kernels_free' and not a.startswith('--hlo_out=')]
  seen = watch_pallas_cost_estimates(drop=free)
  import jax
  from maxtext.trainers.pre_train import train_compile
  base = os.path.join(os.path.dirname(train_compile.__file__), '..', '..', 'configs', 'base.yml')
  captured = {}
  compile_fn = train_compile.jit_and_compile

  def capture(*args, **kwargs):
    start = time.perf_counter()
    captured['compiled'] = compile_fn(*args, **kwargs)
    captured['compile_s'] = time.perf_counter() - start
    return captured['compiled']
  train_compile.jit_and_compile = capture
  train_compile.main([sys.argv[0], os.path.normpath(base), *argv])
  compiled = captured['compiled']
  cost, memory = compiled.cost_analysis(), compiled.memory_analysis()
  if hlo_out:
    with open(hlo_out[0], 'w') as f:
      f.write(compiled.as_text())
  live = (memory.argument_size_in_bytes + memory.output_size_in_bytes
          - memory.alias_size_in_bytes)
  temp = max(memory.temp_size_in_bytes, getattr(memory, 'peak_memory_in_bytes', 0) - live)
  print(json.dumps({
      'est_step_s': cost['optimal_seconds'], 'step_flops': cost['flops'],
      'state_gb': memory.argument_size_in_bytes / GB, 'temp_gb': temp / GB,
      **kernels(compiled.as_text(), seen), 'kernels_free': free, 'compile_s': captured['compile_s'],
      'jax': jax.__version__, 'settings': argv}), flush=True)


if __name__ == '__main__':
  main(sys.argv[1:])

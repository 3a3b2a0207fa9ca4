"""`python -m lm.export --workdir RUN --out DIR [--merge_lora]`: a run's newest checkpoint (or
RUN/checkpoints/STEP) as a plain run directory (config.json, tokenizer, parameters), with LoRA
adapters merged into the base kernels, for `lm.sample`, evaluation and
config.train.init_from."""
import argparse
import sys

import jax
import orbax.checkpoint as ocp
from etils import epath

from lm import peft, runs
from lm.config import ConfigError
from lm.data import tokenizers


def export(workdir: str, out: str, merge_lora: bool) -> epath.Path:
  """Writes the plain run directory; returns its checkpoint directory."""
  run = runs.load(workdir, '--workdir')
  params = run.variables['params']
  if 'lora' in run.variables:
    if not merge_lora:
      raise ConfigError(f'--workdir={workdir} holds LoRA adapters: pass --merge_lora to fold '
                        'them into the base kernels')
    params = peft.merge_lora(params, run.variables['lora'], run.config.lora.alpha,
                             run.config.lora.rank)
  target = epath.Path(out)
  if (target / 'checkpoints').exists():
    raise ConfigError(f'--out={out} already holds checkpoints')
  config = run.config
  config.lora.rank = 0
  config.train.init_from = ''
  # the layers are now in logical order on one device: no circular-pipeline layout
  config.model.pipeline_repeats = 1
  config.mesh.shape = (-1, 1, 1, 1)
  target.mkdir(parents=True, exist_ok=True)
  (target / 'config.json').write_text(config.to_json_best_effort(indent=2))
  tokenizers.copy(run.step_dir.parent.parent / 'tokenizer.json', target / 'tokenizer.json')
  step_dir = target / 'checkpoints' / run.step_dir.name
  checkpointer = ocp.PyTreeCheckpointer()
  checkpointer.save(step_dir / 'state', {'params': jax.device_get(params)})
  return step_dir


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(prog='python -m lm.export', description=__doc__)
  parser.add_argument('--workdir', required=True, help='run directory or RUN/checkpoints/STEP')
  parser.add_argument('--out', required=True, help='the new run directory')
  parser.add_argument('--merge_lora', action='store_true',
                      help='fold LoRA adapters into the base kernels (needed for a LoRA run)')
  args = parser.parse_args(argv)
  try:
    step_dir = export(args.workdir, args.out, args.merge_lora)
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(f'exported {step_dir}')


if __name__ == '__main__':
  main(sys.argv[1:])

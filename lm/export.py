"""`python -m lm.export --workdir RUN --out DIR [--merge_lora]`: a run's newest checkpoint (or
RUN/checkpoints/STEP) as a plain run directory (config.json, tokenizer, parameters), with LoRA
adapters merged into the base kernels, for `lm.sample`, evaluation and
config.train.init_from."""
import argparse

import jax
from etils import epath

from lm import cli
from lm.config import ConfigError
from lm.training import runs


def export(workdir: str, out: str, merge_lora: bool) -> epath.Path:
  """Writes the plain run directory; returns its checkpoint directory."""
  run = runs.load(workdir, '--workdir')
  if 'lora' in run.variables and not merge_lora:
    raise ConfigError(f'--workdir={workdir} holds LoRA adapters: pass --merge_lora to fold '
                      'them into the base kernels')
  params = runs.merged_params(run)
  config = runs.plain_config(run.config)
  config.quant.scheme = 'none'   # merged_params dequantizes (a QLoRA base, a quantized run)
  config.mesh.shape = (-1, 1, 1, 1)
  return runs.write(epath.Path(out), config, jax.device_get(params), run.tokenizer,
                    int(run.step_dir.name))


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(prog='python -m lm.export', description=__doc__)
  parser.add_argument('--workdir', required=True, help='run directory or RUN/checkpoints/STEP')
  parser.add_argument('--out', required=True, help='the new run directory')
  parser.add_argument('--merge_lora', action='store_true',
                      help='fold LoRA adapters into the base kernels (needed for a LoRA run)')
  args = parser.parse_args(argv)
  step_dir = export(args.workdir, args.out, args.merge_lora)
  print(f'exported {step_dir}')


if __name__ == '__main__':
  cli.run(main)

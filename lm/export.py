"""`python -m lm.export --workdir RUN --out DIR [--merge_lora]`: a run's newest checkpoint (or
RUN/checkpoints/STEP) as a plain run directory (config.json, tokenizer, parameters), with LoRA
adapters merged into the base kernels, for `lm.sample`, evaluation and
config.train.init_from."""

from lm import cli
from lm.config import arguments
from lm.tools import export


def main(argv: list[str]) -> None:
  parser = arguments.parser('python -m lm.export', __doc__)
  parser.add_argument('--workdir', required=True, help='run directory or RUN/checkpoints/STEP')
  parser.add_argument('--out', required=True, help='the new run directory')
  parser.add_argument('--merge_lora', action='store_true',
                      help='fold LoRA adapters into the base kernels (needed for a LoRA run)')
  args = parser.parse_args(argv)
  step_dir = export.export(args.workdir, args.out, args.merge_lora)
  print(f'exported {step_dir}')


if __name__ == '__main__':
  cli.run(main)

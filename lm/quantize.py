"""`python -m lm.quantize --workdir RUN --scheme int8|int4|nf4 [--group_size G] --out DIR`:
a run directory whose Linear kernels (config.quant.targets) are stored quantized
(lm/compress/quant.py):
int8 with a scale per output channel (or per group of G inputs), int4 and NF4 with a scale per
group of G inputs (default 32). `lm.evaluate` and `lm.sample` read it like any run. Prints one
JSON line with the sizes in bytes.
"""
import json

from lm import cli
from lm.compress import quant
from lm.config import arguments
from lm.tools import quantize


def main(argv: list[str]) -> None:
  parser = arguments.parser('python -m lm.quantize', __doc__)
  parser.add_argument('--workdir', required=True, help='run directory or RUN/checkpoints/STEP')
  parser.add_argument('--scheme', required=True, help=', '.join(quant.SCHEMES))
  parser.add_argument('--group_size', type=int, help='inputs per scale (default: int8 per '
                      'channel, 32 for int4 / nf4)')
  parser.add_argument('--out', required=True, help='the new run directory')
  args = parser.parse_args(argv)
  print(json.dumps(quantize.quantize_run(args.workdir, args.scheme, args.group_size, args.out)))


if __name__ == '__main__':
  cli.run(main)

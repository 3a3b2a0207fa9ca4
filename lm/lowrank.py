"""`python -m lm.lowrank --workdir RUN (--rank R | --energy E) [--targets REGEX] --out DIR`:
a run directory whose Linear kernels (those `--targets` matches in the module path) are
replaced by their truncated SVD, kernel [*in, *out] ~ u [*in, R] @ v [R, *out] with the
singular values split evenly between the factors (u = U sqrt(S), v = sqrt(S) V^T). With
`--energy E` the rank is the smallest that keeps at least that fraction of the squared
singular values of every targeted kernel (of every layer: scanned layers share one shape).
The new run is evaluated and sampled like any run, and fine-tuned with
`--config.train.init_from=DIR --config.model.from_init_from=True`. Prints one JSON line.
"""
import json

from lm import cli
from lm.config import arguments
from lm.tools import lowrank


def main(argv: list[str]) -> None:
  parser = arguments.parser('python -m lm.lowrank', __doc__)
  parser.add_argument('--workdir', required=True, help='run directory or RUN/checkpoints/STEP')
  parser.add_argument('--rank', type=int, help='the rank of every factored kernel')
  parser.add_argument('--energy', type=float, help='or: the share of sum(S^2) to keep')
  parser.add_argument('--targets', default='attn/(q|kv|o)|mlp/(wi|wo)',
                      help='regex searched in the Linear modules\' paths')
  parser.add_argument('--out', required=True, help='the new run directory')
  args = parser.parse_args(argv)
  print(json.dumps(lowrank.compress(args.workdir, args.out, args.rank, args.energy, args.targets)))


if __name__ == '__main__':
  cli.run(main)

"""Scaling-law fits of a table of runs, and compute-optimal plans (`lm.analysis.scaling`):

    python -m lm.scaling fit TABLE --n-col C (--d-col C | --flops-col C) --loss-col C \
        --approach 1|2|3|kaplan [--run-col C] [--bootstrap 100] [--plot out.png]
    python -m lm.scaling plan --fit FIT.json --flops F
"""
import json
import sys

from lm import cli
from lm.analysis import scaling
from lm.config import ConfigError, arguments


def main(argv=None) -> None:
  parser = arguments.parser('python -m lm.scaling', scaling.__doc__.split('\n')[0])
  sub = parser.add_subparsers(dest='command', required=True)
  f = sub.add_parser('fit', help='fit a table of runs; prints JSON')
  f.add_argument('table', help='a CSV of runs, e.g. written by python -m lm.compare --csv')
  f.add_argument('--n_col', '--n-col', required=True, help='the column of parameter counts')
  tokens = f.add_mutually_exclusive_group(required=True)
  tokens.add_argument('--d_col', '--d-col', help='the column of training tokens')
  tokens.add_argument('--flops_col', '--flops-col', help='or: the column of training FLOPs')
  f.add_argument('--loss_col', '--loss-col', required=True, help='the column of losses')
  f.add_argument('--approach', required=True, choices=['1', '2', '3', 'kaplan'],
                 help='Chinchilla approach 1, 2 or 3, or Kaplan power laws')
  f.add_argument('--run_col', '--run-col', help='approach 1: the column naming each curve')
  f.add_argument('--exclude_highest_loss', '--exclude-highest-loss', type=int, default=0,
                 metavar='K', help='leave out the K runs of highest loss')
  f.add_argument('--bootstrap', type=int, default=0, help='approach 3: resamples for intervals')
  f.add_argument('--plot', help='write a plot of the fit here (PNG)')
  p = sub.add_parser('plan', help='compute-optimal N, D and a sweep grid for a FLOP budget')
  p.add_argument('--fit', required=True, help='JSON printed by `fit`')
  p.add_argument('--flops', type=float, required=True, help='the compute budget, in FLOPs')
  args = parser.parse_args(argv)
  if args.command == 'plan':
    try:
      fit = json.loads(open(args.fit).read())
    except (OSError, ValueError) as e:
      raise ConfigError(f'--fit={args.fit}: not a fit printed by `fit` ({e})') from None
    try:
      print(json.dumps(scaling.plan(fit, args.flops)))
    except (KeyError, TypeError) as e:
      raise ConfigError(f'--fit={args.fit}: not a fit printed by `fit` (no {e})') from None
    return
  columns = [c for c in (args.n_col, args.d_col, args.flops_col, args.loss_col, args.run_col)
             if c]
  fit, (n, d, loss) = scaling.fit_table(
      scaling.read_table(args.table, columns), args.n_col, args.d_col, args.flops_col,
      args.loss_col, args.approach, args.run_col, args.exclude_highest_loss)
  if args.bootstrap and args.approach == '3':
    fit['intervals_90'] = scaling.bootstrap_parametric(n, d, loss, args.bootstrap)
  print(json.dumps(fit))
  if args.plot and args.approach != 'kaplan':
    scaling.plot(fit, n, d, loss, args.plot)
    print(f'wrote {args.plot}', file=sys.stderr)   # stdout is the fit alone (> fit.json)


if __name__ == '__main__':
  cli.run(main)

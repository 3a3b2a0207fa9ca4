"""Scaling-law fits of a table of runs, and compute-optimal plans (`lm.analysis.scaling`):

    python -m lm.scaling fit TABLE --n-col C (--d-col C | --flops-col C) --loss-col C \
        --approach 1|2|3|kaplan [--run-col C] [--bootstrap 100] [--plot out.png]
    python -m lm.scaling plan --fit FIT.json --flops F
"""
import argparse
import json

from lm import cli
from lm.analysis import scaling
from lm.config import ConfigError


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog='python -m lm.scaling',
                                   description=scaling.__doc__.split('\n')[0])
  sub = parser.add_subparsers(dest='command', required=True)
  f = sub.add_parser('fit', help='fit a table of runs; prints JSON')
  f.add_argument('table')
  f.add_argument('--n-col', required=True)
  tokens = f.add_mutually_exclusive_group(required=True)
  tokens.add_argument('--d-col')
  tokens.add_argument('--flops-col')
  f.add_argument('--loss-col', required=True)
  f.add_argument('--approach', required=True, choices=['1', '2', '3', 'kaplan'])
  f.add_argument('--run-col', help='approach 1: the column naming each training curve')
  f.add_argument('--exclude-highest-loss', type=int, default=0, metavar='K')
  f.add_argument('--bootstrap', type=int, default=0, help='approach 3: resamples for intervals')
  f.add_argument('--plot')
  p = sub.add_parser('plan', help='compute-optimal N, D and a sweep grid for a FLOP budget')
  p.add_argument('--fit', required=True, help='JSON printed by `fit`')
  p.add_argument('--flops', type=float, required=True)
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
  if args.plot and args.approach != 'kaplan':
    scaling.plot(fit, n, d, loss, args.plot)
  print(json.dumps(fit))


if __name__ == '__main__':
  cli.run(main)

"""Tables and plots of runs side by side (`lm.analysis.compare`):

    python -m lm.compare RUN_DIR... | SWEEP_DIR [--csv F] [--markdown F] [--plots DIR]
"""
import json
import sys

from etils import epath

from lm import cli
from lm.analysis import compare
from lm.config import arguments


def main(argv=None) -> None:
  parser = arguments.parser('python -m lm.compare', compare.__doc__.split('\n')[0])
  parser.add_argument('runs', nargs='+', help='run directories, or a sweep directory')
  parser.add_argument('--csv', help='write the table as CSV here')
  parser.add_argument('--markdown', help='write the table as Markdown here')
  parser.add_argument('--plots', help='directory for the PNG plots')
  parser.add_argument('--fit', choices=['1', '2', '3', 'kaplan'],
                      help='fit a scaling law to the runs: Chinchilla approach 1-3 or Kaplan')
  args = parser.parse_args(argv)
  runs = compare.find_runs(args.runs)
  if not runs:
    print(f'error: no runs (directories with config.json) in {args.runs}', file=sys.stderr)
    sys.exit(2)
  rows = [compare.load_run(r) for r in runs]
  print(compare.table(rows, 'text'), end='')
  for path, fmt in ((args.csv, 'csv'), (args.markdown, 'markdown')):
    if path:
      epath.Path(path).write_text(compare.table(rows, fmt))
      print(f'wrote {path}')
  if args.plots:
    for path in compare.plot(rows, epath.Path(args.plots)):
      print(f'wrote {path}')
  if args.fit:
    plots = epath.Path(args.plots) / 'scaling_fit.png' if args.plots else None
    print(json.dumps(compare.fit(rows, args.fit, plots)))
    if plots:
      print(f'wrote {plots}')


if __name__ == '__main__':
  cli.run(main)

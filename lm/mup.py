"""muP's checks (`lm.analysis.mup`):

    python -m lm.mup coord_check --config experiments/mup_shakespeare.py \
        --widths 64,128,256,512,1024 [--steps 10] [--seeds 1] --out DIR
    python -m lm.mup transfer --sweep_dir DIR --out DIR

trains each width for a few steps under SP and muP at the experiment's learning rate (make it
a large one: --config.optim.lr=...), writes DIR/coord_check.png and DIR/coord_check.json (every
layer's mean |output| per width and step) and prints one JSON line: the log-log slope of each
layer's output against the width per step and parametrization (`slopes`), `mup_max_abs_slope`
(the largest |slope| under muP after the first step) and `sp_logits_slope`.

`transfer` reads a finished sweep of learning rate x width x parametrization (as
experiments/mup_shakespeare.py's), writes DIR/transfer.png (validation loss against learning
rate, a curve per width, SP beside muP), DIR/transfer.md (the table) and DIR/transfer.json, and
prints one JSON line: each width's best rate (`best_lr`) and loss, how many grid steps the best
rate moves from the smallest width to the largest (`best_lr_shift`) and whether a wider model
is never worse at its best (`wider_never_worse`)."""
import json
import sys

from etils import epath

from lm import cli
from lm.config import ConfigError, arguments


def main(argv: list[str]) -> None:
  parser = arguments.parser('python -m lm.mup', __doc__)
  sub = parser.add_subparsers(dest='command', required=True)
  check = sub.add_parser('coord_check', help="every layer's output size against the width")
  arguments.add_config(check)
  check.add_argument('--widths', required=True, metavar='W1,W2,...',
                     help='d_model of each trained model (at least 3; n_heads kept)')
  check.add_argument('--steps', type=int, default=10, help='training steps at each width')
  check.add_argument('--seeds', type=int, default=1,
                     help='initialisations (and data orders) each output is averaged over')
  check.add_argument('--out', required=True, help='the directory to write the plot and data to')
  moved = sub.add_parser('transfer', help='the best learning rate of each width in a sweep')
  moved.add_argument('--sweep_dir', required=True, help='a finished sweep (launch.sweep)')
  moved.add_argument('--out', required=True, help='the directory to write the plot and data to')
  args = arguments.parse(parser, argv)
  if args.command == 'transfer':
    _transfer(args)
    return
  from lm.analysis import mup  # after the flags: a mistake does not wait for JAX
  widths = mup.parse_widths(args.widths)
  cli.split_cpu(args.config.mesh.cpu_devices)
  progress = lambda p, w: print(f'coord_check: {p} at width {w}, {args.steps} steps x '
                                f'{args.seeds} seeds', file=sys.stderr, flush=True)
  result = mup.coord_check(args.config, widths, args.steps, args.seeds, progress)
  out = epath.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / 'coord_check.json').write_text(json.dumps(result))
  mup.plot(result, str(out / 'coord_check.png'))
  print(f'wrote {out / "coord_check.png"} and {out / "coord_check.json"}', file=sys.stderr)
  print(json.dumps({k: result[k] for k in ('widths', 'steps', 'seeds', 'slopes',
                                           'mup_max_abs_slope', 'sp_logits_slope')}))


def _transfer(args) -> None:
  from lm.analysis import compare, mup
  runs = compare.find_runs([args.sweep_dir])
  if not runs:
    raise ConfigError(f'--sweep_dir={args.sweep_dir}: no runs in it')
  result = mup.transfer([compare.load_run(run) for run in runs])
  out = epath.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / 'transfer.json').write_text(json.dumps(result))
  (out / 'transfer.md').write_text(mup.transfer_table(result) + '\n')
  mup.transfer_plot(result, str(out / 'transfer.png'))
  print(mup.transfer_table(result), file=sys.stderr)
  print(f'wrote {out / "transfer.png"}, {out / "transfer.md"} and {out / "transfer.json"}',
        file=sys.stderr)
  print(json.dumps({k: result[k] for k in ('best_lr', 'best_loss', 'best_lr_shift',
                                           'wider_never_worse')}))


if __name__ == '__main__':
  cli.run(main)

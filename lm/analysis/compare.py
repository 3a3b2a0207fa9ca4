"""Compare runs: a table in the terminal, CSV / Markdown, PNG plots, and scaling fits.

    python -m lm.compare RUN_DIR... | SWEEP_DIR [--csv F] [--markdown F] [--plots DIR]
        [--fit 1|2|3|kaplan]

A directory without config.json stands for every run below it. Plots (loss against step,
tokens and FLOPs, one line per run) are coloured by the swept variable: the sweep_point.json
key with the most distinct values. --fit fits a scaling law to the runs' (parameters,
tokens, final validation loss) with lm.scaling (approach 1 uses the validation curves).
"""
import csv
import io
import json
import re
import statistics

import ml_collections
import numpy as np
from etils import epath

from lm.analysis import scaling
from lm.config import RunDir
from lm.model import transformer as model_lib

COLUMNS = ('run', 'params', 'tokens', 'flops', 'final_val_loss', 'best_val_loss', 'test_loss',
           'tokens_per_s', 'mfu', 'wall_s')


def find_runs(paths: list[str]) -> list[epath.Path]:
  runs = []
  for path in map(epath.Path, paths):
    if RunDir(path).config.exists():
      runs.append(path)
    else:
      runs += sorted((p.parent for p in path.glob(f'*/{RunDir(path).config.name}')),
                     key=lambda run: natural_key(run.name))
  return runs


def natural_key(name: str) -> list:
  """Sorts names with numbers in them by value: steps=40 before steps=160."""
  return [float(part) if part[:1].isdigit() else part
          for part in re.findall(r'\d+(?:\.\d+)?(?:e[-+]?\d+)?|\D+', name)]


def load_run(path: epath.Path) -> dict:
  """One run's summary row and curves."""
  run = RunDir(path)
  config = ml_collections.ConfigDict(json.loads(run.config.read_text()))
  model = model_lib.ModelConfig.from_config(config.model)
  metrics = [json.loads(line) for line in run.metrics.read_text().splitlines()
             if line.strip()] if run.metrics.exists() else []
  tokens_per_step = config.train.batch_size * config.data.seq_len
  flops_per_token = model.flops_per_token(config.data.seq_len)
  val = [(m['step'], m['val_loss']) for m in metrics if 'val_loss' in m]
  train = [(m['step'], m['loss']) for m in metrics if 'loss' in m]
  final = json.loads(run.final.read_text()) if run.final.exists() else {}
  last_step = max([s for s, _ in val + train] or [0])
  speeds = [m['tokens_per_s'] for m in metrics if m.get('tokens_per_s')]
  mfus = [m['mfu'] for m in metrics if m.get('mfu')]
  evaluations = [m[k] for m in metrics for k in ('val_wall_s', 'test_wall_s') if k in m]
  point = path / 'sweep_point.json'
  return {
      'run': path.name, 'params': model.param_counts()['total'],
      'tokens': last_step * tokens_per_step,
      'flops': last_step * tokens_per_step * flops_per_token,
      'final_val_loss': val[-1][1] if val else None,
      'best_val_loss': min(v for _, v in val) if val else None,
      'test_loss': final.get('test_loss'),
      'tokens_per_s': statistics.median(speeds) if speeds else None,
      'mfu': statistics.median(mfus) if mfus else None,
      'wall_s': final.get('wall_s'),
      'eval_s': sum(evaluations) if evaluations else None,   # None: logged before they were timed
      'val_curve': val, 'train_curve': train, 'tokens_per_step': tokens_per_step,
      'flops_per_token': flops_per_token,
      'point': json.loads(point.read_text()) if point.exists() else {},
  }


def _cell(value) -> str:
  if value is None:
    return '-'
  if isinstance(value, float):
    return f'{value:.4g}'
  if isinstance(value, int) and value >= 10_000:
    return f'{value:.3g}'
  return str(value)


def table(rows: list[dict], fmt: str) -> str:
  """The summary as 'text' (aligned), 'csv' or 'markdown'."""
  if fmt == 'csv':
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(COLUMNS)
    writer.writerows([[row[c] for c in COLUMNS] for row in rows])
    return out.getvalue()
  cells = [list(COLUMNS)] + [[_cell(row[c]) for c in COLUMNS] for row in rows]
  if fmt == 'markdown':
    lines = ['| ' + ' | '.join(r) + ' |' for r in cells]
    return '\n'.join([lines[0], '|' + ' --- |' * len(COLUMNS), *lines[1:]]) + '\n'
  widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
  return '\n'.join('  '.join(c.ljust(w) for c, w in zip(r, widths)) for r in cells) + '\n'


def swept_variable(rows: list[dict]) -> str | None:
  keys = {k for row in rows for k in row['point']}
  counts = {k: len({str(row['point'].get(k)) for row in rows}) for k in keys}
  return max(sorted(counts), key=counts.get) if counts else None


def plot(rows: list[dict], directory: epath.Path) -> list[epath.Path]:
  """loss_vs_step.png, loss_vs_tokens.png and loss_vs_flops.png in directory."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  directory.mkdir(parents=True, exist_ok=True)
  key = swept_variable(rows)
  values = [row['point'].get(key) for row in rows] if key else list(range(len(rows)))
  numeric = all(isinstance(v, (int, float)) for v in values)
  order = sorted(set(values), key=lambda v: (v if numeric else str(v)))
  colours = plt.cm.viridis(np.linspace(0, 0.9, max(len(order), 1)))
  written = []
  for axis, scale in (('step', 1), ('tokens', 'tokens_per_step'), ('flops', 'flops')):
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for row, value in zip(rows, values):
      colour = colours[order.index(value)]
      factor = 1 if scale == 1 else (row['tokens_per_step'] if scale == 'tokens_per_step'
                                     else row['tokens_per_step'] * row['flops_per_token'])
      for curve, style in ((row['train_curve'], dict(alpha=0.25, lw=0.8)),
                           (row['val_curve'], dict(marker='o', ms=3, lw=1.5))):
        if curve:
          steps, losses = zip(*curve)
          ax.plot(np.array(steps) * factor, losses, color=colour, **style,
                  label=f'{row["run"]}' if curve is row['val_curve'] else None)
    ax.set(xlabel=axis, ylabel='loss (lines: validation, faint: training)',
           xscale='linear' if axis == 'step' else 'log',
           title=f'loss vs {axis}' + (f', coloured by {key}' if key else ''))
    ax.legend(fontsize=6, bbox_to_anchor=(1.01, 1), loc='upper left')
    fig.tight_layout()
    path = directory / f'loss_vs_{axis}.png'
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
  return written


def fit(rows: list[dict], approach: str, plot_path: epath.Path | None) -> dict:
  """A scaling-law fit of the runs (N = total parameters, D = tokens trained)."""
  done = [r for r in rows if r['final_val_loss'] is not None]
  if approach == '1':
    n = [r['params'] for r in done for _ in r['val_curve']]
    d = [s * r['tokens_per_step'] for r in done for s, _ in r['val_curve']]
    loss = [v for r in done for _, v in r['val_curve']]
    run = [r['run'] for r in done for _ in r['val_curve']]
    result = scaling.fit_envelope(n, d, loss, run)
  else:
    n, d, loss = ([r[k] for r in done] for k in ('params', 'tokens', 'final_val_loss'))
    result = {'2': scaling.fit_isoflop, '3': scaling.fit_parametric,
              'kaplan': scaling.fit_kaplan}[approach](n, d, loss)
  if plot_path is not None and approach != 'kaplan':
    scaling.plot(result, n, d, loss, str(plot_path))
  return result

"""muP's checks (Yang et al. 2022, Tensor Programs V). The coordinate check (section 6):
train a model at several widths for a few steps at a large learning rate and watch the size of
each layer's output as the width grows; under a correct muP it stays put at every step (log-log
slope about 0), under SP it grows. Learning-rate transfer (`transfer`): in a sweep of learning
rate x width x parametrization, the best rate stays put across widths under muP.

    python -m lm.mup coord_check --config experiments/mup_shakespeare.py \
        --widths 64,128,256,512,1024 --steps 10 --out DIR
    python -m lm.mup transfer --sweep_dir DIR --out DIR
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lm import config as config_lib
from lm.config import ConfigError
from lm.model import transformer as model_lib
from lm.training import loop as train
from lm.training import start as start_lib

PARAMETRIZATIONS = ('sp', 'mup')
LABELS = {'sp': 'SP', 'mup': 'muP'}


def layer_outputs(program):
  """(params, tokens_BxL) -> mean |x| of each layer's output on the batch: the token embedding
  ('embed'), each block's attention and MLP ('layers_I/attn', 'layers_I/mlp') and the logits
  ('logits'); compiled once per program."""
  def watched(module, method: str) -> bool:
    return method == '__call__' and isinstance(
        module, (model_lib.Attention, model_lib.Mlp, nn.Embed))

  def outputs(variables, tokens_BxL):
    logits, state = program.model.apply(variables, tokens_BxL,
                                        capture_intermediates=watched, mutable='intermediates')
    found = {'logits': logits}
    for path, value in jax.tree_util.tree_flatten_with_path(state['intermediates'])[0]:
      keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
      found['/'.join(keys[:-1])] = value   # the last key: '__call__'
    return {name: jnp.mean(jnp.abs(x.astype(jnp.float32))) for name, x in found.items()}
  jitted = program.in_mesh(jax.jit(outputs))
  return lambda params, tokens_BxL: {
      name: float(v) for name, v in jitted(program.variables(params), tokens_BxL).items()}


def at_width(config: ml_collections.ConfigDict, width: int,
             parametrization: str) -> ml_collections.ConfigDict:
  """`config` at this width (d_model; d_ff 4x; n_heads kept) and parametrization, its layers
  unrolled (their outputs are read one by one), at a constant learning rate from the first
  step (a coordinate check watches what each step's update does)."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.model.update(d_model=width, d_ff=0, parametrization=parametrization, scan_layers=False)
  c.optim.update(schedule='constant', warmup_steps=0)
  return c


def record(config: ml_collections.ConfigDict, width: int, parametrization: str, steps: int,
           seed: int = 0) -> list[dict[str, float]]:
  """Layer outputs (`layer_outputs`) on the first batch at init and after each of `steps`
  training steps of `at_width(config, width, parametrization)` (config.train.seed + seed)."""
  c = at_width(config, width, parametrization)
  c.train.seed += seed
  config_lib.validate(config_lib.resolve(c, None), jax.device_count())
  ready = start_lib.setup(c, None)
  program, data = ready.program, ready.data
  state = program.init(jax.random.PRNGKey(ready.config.train.seed))
  batches = [train.global_batch(program, next(data.train), ready.config.train.batch_size)
             for _ in range(steps)]
  probe, measure = batches[0]['inputs'], layer_outputs(program)
  rows = [measure(state.params, probe)]
  for batch in batches:
    state, _ = program.train_step(state, batch)
    rows.append(measure(state.params, probe))
  return rows


def slope(widths: list[int], values: list[float]) -> float:
  """The log-log slope of values against widths (least squares)."""
  return float(np.polyfit(np.log(widths), np.log(values), 1)[0])


def coord_check(config: ml_collections.ConfigDict, widths: list[int], steps: int,
                seeds: int = 1, progress=None) -> dict:
  """{'widths', 'outputs': {parametrization: [width][step] -> {layer: mean |x|, averaged over
  `seeds` initialisations and data orders}}, 'slopes':
  {parametrization: {layer: [slope at step 0 (init) .. steps]}}, 'mup_max_abs_slope' (the
  largest |slope| under muP from step 1 on), 'sp_logits_slope' (SP's logits at the last
  step)}."""
  if len(widths) < 3 or len(set(widths)) != len(widths):
    raise ConfigError(f'--widths: a coordinate check needs at least 3 different widths, got '
                      f'{widths}')
  if steps < 1 or seeds < 1:
    raise ConfigError(f'--steps={steps} and --seeds={seeds} must be at least 1')
  outputs = {}
  for parametrization in PARAMETRIZATIONS:
    outputs[parametrization] = []
    for width in widths:
      if progress:
        progress(parametrization, width)
      runs = [record(config, width, parametrization, steps, seed) for seed in range(seeds)]
      outputs[parametrization].append([{layer: float(np.mean([run[t][layer] for run in runs]))
                                        for layer in runs[0][t]} for t in range(steps + 1)])
  slopes = {p: {layer: [slope(widths, [per_width[t][layer] for per_width in rows])
                        for t in range(steps + 1)]
                for layer in rows[0][0]}
            for p, rows in outputs.items()}
  return {'widths': widths, 'steps': steps, 'seeds': seeds, 'outputs': outputs,
          'slopes': slopes,
          'mup_max_abs_slope': max(abs(s) for per_step in slopes['mup'].values()
                                   for s in per_step[1:]),
          'sp_logits_slope': slopes['sp']['logits'][-1]}


def plot(result: dict, path: str, panels: int = 4) -> None:
  """Mean |x| of every layer against width (log-log), one panel per step shown (init, then
  evenly spaced to the last), SP on the top row and muP below."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  widths, steps = result['widths'], result['steps']
  shown = sorted({round(i * steps / (panels - 1)) for i in range(panels)})
  fig, axes = plt.subplots(2, len(shown), figsize=(3.2 * len(shown), 6.4), squeeze=False,
                           sharex=True)
  for row, parametrization in enumerate(PARAMETRIZATIONS):
    rows = result['outputs'][parametrization]
    layers = list(rows[0][0])
    colors = plt.cm.viridis(np.linspace(0, 1, len(layers)))
    for col, t in enumerate(shown):
      ax = axes[row][col]
      for layer, color in zip(layers, colors):
        ax.plot(widths, [per_width[t][layer] for per_width in rows], 'o-', color=color,
                label=layer, markersize=3)
      ax.set(xscale='log', yscale='log', title=f'{LABELS[parametrization]}, step {t}')
      ax.set_xticks(widths, [str(w) for w in widths], minor=False)
      ax.minorticks_off()
      if row == 1:
        ax.set_xlabel('width (d_model)')
      if col == 0:
        ax.set_ylabel('mean |output|')
  axes[0][-1].legend(fontsize=7, loc='center left', bbox_to_anchor=(1.02, 0.5))
  fig.suptitle(f'Coordinate check: {len(widths)} widths, {steps} steps '
               f'(flat lines: the output does not grow with the width)')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def transfer(rows: list[dict]) -> dict:
  """The final validation losses of a sweep's runs (`lm.analysis.compare.load_run` rows whose
  points set model.parametrization, model.d_model and optim.lr) by parametrization, width and
  learning rate (inf: diverged; None: no validation loss yet); the best rate of each width
  (among the finite losses); and per parametrization `best_lr_shift`, how many grid steps the
  best rate moves from the smallest width to the largest, and `wider_never_worse`, whether
  each width's best loss is at most the narrower one's."""
  keys = ('model.parametrization', 'model.d_model', 'optim.lr')
  losses = {}
  for row in rows:
    if not all(k in row['point'] for k in keys):
      raise ConfigError(f'run {row["run"]}: its sweep point {row["point"]} does not set '
                        f'{", ".join(keys)}')
    p, width, lr = (row['point'][k] for k in keys)
    loss = row['final_val_loss']
    if loss is None or not math.isfinite(loss):   # diverged (inf), or not evaluated yet (None)
      diverged = any(not math.isfinite(v) for _, v in row.get('train_curve', ()))
      loss = math.inf if diverged or loss is not None else None
    losses.setdefault(p, {}).setdefault(width, {})[lr] = loss
  result = {'losses': losses, 'best_lr': {}, 'best_loss': {}, 'best_lr_shift': {},
            'wider_never_worse': {}}
  for p, by_width in losses.items():
    grid = sorted({lr for by_lr in by_width.values() for lr in by_lr})
    evaluated = {w: {lr: v for lr, v in by_lr.items() if v is not None}
                 for w, by_lr in sorted(by_width.items())}
    widths = [w for w, by_lr in evaluated.items() if by_lr]
    best = {w: min(evaluated[w], key=evaluated[w].get) for w in widths}
    result['best_lr'][p] = best
    result['best_loss'][p] = {w: by_width[w][best[w]] for w in widths}
    result['best_lr_shift'][p] = grid.index(best[widths[-1]]) - grid.index(best[widths[0]])
    result['wider_never_worse'][p] = all(
        result['best_loss'][p][wide] <= result['best_loss'][p][narrow]
        for narrow, wide in zip(widths, widths[1:]))
  return result


def transfer_table(result: dict) -> str:
  """Markdown: a row per parametrization and width, a column per learning rate, the best of
  each row in bold."""
  grid = sorted({lr for by_width in result['losses'].values() for by_lr in by_width.values()
                 for lr in by_lr})
  lines = ['| parametrization | width | ' + ' | '.join(f'{lr:.3g}' for lr in grid) + ' |',
           '| --- | --- | ' + ' | '.join('---' for _ in grid) + ' |']
  for p, by_width in result['losses'].items():
    for width in sorted(by_width):
      cells = []
      for lr in grid:
        loss = by_width[width].get(lr)
        text = '-' if loss is None else 'diverged' if math.isinf(loss) else f'{loss:.3f}'
        cells.append(f'**{text}**' if lr == result['best_lr'][p][width] else text)
      lines.append(f'| {LABELS.get(p, p)} | {width} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def transfer_plot(result: dict, path: str) -> None:
  """Final validation loss against learning rate (log), a curve per width, a panel per
  parametrization, each width's best rate marked."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  parametrizations = [p for p in PARAMETRIZATIONS if p in result['losses']]
  fig, axes = plt.subplots(1, len(parametrizations), figsize=(5.5 * len(parametrizations), 4.2),
                           squeeze=False, sharey=True)
  finite = [v for by_width in result['losses'].values() for by_lr in by_width.values()
            for v in by_lr.values() if v is not None and math.isfinite(v)]
  for ax, p in zip(axes[0], parametrizations):
    by_width = result['losses'][p]
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(by_width)))
    for (width, by_lr), color in zip(sorted(by_width.items()), colors):
      lrs = sorted(lr for lr, v in by_lr.items() if v is not None and math.isfinite(v))
      ax.plot(lrs, [by_lr[lr] for lr in lrs], 'o-', color=color, markersize=3,
              label=f'width {width}')
      best = result['best_lr'][p][width]
      ax.plot([best], [by_lr[best]], '*', color=color, markersize=12)
    ax.set(xscale='log', xlabel='learning rate', title=LABELS.get(p, p),
           ylim=(min(finite) - 0.05, min(finite) + 1.0))
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel('final validation loss (nats / token)')
  axes[0][-1].legend(fontsize=8)
  fig.suptitle('Learning-rate transfer across widths (star: the best rate of each width)')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def parse_widths(text: str) -> list[int]:
  try:
    widths = [int(w) for w in text.split(',')]
  except ValueError:
    raise ConfigError(f'--widths={text!r} must be comma-separated integers') from None
  if any(w <= 0 for w in widths):
    raise ConfigError(f'--widths={text!r} must be positive')
  return widths


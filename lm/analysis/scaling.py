"""Scaling-law fits: Hoffmann et al. 2022 ('Chinchilla') approaches 1-3, Kaplan et al. 2020.

Inputs are arrays of parameters N, training tokens D (or FLOPs C, with D = C / 6N) and loss.
Compute-optimal allocations are reported as N_opt = G_N C^a and D_opt = G_D C^b.

    python -m lm.scaling fit TABLE.csv --n-col N (--d-col D | --flops-col C) --loss-col L \
        --approach 1|2|3|kaplan [--run-col RUN] [--exclude-highest-loss K] \
        [--bootstrap 100] [--plot out.png]
    python -m lm.scaling plan --fit fit.json --flops 1e18

`fit` prints one JSON object; for approach 3 its keys include E, A, B, alpha, beta, a, b.
"""
import csv
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lm.config import ConfigError

MIN_POINTS = {1: 2, 2: 6, 3: 5, 'kaplan': 3}   # fewer make a fit meaningless (see each fit)


class FitError(ConfigError):
  """Too few or unusable points for a fit."""


def _need(approach, count: int, what: str) -> None:
  if count < MIN_POINTS[approach]:
    raise FitError(f'approach {approach} needs at least {MIN_POINTS[approach]} {what}, got {count}')


def _power_law(x, y) -> tuple[float, float]:
  """y = k x^p by least squares in log space: (p, k)."""
  p, log_k = np.polyfit(np.log(x), np.log(y), 1)
  return float(p), float(np.exp(log_k))


# ---- approach 3: parametric loss L(N, D) = E + A / N^alpha + B / D^beta -------------------

def _huber_objective(theta, log_n, log_d, log_loss, delta):
  a, b, e, alpha, beta = theta
  predicted = jax.nn.logsumexp(jnp.stack([a - alpha * log_n, b - beta * log_d,
                                          jnp.broadcast_to(e, log_n.shape)]), axis=0)
  return optax.losses.huber_loss(predicted - log_loss, delta=delta).sum()


LBFGS_STEPS = 100
# After SCREEN_STEPS of L-BFGS from every initialisation only the SURVIVORS lowest continue:
# under vmap every lane pays for the slowest lane's line search, and the paper's grid is very
# redundant (on the tests' synthetic runs, 64 of them and subsets of 12 with 5% noise, a
# quarter to a half of the 4,500 starts end at the best optimum). The same minimum as all
# 4,500 run to the end, to float32 precision, in 3 s instead of 12-15 s once compiled.
SCREEN_STEPS, SURVIVORS = 20, 64


@functools.partial(jax.jit, static_argnames='steps')
def _lbfgs_steps(thetas, states, log_n, log_d, log_loss, delta, steps: int):
  """`steps` L-BFGS steps from each (theta, solver state), vmapped: thetas, states, values."""
  objective = lambda theta: _huber_objective(theta, log_n, log_d, log_loss, delta)
  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(objective)

  def solve(theta, state):
    def step(_, carry):
      theta, state = carry
      value, grad = value_and_grad(theta, state=state)
      updates, state = solver.update(grad, state, theta, value=value, grad=grad,
                                     value_fn=objective)
      return optax.apply_updates(theta, updates), state
    theta, state = jax.lax.fori_loop(0, steps, step, (theta, state))
    return theta, state, objective(theta)

  return jax.vmap(solve)(thetas, states)


def _lbfgs_from_each(inits, log_n, log_d, log_loss, delta):
  """L-BFGS from every initialisation, the SURVIVORS best after SCREEN_STEPS continuing to
  LBFGS_STEPS: their final parameters and objective values (non-finite ones as inf)."""
  data = (log_n, log_d, log_loss, delta)
  states = jax.vmap(optax.lbfgs().init)(inits)
  thetas, states, values = _lbfgs_steps(inits, states, *data, steps=SCREEN_STEPS)
  best = jnp.argsort(jnp.where(jnp.isfinite(values), values, jnp.inf))[:SURVIVORS]
  thetas, states, values = _lbfgs_steps(thetas[best], jax.tree.map(lambda x: x[best], states),
                                        *data, steps=LBFGS_STEPS - SCREEN_STEPS)
  return np.asarray(thetas), np.where(np.isfinite(values), values, np.inf)


def chinchilla_grid() -> np.ndarray:
  """The paper's initialisations: alpha, beta in {0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1},
  a, b in {0, 5, ..., 25} (as (a, b, e, alpha, beta))."""
  grid = itertools.product(np.arange(0, 30, 5), np.arange(0, 30, 5), np.arange(-1, 1.5, 0.5),
                           np.arange(0, 2.5, 0.5), np.arange(0, 2.5, 0.5))
  return np.array(list(grid), np.float32)


def fit_parametric(n, d, loss, delta: float = 1e-3, inits: np.ndarray | None = None) -> dict:
  """Approach 3: minimise the Huber loss of log-loss residuals over the paper's grid."""
  n, d, loss = (np.asarray(v, np.float64) for v in (n, d, loss))
  _need(3, len(n), 'runs (N, D, loss)')
  inits = chinchilla_grid() if inits is None else inits
  thetas, values = _lbfgs_from_each(jnp.asarray(inits), *(jnp.asarray(np.log(v), jnp.float32)
                                                          for v in (n, d, loss)), delta)
  a, b, e, alpha, beta = (float(x) for x in thetas[int(np.argmin(values))])
  return _parametric_result(np.exp(e), np.exp(a), np.exp(b), alpha, beta)


def _parametric_result(E, A, B, alpha, beta) -> dict:
  G = (alpha * A / (beta * B)) ** (1 / (alpha + beta))
  return {'approach': 3, 'E': E, 'A': A, 'B': B, 'alpha': alpha, 'beta': beta,
          'a': beta / (alpha + beta), 'b': alpha / (alpha + beta),
          'G_N': G * 6 ** (-beta / (alpha + beta)), 'G_D': 6 ** (-alpha / (alpha + beta)) / G}


def bootstrap_parametric(n, d, loss, samples: int, seed: int = 0, delta: float = 1e-3) -> dict:
  """Percentile (5%, 95%) intervals of approach 3's constants over resampled runs. Each
  refit starts from the full fit and 63 perturbations of it rather than the whole grid."""
  n, d, loss = (np.asarray(v) for v in (n, d, loss))
  rng = np.random.default_rng(seed)
  full = fit_parametric(n, d, loss, delta)
  theta = np.log([full['A'], full['B'], full['E']]).tolist() + [full['alpha'], full['beta']]
  inits = (np.array(theta) * np.exp(rng.normal(0, 0.2, (64, 5)))).astype(np.float32)
  inits[0] = theta
  fits = []
  for _ in range(samples):
    i = rng.integers(0, len(n), len(n))
    fits.append(fit_parametric(n[i], d[i], loss[i], delta, inits))
  keys = ('E', 'A', 'B', 'alpha', 'beta', 'a', 'b')
  return {k: [float(np.percentile([f[k] for f in fits], q)) for q in (5, 95)] for k in keys}


# ---- approach 2: IsoFLOP profiles -------------------------------------------------------

def fit_isoflop(n, d, loss, budgets_per_decade: int = 4) -> dict:
  """Approach 2: runs grouped by FLOP budget C = 6ND (log C rounded to 1/budgets_per_decade
  decade); a parabola in log N per budget gives N_opt(C), then power laws in C."""
  n, d, loss = (np.asarray(v, np.float64) for v in (n, d, loss))
  flops = 6 * n * d
  groups = np.round(np.log10(flops) * budgets_per_decade)
  budgets, n_opt, profiles = [], [], []
  for g in np.unique(groups):
    idx = groups == g
    if idx.sum() < 3:
      continue   # a parabola needs 3 points
    c2, c1, c0 = np.polyfit(np.log(n[idx]), loss[idx], 2)
    if c2 <= 0:
      continue   # no minimum: this profile does not bracket the optimum
    budgets.append(float(np.exp(np.log(flops[idx]).mean())))
    n_opt.append(float(np.exp(-c1 / (2 * c2))))
    profiles.append({'flops': budgets[-1], 'coefficients': [c2, c1, c0]})
  _need(2, 3 * len(budgets), 'runs in IsoFLOP profiles (3 per budget, 2 budgets)')
  budgets, n_opt = np.array(budgets), np.array(n_opt)
  a, g_n = _power_law(budgets, n_opt)
  b, g_d = _power_law(budgets, budgets / (6 * n_opt))
  return {'approach': 2, 'a': a, 'b': b, 'G_N': g_n, 'G_D': g_d, 'profiles': profiles}


# ---- approach 1: minimum over training curves --------------------------------------------

def fit_envelope(n, d, loss, run, points: int = 30) -> dict:
  """Approach 1: for each FLOP budget, the lowest loss any run reached with that many FLOPs
  (interpolating each run's curve in log tokens) gives N_opt(C) and D_opt(C)."""
  n, d, loss, run = (np.asarray(v) for v in (n, d, loss, run))
  curves = []
  for r in np.unique(run):
    idx = np.argsort(d[run == r])
    curves.append((n[run == r][0], d[run == r][idx], loss[run == r][idx]))
  _need(1, len(curves), 'runs with loss curves')
  flops_range = [6 * c[0] * c[1] for c in curves]
  low, high = min(f.min() for f in flops_range), max(f.max() for f in flops_range)
  budgets, n_opt, d_opt = [], [], []
  for c in np.geomspace(low, high, points):
    best = None
    for size, tokens, losses in curves:
      t = c / (6 * size)
      if tokens[0] <= t <= tokens[-1]:
        value = np.interp(np.log(t), np.log(tokens), losses)
        best = min(best, (value, size, t)) if best else (value, size, t)
    if best:
      budgets.append(c)
      n_opt.append(best[1])
      d_opt.append(best[2])
  if len(set(n_opt)) < 2:
    raise FitError('approach 1 needs the best run to change with the FLOP budget: add model '
                   'sizes or longer curves')
  a, g_n = _power_law(budgets, n_opt)
  b, g_d = _power_law(budgets, d_opt)
  return {'approach': 1, 'a': a, 'b': b, 'G_N': g_n, 'G_D': g_d}


# ---- Kaplan et al. 2020 ------------------------------------------------------------------

def fit_kaplan(n, d, loss) -> dict:
  """Single power laws L(N) = (N_c / N)^alpha_N over each size's best loss, and
  L(D) = (D_c / D)^alpha_D over each token count's best loss (each where the table has
  enough distinct values)."""
  n, d, loss = (np.asarray(v, np.float64) for v in (n, d, loss))
  out = {'approach': 'kaplan'}
  _need('kaplan', max(len(np.unique(n)), len(np.unique(d))), 'distinct values of N or D')
  for name, x in (('N', n), ('D', d)):
    xs = np.unique(x)
    if len(xs) < MIN_POINTS['kaplan']:
      continue
    best = np.array([loss[x == v].min() for v in xs])
    p, k = _power_law(xs, best)
    out[f'alpha_{name}'] = -p
    out[f'{name}_c'] = k ** (1 / -p)
  return out


def optimal_allocation(fit: dict, flops: float) -> tuple[float, float]:
  """N_opt and D_opt for a FLOP budget under a fit of approach 1, 2 or 3."""
  return fit['G_N'] * flops ** fit['a'], fit['G_D'] * flops ** fit['b']


def plan(fit: dict, flops: float, sizes: int = 5, spread: float = 4.0) -> dict:
  """The compute-optimal N, D for a budget and an IsoFLOP sweep grid around it."""
  n_opt, d_opt = optimal_allocation(fit, flops)
  grid = [{'N': float(n), 'D': float(flops / (6 * n))}
          for n in np.geomspace(n_opt / spread, n_opt * spread, sizes)]
  return {'flops': flops, 'N_opt': n_opt, 'D_opt': d_opt, 'sweep': grid}


# ---- plots and the command line ----------------------------------------------------------

def plot(fit: dict, n, d, loss, path: str) -> None:
  """Loss against FLOPs coloured by N, with the compute-optimal frontier of the fit."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  n, d, loss = (np.asarray(v, np.float64) for v in (n, d, loss))
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
  points = left.scatter(6 * n * d, loss, c=np.log10(n), cmap='viridis', s=18)
  fig.colorbar(points, ax=left, label='log10 N')
  left.set(xscale='log', xlabel='training FLOPs (6ND)', ylabel='loss', title='runs')
  flops = np.geomspace((6 * n * d).min(), (6 * n * d).max() * 100, 50)
  n_opt, d_opt = optimal_allocation(fit, flops)
  right.loglog(flops, n_opt, label=f'N_opt ∝ C^{fit["a"]:.2f}')
  right.loglog(flops, d_opt, label=f'D_opt ∝ C^{fit["b"]:.2f}')
  right.set(xlabel='training FLOPs C', ylabel='compute-optimal parameters N / tokens D',
            title=f'compute-optimal allocation (approach {fit["approach"]})')
  right.legend()
  if 'E' in fit:
    for i, size in enumerate(np.unique(n)):
      tokens = np.geomspace(d.min(), d.max(), 30)
      model = fit['E'] + fit['A'] / size ** fit['alpha'] + fit['B'] / tokens ** fit['beta']
      left.plot(6 * size * tokens, model, lw=0.8, color='gray',
                label='the fit, L(N, D) at each N' if i == 0 else None)
    left.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def read_table(path: str, columns: list[str]) -> dict[str, np.ndarray]:
  with open(path, newline='') as f:
    rows = list(csv.DictReader(f))
  if not rows:
    raise FitError(f'{path}: no rows')
  missing = [c for c in columns if c not in rows[0]]
  if missing:
    raise FitError(f'{path}: no column {missing[0]!r} (columns: {list(rows[0])})')
  return {c: np.array([row[c] for row in rows], dtype=object) for c in columns}


def fit_table(table: dict, n_col, d_col, flops_col, loss_col, approach, run_col=None,
              exclude_highest_loss: int = 0) -> tuple[dict, tuple]:
  """Fits a table (as read_table returns); returns the fit and its (N, D, loss) arrays."""
  n = table[n_col].astype(float)
  d = table[d_col].astype(float) if d_col else table[flops_col].astype(float) / (6 * n)
  loss = table[loss_col].astype(float)
  run = table[run_col] if run_col else n
  if exclude_highest_loss:
    keep = np.argsort(loss)[:max(len(loss) - exclude_highest_loss, 0)]
    n, d, loss, run = n[keep], d[keep], loss[keep], run[keep]
  fits = {'1': lambda: fit_envelope(n, d, loss, run), '2': lambda: fit_isoflop(n, d, loss),
          '3': lambda: fit_parametric(n, d, loss), 'kaplan': lambda: fit_kaplan(n, d, loss)}
  return fits[str(approach)](), (n, d, loss)

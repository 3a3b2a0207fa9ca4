"""Scaling-law fits recover known constants from synthetic runs."""
import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from lm.analysis import scaling

# Hoffmann et al. 2022's fitted constants, used as the truth here, except B (410.7 there):
# far from A, so that a fit that swapped the two would show
E, A, B, ALPHA, BETA = 1.69, 406.4, 1200.0, 0.34, 0.28
TRUE_A, TRUE_B = BETA / (ALPHA + BETA), ALPHA / (ALPHA + BETA)


def law(n, d):
  return E + A / n ** ALPHA + B / d ** BETA


def grid_runs(noise=0.005, seed=0):
  n, d = (x.ravel() for x in np.meshgrid(np.geomspace(1e7, 1e10, 8), np.geomspace(1e9, 1e12, 8)))
  return n, d, law(n, d) * np.exp(np.random.default_rng(seed).normal(0, noise, n.shape))


@pytest.fixture(scope='module')
def parametric():
  return scaling.fit_parametric(*grid_runs())


def test_approach_3_recovers_the_constants(parametric):
  fit = parametric
  assert abs(fit['alpha'] - ALPHA) < 0.02 and abs(fit['beta'] - BETA) < 0.02
  assert abs(fit['E'] - E) < 0.05
  assert abs(np.log(fit['A'] / A)) < 0.1 and abs(np.log(fit['B'] / B)) < 0.1   # 4% and 2% here
  assert abs(fit['a'] - TRUE_A) < 0.01 and abs(fit['b'] - TRUE_B) < 0.01
  assert abs(fit['a'] + fit['b'] - 1) < 1e-9
  # the closed-form optimum is where the loss is lowest along an IsoFLOP line
  flops = 1e21
  n_opt, d_opt = scaling.optimal_allocation(fit, flops)
  assert abs(6 * n_opt * d_opt / flops - 1) < 1e-6
  sizes = np.geomspace(n_opt / 3, n_opt * 3, 201)
  tokens = flops / (6 * sizes)
  model = fit['E'] + fit['A'] / sizes ** fit['alpha'] + fit['B'] / tokens ** fit['beta']
  assert abs(np.log(sizes[np.argmin(model)] / n_opt)) < 0.02


def test_approach_2_isoflop_recovers_the_exponents():
  rng = np.random.default_rng(1)
  # model sizes around the optimum of each budget (1e6-1e10 parameters for 1e18-1e21 FLOPs)
  rows = [(n, c / (6 * n)) for c in np.geomspace(1e18, 1e21, 4) for n in np.geomspace(1e6, 1e10, 9)]
  n, d = map(np.array, zip(*rows))
  fit = scaling.fit_isoflop(n, d, law(n, d) * np.exp(rng.normal(0, 0.002, n.shape)))
  assert abs(fit['a'] - TRUE_A) < 0.02 and abs(fit['b'] - TRUE_B) < 0.02
  assert len(fit['profiles']) == 4


def test_approach_1_envelope_recovers_the_exponents():
  rows = [(n, d, i) for i, n in enumerate(np.geomspace(1e7, 1e10, 10))
          for d in np.geomspace(1e8, 1e12, 40)]
  n, d, run = map(np.array, zip(*rows))
  fit = scaling.fit_envelope(n, d, law(n, d), run)
  assert abs(fit['a'] - TRUE_A) < 0.03 and abs(fit['b'] - TRUE_B) < 0.03


def test_kaplan_power_laws():
  n = np.geomspace(1e6, 1e9, 6)
  fit = scaling.fit_kaplan(n, np.full(6, 1e12), (8.8e13 / n) ** 0.076)
  assert abs(fit['alpha_N'] - 0.076) < 1e-6 and abs(fit['N_c'] / 8.8e13 - 1) < 1e-4


def test_bootstrap_intervals_bracket_the_fit(parametric):
  intervals = scaling.bootstrap_parametric(*grid_runs(), samples=3)
  for key in ('alpha', 'beta', 'E'):
    low, high = intervals[key]
    assert low - 0.03 <= parametric[key] <= high + 0.03


def test_too_few_points_say_how_many_are_needed():
  with pytest.raises(scaling.FitError, match='approach 3 needs at least 5 runs'):
    scaling.fit_parametric([1e7, 1e8], [1e9, 1e9], [3.0, 2.9])
  with pytest.raises(scaling.FitError, match='approach 2 needs at least 6'):
    scaling.fit_isoflop([1e7, 1e8, 1e9], [1e9, 1e8, 1e7], [3.0, 2.8, 3.1])


def test_command_line_fit_plot_and_plan(tmp_path):
  n, d, loss = grid_runs()
  table = tmp_path / 'runs.csv'
  with table.open('w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['params', 'flops', 'loss'])
    writer.writerows(zip(n, 6 * n * d, loss))
  command = [sys.executable, '-m', 'lm.scaling', 'fit', str(table), '--n-col', 'params',
             '--flops-col', 'flops', '--loss-col', 'loss', '--approach', '3',
             '--exclude-highest-loss', '4', '--plot', str(tmp_path / 'fit.png')]
  result = subprocess.run(command, capture_output=True, text=True, check=True)
  out = result.stdout
  fit = json.loads(out)   # stdout is the fit alone; the plot's line goes to stderr
  assert f'wrote {tmp_path / "fit.png"}' in result.stderr
  assert {'E', 'A', 'B', 'alpha', 'beta', 'a', 'b'} <= set(fit)
  assert abs(fit['alpha'] - ALPHA) < 0.03
  assert (tmp_path / 'fit.png').stat().st_size > 10_000
  (tmp_path / 'fit.json').write_text(out)
  planned = json.loads(subprocess.run(
      [sys.executable, '-m', 'lm.scaling', 'plan', '--fit', str(tmp_path / 'fit.json'),
       '--flops', '1e21'], capture_output=True, text=True, check=True).stdout)
  assert len(planned['sweep']) == 5
  assert abs(6 * planned['N_opt'] * planned['D_opt'] / 1e21 - 1) < 1e-6
  bad = subprocess.run([*command[:6], 'nope', *command[7:]], capture_output=True, text=True)
  assert bad.returncode == 2 and "no column 'nope'" in bad.stderr


@pytest.mark.parametrize('text, message', [('', 'Expecting value'), ('{"a": 1}', "no 'G_N'")])
def test_plan_names_a_file_that_is_not_a_fit(tmp_path, capsys, text, message):
  from lm import cli
  from lm import scaling as scaling_command
  path = tmp_path / 'fit.json'
  path.write_text(text)
  with pytest.raises(SystemExit) as exit_info:
    cli.run(scaling_command.main, ['plan', '--fit', str(path), '--flops', '1e18'])
  err = capsys.readouterr().err
  assert exit_info.value.code == 2 and f'--fit={path}: not a fit' in err and message in err
  assert err.count('\n') == 1


def test_runs_with_numbers_in_their_names_sort_by_value(tmp_path):
  from lm.analysis import compare
  names = ['steps=160', 'steps=40', 'lr=1e-3,steps=40', 'lr=3e-4,steps=40', 'steps=1200']
  for name in names:
    (tmp_path / name).mkdir()
    (tmp_path / name / 'config.json').write_text('{}')
  found = [run.name for run in compare.find_runs([str(tmp_path)])]
  assert found == ['lr=3e-4,steps=40', 'lr=1e-3,steps=40', 'steps=40', 'steps=160',
                   'steps=1200']   # 3e-4 < 1e-3

"""The benchmarks' plumbing: what they run and how they derive their keys (never a timing)."""
import json
import math
import re
import subprocess
import sys

from etils import epath

from tests.conftest import command_env

ROOT = epath.Path(__file__).parent.parent


def _lines(result) -> list[dict]:
  """The JSON lines of a command's stdout (TFDS reports preparing the corpus there too)."""
  assert result.returncode == 0, result.stderr[-3000:]
  return [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{')]


def test_vs_torch_runs_both_sides_and_derives_ratios_and_fixed_costs(tmp_path, tfds_dir):
  """A stand-in reference records its arguments, sleeps 0.5 s and reports 5 ms per iteration:
  lm's side is real (the smoke recipe), and the pair's ratios and fixed costs follow from both
  sides."""
  reference = tmp_path / 'reference.py'
  reference.write_text(
      'import json, sys, time\n'
      f'open({str(tmp_path / "argv")!r}, "a").write(" ".join(sys.argv[1:]) + "\\n")\n'
      'time.sleep(0.5)\n'
      'print(json.dumps({"ms_per_iter": 5.0, "val_loss": 2.5}))\n')
  command = [sys.executable, 'benchmarks/vs_torch.py', '--reference', str(reference),
             '--pairs', '1', '--config', 'experiments/shakespeare_char.py:smoke',
             f'--lm_flag=--config.data.dir={tfds_dir}']
  run = lambda *flags: subprocess.run([*command, *flags], capture_output=True, text=True,
                                      cwd=ROOT, env=command_env())

  pair, median = _lines(run('--steps', '5'))
  assert pair['pair'] == 1 and pair['steps'] == 5 and pair['torch_ms'] == 5.0
  assert pair['lm_ms'] > 0 and pair['step_ratio'] == round(pair['lm_ms'] / 5.0, 3)
  assert median == {'median': True, 'pairs': 1, **{k: v for k, v in pair.items()
                                                    if k != 'pair'}}

  pair, median = _lines(run('--steps', '12', '--whole'))
  assert pair['torch_ms'] == 5.0 and pair['torch_val_loss'] == 2.5
  assert pair['step_ratio'] == round(pair['lm_ms'] / 5.0, 3)
  assert pair['torch_s'] >= 0.5   # the stand-in's sleep, timed from the outside
  assert math.isclose(pair['wall_ratio'], pair['lm_s'] / pair['torch_s'], rel_tol=0.01)
  assert abs(pair['lm_fixed_s'] - (pair['lm_s'] - 12 * pair['lm_ms'] / 1e3)) <= 0.01
  assert abs(pair['torch_fixed_s'] - (pair['torch_s'] - 12 * 5.0 / 1e3)) <= 0.01
  assert 0 < pair['lm_eval_s'] < pair['lm_fixed_s']   # one validation and one test evaluation
  assert 0 < pair['lm_val_loss'] < math.log(65)   # trained 12 steps: below uniform guessing
  assert 'lm_val_loss' not in median and median['lm_s'] == pair['lm_s']

  # a rerun: the untimed first run stored every program, so the timed one compiles none
  pair, median = _lines(run('--steps', '12', '--whole', '--warm_cache'))
  assert pair['lm_programs_compiled'] == 0 and 0 < pair['lm_val_loss'] < math.log(65)

  corpus = ROOT / 'lm' / 'data' / 'tinyshakespeare.txt'
  assert (tmp_path / 'argv').read_text().splitlines() == [
      f'--data {corpus} --iters 10', f'--data {corpus} --iters 12',
      f'--data {corpus} --iters 12']

  missing = run('--reference', str(tmp_path / 'none.py'))
  assert missing.returncode == 2
  assert missing.stderr.strip().splitlines() == [
      f'error: --reference: no such file: {tmp_path / "none.py"}']
  steady_warm = run('--warm_cache')
  assert steady_warm.returncode == 2
  assert steady_warm.stderr.strip().splitlines() == [
      'error: --warm_cache times the whole commands: add --whole']


def test_throughput_compares_values_in_one_process_and_profiles_them(tfds_dir):
  """--compare: one row per value, each of its own config (a batch of 8 or 16 sequences of 64
  tokens per step), and the windows' ratio to the first value's; --profile: each row's traced
  kernels, every one named by the JAX operation it came from."""
  command = [sys.executable, 'benchmarks/throughput.py', '--config',
             'experiments/shakespeare_char.py:smoke', f'--config.data.dir={tfds_dir}',
             '--steps', '20']
  run = lambda *flags: subprocess.run([*command, *flags], capture_output=True, text=True,
                                      cwd=ROOT, env=command_env())
  first, second = _lines(run('--compare', 'train.batch_size=8,16', '--profile', '1000',
                              '--profile_steps', '2'))
  assert [first['point'], second['point']] == [{'train.batch_size': 8}, {'train.batch_size': 16}]
  for row, batch in ((first, 8), (second, 16)):
    # tokens_per_s is the row's tokens per step over its own step time
    assert math.isclose(row['tokens_per_s'] * row['step_ms'] / 1e3, batch * 64, rel_tol=1e-3)
    profile = row['profile']
    names = [name for name, _ in profile['operations']]
    # all of them (1000 > the step's kernels): their milliseconds add up to kernel_ms
    assert math.isclose(sum(ms for _, ms in profile['operations']), profile['kernel_ms'],
                        abs_tol=0.01 + 0.0005 * len(names))
    # every kernel traced is an instruction of the step compiled again (an instruction not found
    # there would keep its number), and the model's matmuls are there, forward and backward
    assert not [name for name in names if re.search(r'\.\d+$', name)], names
    for matmul in ('attn/q', 'attn/kv', 'attn/o', 'mlp/wi', 'mlp/wo'):
      for direction in ('jvp', 'bwd'):
        assert f'{direction}(Transformer)/layers_N/{matmul}/dot_general' in names, names
  assert first['vs_first'] == 1.0 and second['vs_first'] > 0

  for flag, message in (('optim.nonfinit=select', "error: sweep override 'optim.nonfinit' is not "
                                                  "a config key; did you mean "
                                                  "'optim.nonfinite_skip'?"),
                        ('mesh.cpu_devices=1,2', 'error: --compare: mesh.cpu_devices sets the '
                                                 'devices of the process; compare it across '
                                                 'runs of this command'),
                        ('train.batch_size', "error: --compare='train.batch_size' must be "
                                             'KEY=V1,V2,...')):
    bad = run('--compare', flag)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == message

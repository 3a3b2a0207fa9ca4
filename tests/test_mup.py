"""muP (lm.model.transformer.ModelConfig, lm.training.optim.scale_hidden, lm.analysis.mup):
SP bit for bit at the base width; away from it, the initialisation, logits, attention scores
and Adam's rates of hidden weights scaled by the width multiplier; and the coordinate check,
whose outputs stay flat under muP and grow under SP."""
import jax
import numpy as np
import pytest

from lm.analysis import mup
from lm.config import arguments
from lm.training import optim
from tests.conftest import build_program, flat, random_batch, tiny_config

LLAMA = dict(positions='rope', norm='rmsnorm', mlp='swiglu', use_bias=False,
             tie_embeddings=False)


def _steps(config, steps=2):
  """(initial, final) parameters and the last logits of `steps` AdamW steps."""
  program = build_program(config)
  state = program.init(jax.random.PRNGKey(0))
  initial = flat(state.params)
  batch = random_batch(config.train.batch_size, config.data.seq_len)
  for _ in range(steps):
    state, _ = program.train_step(state, jax.device_put(batch, program.batch_sharding))
  logits = program.model.apply(program.variables(state.params), batch['inputs'])
  return initial, flat(state.params), np.asarray(logits)


@pytest.mark.parametrize('style', [{}, LLAMA], ids=['gpt', 'llama'])
def test_mup_at_its_base_width_is_sp_bit_for_bit(style):
  sp = _steps(tiny_config(**style))
  at_base = _steps(tiny_config(**style, parametrization='mup', mup_base_width=32))
  for a, b in zip(sp[:2], at_base[:2]):
    assert a.keys() == b.keys()
    for path in a:
      np.testing.assert_array_equal(a[path], b[path], err_msg=path)
  np.testing.assert_array_equal(sp[2], at_base[2])
  # twice the base width: another model (what the comparison above could have missed)
  wider = _steps(tiny_config(**style, parametrization='mup', mup_base_width=16))
  assert not np.allclose(wider[2], sp[2])


def _mean_abs(tree: dict[str, np.ndarray], part: str) -> float:
  return float(np.mean([np.abs(x).mean() for path, x in tree.items() if part in path]))


def test_mup_scales_hidden_init_and_adam_rates_by_the_width_multiplier():
  """At 4x the base width: hidden kernels start with std / 2 and move lr / 4 a step (Adam's
  first step moves every weight by lr, where its epsilon is negligible beside the gradient:
  made so here); embeddings, readout and norms as in SP."""
  sp, mu = tiny_config(**LLAMA), tiny_config(**LLAMA, parametrization='mup', mup_base_width=8)
  for config in (sp, mu):
    config.optim.update(eps=1e-20, weight_decay=0.0)
  sp_initial, sp_final, _ = _steps(sp, steps=1)
  initial, final, _ = _steps(mu, steps=1)
  moved = lambda a, b: {path: b[path] - a[path] for path in a}
  sp_update, update = moved(sp_initial, sp_final), moved(initial, final)
  for kernel in ("['q']['kernel']", "['kv']['kernel']", "['o']['kernel']", "['wi']['kernel']",
                 "['wo']['kernel']"):
    assert _mean_abs(initial, kernel) / _mean_abs(sp_initial, kernel) == pytest.approx(
        0.5, rel=0.05), kernel
    assert _mean_abs(update, kernel) / _mean_abs(sp_update, kernel) == pytest.approx(
        0.25, rel=0.01), kernel
  for vector in ("['embedding']", "['head']", "['scale']"):
    assert _mean_abs(initial, vector) == pytest.approx(_mean_abs(sp_initial, vector), rel=0.05)
    assert _mean_abs(update, vector) == pytest.approx(_mean_abs(sp_update, vector), rel=0.01)


def test_scale_hidden_multiplies_the_updates_of_kernels_alone():
  params = {'embed': {'embedding': 1.0}, 'pos_embed': 1.0, 'head': 1.0, 'score_head': 1.0,
            'norm_out': {'scale': 1.0, 'bias': 1.0},
            'layers': {'attn': {'q': {'kernel': 1.0, 'bias': 1.0}, 'o': {'u': 1.0, 'v': 1.0}},
                       'mlp': {'wi': {'kernel': 1.0}}}}
  updates, _ = optim.scale_hidden(0.25).update(params, optim.scale_hidden(0.25).init(params))
  scaled = {jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_flatten_with_path(updates)[0]
            if x == 0.25}
  assert scaled == {"['layers']['attn']['q']['kernel']", "['layers']['attn']['o']['u']",
                    "['layers']['attn']['o']['v']",
                    "['layers']['mlp']['wi']['kernel']"}


def test_coordinate_check_is_flat_under_mup_and_grows_under_sp(tfds_dir):
  """Widths 32-128, 3 steps at lr 0.01, one seed. Measured: muP's largest |slope| after
  the first step 0.36 (small widths: finite-width effects and noise; 0.19 at widths 64-1024
  with 3 seeds), SP's hidden layers' slopes 1.2-2.1 at the last step and its logits' 0.69;
  at init the logits' slope is +0.52 under SP and -0.44 under muP, whose readout is
  multiplied by 1 / width (theory: +-0.5)."""
  config = arguments.load_config('experiments/mup_shakespeare.py', [
      f'--config.data.dir={tfds_dir}', '--config.data.seq_len=32', '--config.train.batch_size=8',
      '--config.model.mup_base_width=32', '--config.optim.lr=0.01'])
  result = mup.coord_check(config, [32, 64, 128], steps=3)
  sp, mu = result['slopes']['sp'], result['slopes']['mup']
  hidden = ['layers_0/attn', 'layers_0/mlp', 'layers_1/attn', 'layers_1/mlp']
  assert set(mu) == {'embed', 'logits', *hidden}
  assert result['mup_max_abs_slope'] < 0.5, mu
  assert min(sp[layer][-1] for layer in hidden) > 1.0, sp
  assert result['sp_logits_slope'] > 0.4, sp['logits']
  assert sp['logits'][0] == pytest.approx(0.5, abs=0.1)
  assert mu['logits'][0] == pytest.approx(-0.5, abs=0.1)


def test_transfer_finds_each_widths_best_rate_and_how_far_it_moves(tmp_path):
  """Synthetic sweep rows: under SP the best rate halves with each doubling of the width (and a
  run diverges); under muP it stays."""
  rows = []
  for p, best_k in (('sp', lambda i: 7 + i), ('mup', lambda i: 7)):
    for i, width in enumerate((64, 128, 256)):
      for k in range(5, 12):
        loss = 1.5 - 0.05 * i + 0.1 * abs(k - best_k(i))
        curve = [(1, 4.0)]
        if p == 'sp' and k == 5 and width == 256:
          loss, curve = None, [(1, 4.0), (2, float('nan'))]   # stopped: a non-finite loss
        if p == 'sp' and k == 6 and width == 256:
          loss = None   # not evaluated yet
        rows.append({'run': f'{p}-{width}-{k}', 'final_val_loss': loss, 'train_curve': curve,
                     'point': {'model.parametrization': p, 'model.d_model': width,
                               'optim.lr': 2.0 ** -k}})
  result = mup.transfer(rows)
  assert result['best_lr'] == {'sp': {64: 2 ** -7, 128: 2 ** -8, 256: 2 ** -9},
                               'mup': {64: 2 ** -7, 128: 2 ** -7, 256: 2 ** -7}}
  assert result['best_lr_shift'] == {'sp': -2, 'mup': 0}
  assert result['wider_never_worse'] == {'sp': True, 'mup': True}
  assert result['losses']['sp'][256][2 ** -5] == float('inf')
  assert result['losses']['sp'][256][2 ** -6] is None
  table = mup.transfer_table(result).splitlines()
  assert table[2].startswith('| SP | 64 |') and '**1.500**' in table[2]
  assert table[4] == '| SP | 256 | 1.600 | 1.500 | **1.400** | 1.500 | 1.600 | - | diverged |'
  mup.transfer_plot(result, str(tmp_path / 'transfer.png'))
  assert (tmp_path / 'transfer.png').stat().st_size > 10_000
  rows[0]['point'] = {'optim.lr': 0.1}
  with pytest.raises(mup.ConfigError, match=r'run sp-64-5: its sweep point .* does not set'):
    mup.transfer(rows)


@pytest.mark.parametrize('widths, steps, message', [
    ('64,128', 1, r'a coordinate check needs at least 3 different widths, got \[64, 128\]'),
    ('64,64,128', 1, r'at least 3 different widths, got \[64, 64, 128\]'),
    ('64,128,x', 1, r"--widths='64,128,x' must be comma-separated integers"),
    ('64,128,-256', 1, r"--widths='64,128,-256' must be positive"),
    ('64,128,256', 0, r'--steps=0 and --seeds=1 must be at least 1'),
])
def test_a_coordinate_check_refuses_what_it_cannot_fit(widths, steps, message):
  with pytest.raises(mup.ConfigError, match=message):
    mup.coord_check(tiny_config(), mup.parse_widths(widths), steps)

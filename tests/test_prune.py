"""Pruning (lm/compress/prune.py): exact sparsity per layer and global, 2:4 groups, pruned weights
still zero after optimizer steps (AdamW with weight decay and momentum), the gradual
schedule, and the command from a trained run."""
import json
import re

import jax
import numpy as np
import pytest

from lm import config as config_lib
from lm.compress import prune
from lm.config import ConfigError
from tests.conftest import build_program, random_batch, tiny_config
from tests.test_train import run_main

KERNELS = ('attn/q', 'attn/kv', 'attn/o', 'mlp/wi', 'mlp/wo')


def _prune_config(**overrides):
  p = config_lib.get_base_config().prune
  p.update({'method': 'magnitude', **overrides})
  return p


def _params(seed=0):
  return build_program(tiny_config()).init(jax.random.PRNGKey(seed)).params


def _kernel(params, name):
  module, linear = name.split('/')
  return np.asarray(params['layers'][module][linear]['kernel'])


def test_magnitude_per_layer_prunes_exactly_the_smallest_of_each_layer():
  params = _params()
  pruned, kept = prune.prune(params, _prune_config(sparsity=0.3), 20)
  for name in KERNELS:
    w, p, k = _kernel(params, name), _kernel(pruned, name), _kernel(kept, name)
    for layer in range(2):   # stacked layers: each pruned on its own
      zeros = int(np.floor(0.3 * w[layer].size))
      assert (p[layer] == 0).sum() == zeros == (~k[layer]).sum()
      cut = np.sort(np.abs(w[layer]).ravel())[zeros]
      assert np.abs(w[layer][~k[layer]]).max() <= cut <= np.abs(w[layer][k[layer]]).min()
      assert np.array_equal(p[layer][k[layer]], w[layer][k[layer]])   # the rest untouched
  assert np.array_equal(np.asarray(pruned['embed']['embedding']),
                        np.asarray(params['embed']['embedding']))   # not a target


def test_global_magnitude_prunes_exactly_the_smallest_over_all_kernels():
  params = _params()
  config = _prune_config(sparsity=0.6, scope='global')
  pruned, _ = jax.jit(lambda p: prune.prune(p, config, 20))(params)   # as the train step does
  weights = np.concatenate([_kernel(params, n).ravel() for n in KERNELS])
  after = np.concatenate([_kernel(pruned, n).ravel() for n in KERNELS])
  zeros = int(np.floor(0.6 * weights.size))
  assert (after == 0).sum() == zeros
  assert np.abs(weights[after == 0]).max() <= np.abs(weights[after != 0]).min()
  per_kernel = [(_kernel(pruned, n) == 0).mean() for n in KERNELS]
  assert max(per_kernel) - min(per_kernel) > 0.01   # not the same share everywhere
  assert prune.sparsity(pruned, _prune_config().targets) == pytest.approx(zeros / weights.size)


def test_two_of_four_keeps_the_two_largest_of_every_group_along_the_input_axis():
  params = _params()
  pruned, _ = prune.prune(params, _prune_config(method='nm', n=2, m=4), 20)
  for name in KERNELS:
    w, p = _kernel(params, name), _kernel(pruned, name)
    groups_w = np.abs(w).reshape(2, w.shape[1] // 4, 4, -1)
    groups_p = p.reshape(2, p.shape[1] // 4, 4, -1)
    assert ((groups_p != 0).sum(2) == 2).all(), name   # exactly 2 of every 4
    kept_min = np.where(groups_p != 0, groups_w, np.inf).min(2)
    dropped_max = np.where(groups_p == 0, groups_w, -np.inf).max(2)
    assert (dropped_max <= kept_min).all(), name


def _train(program, params, steps):
  """`steps` steps on one batch from `params` (copied: the step donates its state)."""
  params = jax.device_put(jax.device_get(params), program.state_sharding.params)
  state = program.init(jax.random.PRNGKey(0)).replace(params=params)
  batch = jax.device_put(random_batch(8, 16), program.batch_sharding)
  for _ in range(steps):
    state, _ = program.train_step(state, batch)
  return state


def test_pruned_weights_stay_exactly_zero_through_adamw_steps():
  config = tiny_config()
  config.prune.update(method='magnitude', sparsity=0.5)
  config.optim.update(name='adamw', weight_decay=0.1, lr=1e-2)
  program = build_program(config)
  # other weights than the program's own initialisation, which the optimizer state saw
  pruned, kept = jax.device_get(prune.prune(_params(seed=1), config.prune, 20))
  state = _train(program, pruned, 5)
  for name in KERNELS:
    after, k = _kernel(state.params, name), _kernel(kept, name)
    assert (after[~k] == 0).all(), name                  # exactly zero, not small
    assert (after[k] != _kernel(pruned, name)[k]).mean() > 0.9, name   # the rest trained
  assert prune.sparsity(state.params, config.prune.targets) == 0.5
  # the same steps without the transform move the pruned weights
  plain = _train(build_program(_without_pruning(config)), pruned, 1)
  assert (_kernel(plain.params, 'mlp/wi')[~_kernel(kept, 'mlp/wi')] != 0).any()


def _without_pruning(config):
  config = config.copy_and_resolve_references()
  config.prune.method = 'none'
  return config


def test_gradual_schedule_rises_cubically_to_the_target():
  config = tiny_config()
  config.train.steps = 20
  config.prune.update(method='magnitude', sparsity=0.8, schedule='gradual', update_every=5)
  program = build_program(config)
  params = prune.prune(_params(), config.prune, 20)[0]
  assert prune.sparsity(params, config.prune.targets) == 0   # s_0 = 0
  state = program.init(jax.random.PRNGKey(0)).replace(params=params)
  batch = jax.device_put(random_batch(8, 16), program.batch_sharding)
  seen = []
  for _ in range(20):
    state, _ = program.train_step(state, batch)
    seen.append(prune.sparsity(state.params, config.prune.targets))
  expected = lambda t: 0.8 * (1 - (1 - t / 20) ** 3)
  for step in (5, 10, 15, 20):
    assert seen[step - 1] == pytest.approx(expected(step), abs=1e-3), (step, seen)
  assert seen[5] == seen[4] and seen[-1] == pytest.approx(0.8, abs=1e-3)   # floors per layer


@pytest.mark.parametrize('overrides,message', [
    (dict(sparsity=1.0), 'sparsity=1.0 must be in [0, 1)'),
    (dict(sparsity=-0.1), 'must be in [0, 1)'),
    (dict(method='nm', n=4, m=4), 'config.prune.n=4 must be in 1 .. config.prune.m - 1 = 3'),
    (dict(method='nm', schedule='gradual'), "prunes one-shot"),
    (dict(method='random'), "config.prune.method='random' is not one of"),
    (dict(method='nm', n=1, m=3), 'config.prune.m=3 does not divide model.d_model=32'),
])
def test_bad_pruning_configs_are_refused(overrides, message):
  config = tiny_config()
  config.prune.update({'method': 'magnitude', **overrides})
  with pytest.raises(ConfigError, match=re.escape(message)):
    config_lib.validate(config_lib.resolve(config, None), 1)


def test_prune_experiment_from_a_trained_run(char_run, tmp_path, tfds_dir):
  run_main(tmp_path / 'pruned', '--config.train.eval_batches=4', f'--config.data.dir={tfds_dir}',
           config=f'experiments/prune_shakespeare.py:nm,smoke,init_from={char_run}')
  final = json.loads((tmp_path / 'pruned' / 'final.json').read_text())
  assert final['sparsity'] == 0.5 and final['val_loss'] < 4.0, final

"""Sweep points, run names and override checks (lm/config/sweeps.py)."""
import pytest

from lm import config as config_lib
from lm.config import sweeps


def test_grid_zipped_product():
  g = sweeps.grid(**{'model.d_model': [64, 128], 'optim.lr': [1e-3, 3e-3]})
  assert g == [{'model.d_model': 64, 'optim.lr': 1e-3}, {'model.d_model': 64, 'optim.lr': 3e-3},
               {'model.d_model': 128, 'optim.lr': 1e-3}, {'model.d_model': 128, 'optim.lr': 3e-3}]
  z = sweeps.zipped(**{'model.n_layers': [2, 4], 'model.d_model': [64, 128]})
  assert z == [{'model.n_layers': 2, 'model.d_model': 64},
               {'model.n_layers': 4, 'model.d_model': 128}]
  assert len(sweeps.product(z, sweeps.grid(**{'train.steps': [1, 2, 3]}))) == 6
  with pytest.raises(config_lib.ConfigError, match='different lengths'):
    sweeps.zipped(a=[1], b=[1, 2])


def test_random_draws_are_reproducible_and_in_range():
  draws = sweeps.log_uniform(1e-4, 1e-2, 50, seed=3)
  assert draws == sweeps.log_uniform(1e-4, 1e-2, 50, seed=3)
  assert all(1e-4 <= v <= 1e-2 for v in draws)
  assert sum(v < 1e-3 for v in draws) > 10       # log-uniform: half the mass below 1e-3
  assert all(0 <= v <= 1 for v in sweeps.uniform(0, 1, 10))


def test_run_names_are_stable_and_readable():
  point = {'model.d_model': 64, 'optim.lr': 0.001, 'optim.name': 'adamw'}
  assert sweeps.run_name(point) == 'd_model=64,lr=0.001,name=adamw'
  assert sweeps.run_name({'data.source': 'text:/a b'}) == 'source=text__a_b'


def test_overrides_apply_and_unknown_keys_suggest_the_closest():
  config = config_lib.get_base_config()
  applied = sweeps.apply(config, {'model.d_model': 256, 'optim.lr': 3})
  assert applied.model.d_model == 256 and applied.optim.lr == 3.0
  assert isinstance(applied.optim.lr, float) and config.model.d_model == 128
  with pytest.raises(config_lib.ConfigError,
                     match="'model.d_modle' is not a config key; did you mean 'model.d_model'"):
    sweeps.apply(config, {'model.d_modle': 256})
  assert sweeps.as_flags({'model.d_model': 64, 'mesh.shape': (1, 2, 1, 1)}) == [
      '--config.model.d_model=64', '--config.mesh.shape=(1, 2, 1, 1)']

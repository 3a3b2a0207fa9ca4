"""Every test runs on CPU with 8 virtual devices, set before JAX is imported."""
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ['JAX_PLATFORMS'] = 'cpu'

import pytest  # noqa: E402

from lm import config as config_lib  # noqa: E402


def tiny_config(**model):
  """A small model that every mesh of 8 devices can shard (heads, kv heads, d_ff, vocab)."""
  c = config_lib.get_base_config()
  c.model.update(dict(vocab_size=64, n_layers=2, d_model=32, n_heads=8, n_kv_heads=8,
                      d_ff=64, dtype='float32', dropout=0.0), **model)
  c.data.seq_len = 16
  c.train.update(batch_size=8, eval_batch_size=8, steps=20, seed=0)
  c.optim.update(warmup_steps=2, lr=1e-2)
  return c


@pytest.fixture(scope='session')
def tfds_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))

"""One train step on a sharded mesh equals the same step on one device."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tests.conftest import build_program, random_batch, tiny_config


def _one_step(program, batch):
  state = program.init(jax.random.PRNGKey(0))
  batch = jax.device_put(batch, program.batch_sharding)
  state, metrics = program.train_step(state, batch)
  return state, jax.device_get(metrics)


@pytest.mark.parametrize('shape', [(8, 1, 1, 1), (1, 8, 1, 1), (1, 1, 8, 1), (2, 2, 2, 1)])
@pytest.mark.parametrize('style', ['gpt', 'llama'])
def test_sharded_step_matches_single_device(shape, style):
  model = {} if style == 'gpt' else dict(positions='rope', norm='rmsnorm', mlp='swiglu',
                                         use_bias=False, tie_embeddings=False, n_kv_heads=8)
  config = tiny_config(**model)
  batch = random_batch(config.train.batch_size, config.data.seq_len)
  single_state, single = _one_step(build_program(config), batch)
  sharded_state, sharded = _one_step(build_program(config, shape), batch)

  np.testing.assert_allclose(sharded['loss'], single['loss'], rtol=1e-5)
  np.testing.assert_allclose(sharded['grad_norm'], single['grad_norm'], rtol=1e-4)
  for path, a, b in zip(*_flat(sharded_state.params), _flat(single_state.params)[1]):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6,
                               err_msg=str(path))

  data, fsdp, tensor, _ = shape
  params = sharded_state.params
  q = params['layers']['attn']['q']['kernel']           # layers x embed x heads x head_dim
  wi = params['layers']['mlp']['wi']['kernel']
  assert q.shape[0] == config.model.n_layers
  assert _spec(q) == P('stage', 'fsdp', 'tensor', None)   # 'stage' has size 1 here
  assert _spec(wi)[1] == 'fsdp' and _spec(wi)[-1] == 'tensor'
  assert _spec(params['embed']['embedding']) == P('tensor', 'fsdp')
  # every device holds 1 / (fsdp * tensor) of the q kernel
  assert q.addressable_shards[0].data.size == q.size // (fsdp * tensor)
  # optimizer moments are sharded like the parameters
  mu = sharded_state.opt_state.inner_state[1][0].mu['layers']['attn']['q']['kernel']
  assert _spec(mu) == _spec(q)


def _spec(x):
  spec = tuple(x.sharding.spec)
  return P(*(spec + (None,) * (x.ndim - len(spec))))


def _flat(tree):
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [jax.tree_util.keystr(p) for p, _ in leaves], [x for _, x in leaves]

"""Pipeline stages give the loss and gradients of the unpipelined model."""
import functools

import flax.linen as nn
import jax
import numpy as np
import pytest

from lm import config as config_lib
from lm import pipeline, sharding, steps
from tests.conftest import build_program, random_batch, tiny_config


def _loss_and_grads(shape, microbatches, accum=1, **model):
  config = tiny_config(n_layers=8, **model)
  config.model.pipeline_microbatches = microbatches
  config.train.update(batch_size=16, grad_accum_steps=accum)
  program = build_program(config, shape)
  state = program.init(jax.random.PRNGKey(0))
  batch = jax.device_put(random_batch(16, 16), program.batch_sharding)
  fn = jax.jit(lambda params, batch: steps.loss_and_grads(
      params, batch, jax.random.PRNGKey(0), program.model, accum))
  run = steps._in_mesh(fn, program.mesh, sharding.rules(config))
  return run(state.params, batch), state.params


@functools.cache
def _unpipelined(remat='none'):
  (loss, grads), _ = _loss_and_grads((1, 1, 1, 1), 1, remat=remat)
  return loss, grads


def _assert_same(result, reference):
  (loss, grads), (ref_loss, ref_grads) = result, reference
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6 * float(np.abs(r).max()))


@pytest.mark.parametrize('shape, microbatches', [
    ((1, 1, 1, 2), 1), ((1, 1, 1, 2), 4), ((1, 1, 1, 4), 2), ((1, 1, 1, 8), 8),
    ((2, 1, 2, 2), 1), ((2, 1, 2, 2), 4)])
def test_pipeline_matches_unpipelined(shape, microbatches):
  result, params = _loss_and_grads(shape, microbatches)
  _assert_same(result, _unpipelined())
  stages = shape[3]
  q = params['layers']['attn']['q']['kernel']        # layers x embed x heads x head_dim
  assert tuple(q.sharding.spec)[0] == 'stage'
  assert q.addressable_shards[0].data.shape[0] == 8 // stages   # each stage holds its layers


def test_pipeline_composes_with_remat_and_gradient_accumulation():
  result, _ = _loss_and_grads((1, 1, 1, 4), 2, accum=2, remat='full')
  _assert_same(result, _unpipelined('full'))


def test_pipeline_shifts_activations_between_stage_devices():
  config = tiny_config(n_layers=8)
  config.model.pipeline_microbatches = 2
  program = build_program(config, (1, 1, 1, 4))
  state = program.init(jax.random.PRNGKey(0))
  batch = jax.device_put(random_batch(8, 16), program.batch_sharding)
  with jax.set_mesh(program.mesh), nn.logical_axis_rules(sharding.rules(config)):
    hlo = program.train_step.__wrapped__.lower(state, batch).compile().as_text()
  assert 'collective-permute' in hlo


def test_bubble_fraction():
  assert pipeline.bubble_fraction(1, 8) == 0
  assert pipeline.bubble_fraction(4, 1) == 3 / 4
  assert pipeline.bubble_fraction(4, 13) == 3 / 16


@pytest.mark.parametrize('model, train, message', [
    ({'n_layers': 6}, {}, r'n_layers=6 is not divisible by the 4 pipeline stages'),
    ({'pipeline_microbatches': 3}, {}, r'does not split into .*pipeline_microbatches=3'),
    ({'pipeline_microbatches': 8}, {'batch_size': 8}, r'microbatches divisible by data x fsdp = 2'),
    ({'scan_layers': False}, {}, r'need config.model.scan_layers=True'),
])
def test_bad_pipeline_configs(model, train, message):
  config = tiny_config(n_layers=8)
  config.model.update(model)
  config.train.update(train)
  config.mesh.shape = (2, 1, 1, 4)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config_lib.resolve(config, None), 8)

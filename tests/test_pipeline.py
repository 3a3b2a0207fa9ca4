"""Pipeline stages give the loss and gradients of the unpipelined model."""
import dataclasses
import functools

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from lm import config as config_lib
from lm.model import pipeline
from lm.model import transformer as model_lib
from lm.parallel import sharding
from lm.training import steps
from tests.conftest import build_program, random_batch, tiny_config


def _loss_and_grads(shape, microbatches, accum=1, repeats=1, params=None, **model):
  config = tiny_config(n_layers=8, **model)
  config.model.update(pipeline_microbatches=microbatches, pipeline_repeats=repeats)
  config.train.update(batch_size=16, grad_accum_steps=accum)
  program = build_program(config, shape)
  params = program.init(jax.random.PRNGKey(0)).params if params is None else params
  batch = jax.device_put(random_batch(16, 16), program.batch_sharding)
  fn = jax.jit(lambda params, batch: steps.loss_and_grads(
      params, {}, batch, jax.random.PRNGKey(0), program.objective, accum)[:2])
  run = sharding.with_mesh(fn, program.mesh, sharding.rules(config))
  return run(params, batch), params


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


@pytest.mark.parametrize('shape, microbatches, repeats', [
    ((1, 1, 1, 2), 4, 2), ((1, 1, 1, 4), 4, 2), ((2, 1, 1, 2), 2, 4)])
def test_circular_pipeline_matches_the_plain_stack_in_logical_order(shape, microbatches,
                                                                    repeats):
  (loss, grads), params = _loss_and_grads(shape, microbatches, repeats=repeats)
  order = np.array(pipeline.logical_order(8, shape[3], repeats))
  in_order = lambda tree: {**tree, 'layers': jax.tree.map(lambda p: np.asarray(p)[order],
                                                          tree['layers'])}
  reference = _loss_and_grads((1, 1, 1, 1), 1, params=in_order(jax.device_get(params)))[0]
  _assert_same((loss, in_order(jax.device_get(grads))), reference)


def test_unpipelined_application_of_circular_layers_for_sampling():
  """pipeline_microbatches=0 applies a circular pipeline's layers in their logical order
  without pipelining (as sampling one sequence does)."""
  _, params = _loss_and_grads((1, 1, 1, 2), 2, repeats=2)
  config = build_program(tiny_config(n_layers=8), (1, 1, 1, 1)).model_config
  circular = dataclasses.replace(config, pipeline_stages=2, pipeline_repeats=2,
                                 pipeline_microbatches=0)
  tokens = random_batch(2, 16)['inputs']
  order = np.array(pipeline.logical_order(8, 2, 2))
  params = jax.device_get(params)
  in_order = {**params, 'layers': jax.tree.map(lambda p: p[order], params['layers'])}
  np.testing.assert_allclose(
      model_lib.Transformer(circular).apply({'params': params}, tokens),
      model_lib.Transformer(config).apply({'params': in_order}, tokens), rtol=1e-5, atol=1e-6)


def test_dropout_through_the_pipeline():
  """With dropout the masks of a pipelined step do not depend on how the data, tensor and
  stage axes are laid out; they are drawn (the loss differs from the dropout-free model's);
  and the gradients are those of that same masked loss (a central difference along them)."""
  (loss, grads), params = _loss_and_grads((1, 1, 1, 2), 2, dropout=0.1)
  _assert_same(_loss_and_grads((2, 1, 2, 2), 2, params=jax.device_get(params), dropout=0.1)[0],
               (loss, grads))
  _assert_same(_loss_and_grads((1, 1, 1, 2), 2, params=params, dropout=0.1, remat='full')[0],
               (loss, grads))
  assert abs(float(loss) - float(_unpipelined()[0])) > 1e-3

  config = tiny_config(n_layers=8, dropout=0.1)
  config.model.pipeline_microbatches = 2
  config.train.batch_size = 16
  program = build_program(config, (1, 1, 1, 2))
  batch = jax.device_put(random_batch(16, 16), program.batch_sharding)
  loss_at = program.in_mesh(jax.jit(lambda p: steps.loss_and_grads(
      p, {}, batch, jax.random.PRNGKey(0), program.objective, 1)[0]))
  norm = float(optax.tree.norm(grads))
  eps = 1e-3   # the loss curves fast: 1e-2 is 2% off even without dropout
  shifted = lambda sign: jax.tree.map(lambda p, g: p + sign * eps * g / norm, params, grads)
  slope = (float(loss_at(shifted(1))) - float(loss_at(shifted(-1)))) / (2 * eps)
  np.testing.assert_allclose(slope, norm, rtol=2e-3)   # measured: 5e-4


def test_logical_order():
  assert pipeline.logical_order(8, 4, 1) == list(range(8))
  # 2 stages x 2 repeats of 2 layers: chunks 0, 1, 2, 3 live at stored blocks 0, 2, 1, 3
  assert pipeline.logical_order(8, 2, 2) == [0, 1, 4, 5, 2, 3, 6, 7]


def test_pipeline_shifts_activations_between_stage_devices():
  config = tiny_config(n_layers=8)
  config.model.pipeline_microbatches = 2
  program = build_program(config, (1, 1, 1, 4))
  state = program.init(jax.random.PRNGKey(0))
  batch = jax.device_put(random_batch(8, 16), program.batch_sharding)
  with jax.set_mesh(program.mesh), nn.logical_axis_rules(sharding.rules(config)):
    hlo = program.jitted_train_step.__wrapped__.lower(
        state, batch, program.frozen).compile().as_text()
  assert 'collective-permute' in hlo


def test_bubble_fraction():
  assert pipeline.bubble_fraction(1, 8) == 0
  assert pipeline.bubble_fraction(4, 1) == 3 / 4
  assert pipeline.bubble_fraction(4, 13) == 3 / 16
  assert pipeline.bubble_fraction(4, 4, repeats=2) == 3 / 11


@pytest.mark.parametrize('model, train, message', [
    ({'n_layers': 6}, {}, r'n_layers=6 is not divisible by the 4 pipeline stages'),
    ({'pipeline_microbatches': 3}, {}, r'does not split into .*pipeline_microbatches=3'),
    ({'pipeline_microbatches': 8}, {'batch_size': 8}, r'microbatches divisible by data x fsdp = 2'),
    ({'scan_layers': False}, {}, r'need config.model.scan_layers=True'),
    ({'pipeline_repeats': 2, 'pipeline_microbatches': 2}, {},
     r'circular pipeline .* needs config.model.pipeline_microbatches=2 >= the 4 stages'),
    ({'pipeline_repeats': 3}, {}, r'n_layers=8 is not divisible by .*pipeline_repeats=3'),
])
def test_bad_pipeline_configs(model, train, message):
  config = tiny_config(n_layers=8)
  config.model.update(model)
  config.train.update(train)
  config.mesh.shape = (2, 1, 1, 4)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config_lib.resolve(config, None), 8)

"""Optimizer: schedules, weight-decay mask, gradient accumulation, non-finite skipping."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import config as config_lib
from lm import optim
from tests.conftest import build_program, random_batch, tiny_config


def _optim_config(**overrides):
  o = config_lib.get_base_config().optim
  o.update(dict(lr=1.0, min_lr=0.1, warmup_steps=10, decay_steps=110), **overrides)
  return o


def test_cosine_schedule_values():
  s = optim.make_schedule(_optim_config(schedule='cosine'))
  np.testing.assert_allclose([s(0), s(5), s(10), s(60), s(110), s(500)],
                             [0.0, 0.5, 1.0, 0.1 + 0.9 * 0.5, 0.1, 0.1], rtol=1e-6, atol=1e-7)


def test_wsd_schedule_values():
  s = optim.make_schedule(_optim_config(schedule='wsd', wsd_decay_fraction=0.2))
  # warm-up to step 10, constant to step 88 (= 110 * 0.8), linear to 0.1 at step 110
  np.testing.assert_allclose([s(5), s(10), s(50), s(88), s(99), s(110), s(200)],
                             [0.5, 1.0, 1.0, 1.0, 0.55, 0.1, 0.1], rtol=1e-6)


def test_constant_schedule_values():
  s = optim.make_schedule(_optim_config(schedule='constant'))
  np.testing.assert_allclose([s(0), s(5), s(10), s(1000)], [0.0, 0.5, 1.0, 1.0], rtol=1e-6)


def _params():
  return {'embed': {'embedding': jnp.ones((4, 2))}, 'pos_embed': jnp.ones((3, 2)),
          'layers': {'attn': {'q': {'kernel': jnp.ones((2, 2, 2)), 'bias': jnp.ones((2, 2))}},
                     'norm_attn': {'scale': jnp.ones((2, 2)), 'bias': jnp.ones((2, 2))}},
          'head': jnp.ones((4, 2))}


@pytest.mark.parametrize('decay_embeddings', [True, False])
def test_weight_decay_touches_exactly_the_masked_parameters(decay_embeddings):
  o = _optim_config(schedule='constant', warmup_steps=0, weight_decay=0.5, clip_norm=0.0,
                    decay_embeddings=decay_embeddings)
  tx, _ = optim.make_optimizer(o)
  params = _params()
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  changed = jax.tree_util.tree_flatten_with_path(
      jax.tree.map(lambda u: bool(jnp.any(u != 0)), updates))[0]
  changed = {jax.tree_util.keystr(p): c for p, c in changed}
  expected = {"['layers']['attn']['q']['kernel']": True,
              "['layers']['attn']['q']['bias']": False,
              "['layers']['norm_attn']['scale']": False,
              "['layers']['norm_attn']['bias']": False,
              "['embed']['embedding']": decay_embeddings,
              "['pos_embed']": decay_embeddings, "['head']": decay_embeddings}
  assert changed == expected
  # decoupled decay: update = -lr * weight_decay * param, with zero gradients
  np.testing.assert_allclose(updates['layers']['attn']['q']['kernel'], -0.5, rtol=1e-6)


@pytest.mark.parametrize('name', ['adamw', 'adam', 'adafactor', 'lion', 'sgd'])
def test_every_optimizer_trains(name):
  config = tiny_config()
  config.optim.name = name
  config.optim.lr = 3e-3
  program = build_program(config)
  state = program.init(jax.random.PRNGKey(0))
  batch = random_batch(config.train.batch_size, config.data.seq_len)
  losses = []
  for _ in range(8):
    state, metrics = program.train_step(state, batch)
    losses.append(float(metrics['loss']))
  assert np.isfinite(losses).all() and losses[-1] < losses[0], losses


def test_gradient_accumulation_equals_one_big_batch():
  big = tiny_config()
  big.train.batch_size = 32
  accum = tiny_config()
  accum.train.update(batch_size=32, grad_accum_steps=4)
  batch = random_batch(32, 16)
  results = []
  for config in (big, accum):
    program = build_program(config, (2, 2, 2, 1))
    state, metrics = program.train_step(program.init(jax.random.PRNGKey(0)),
                                        jax.device_put(batch, program.batch_sharding))
    results.append((state.params, jax.device_get(metrics)))
  (p_big, m_big), (p_acc, m_acc) = results
  np.testing.assert_allclose(m_acc['loss'], m_big['loss'], rtol=1e-6)
  np.testing.assert_allclose(m_acc['grad_norm'], m_big['grad_norm'], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p_acc, p_big)


def test_nonfinite_gradients_skip_the_update_and_training_continues():
  program = build_program(tiny_config())
  state = program.init(jax.random.PRNGKey(0))
  good = random_batch(8, 16)
  poisoned = {**good, 'weights': np.full((8, 16), np.nan, np.float32)}
  good['weights'] = np.ones((8, 16), np.float32)
  state, _ = program.train_step(state, good)   # the warm-up's first step has lr 0
  before = jax.tree.map(np.array, state.params)   # a copy: the state is donated
  state, metrics = program.train_step(state, poisoned)
  assert not np.isfinite(metrics['loss'])
  assert int(metrics['skipped_steps']) == 1 and int(metrics['nonfinite_streak']) == 1
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before)
  state, metrics = program.train_step(state, good)
  assert np.isfinite(metrics['loss'])
  assert int(metrics['skipped_steps']) == 1 and int(metrics['nonfinite_streak']) == 0
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), jax.device_get(state.params), before)
  assert all(jax.tree.leaves(changed))

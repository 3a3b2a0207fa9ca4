"""Training on a sharded mesh equals training on one device: gradients leaf by leaf, then the
parameters after several SGD and AdamW steps (tiny_config has no warm-up: every step moves)."""
import functools

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lm.training import steps
from tests.conftest import build_program, flat, loss_and_grads, random_batch, tiny_config

LLAMA = dict(positions='rope', norm='rmsnorm', mlp='swiglu', use_bias=False,
             tie_embeddings=False)
STYLES = {'gpt': {}, 'llama': dict(LLAMA, n_kv_heads=8),
          'gqa': dict(LLAMA, n_kv_heads=2),   # grouped-query: 8 query heads share 2 kv heads
          'mup': dict(LLAMA, n_kv_heads=8, parametrization='mup', mup_base_width=16)}
# every mesh axis for GPT-2, the tensor axis for Llama's layers (rope, rmsnorm, swiglu, untied
# head), and grouped-query attention on tensor and on all three axes at once
CASES = ([(shape, 'gpt') for shape in [(8, 1, 1, 1), (1, 8, 1, 1), (2, 2, 2, 1)]]
         + [((1, 1, 8, 1), 'llama'), ((1, 1, 2, 1), 'gqa'), ((2, 2, 2, 1), 'gqa'),
            ((2, 2, 2, 1), 'mup')])   # muP's multipliers (Llama's style, twice the base width)
# Measured over these cases (3 steps): SGD parameters agree to 4e-7 of the largest update of
# each leaf, AdamW to 1.8e-3, because Adam divides reduction-order noise in near-zero gradients
# by near-zero moments; both on top of float32 rounding of the parameter itself.
SGD_TOL, ADAMW_TOL = 2e-6, 5e-3


@functools.cache
def _single_device(style: str, optimizer: str):
  """Gradients, or (initial, final) parameters of 3 steps, on one device (shared by cases)."""
  config = _config(style, optimizer)
  if optimizer == 'none':
    return loss_and_grads(build_program(config), random_batch(8, config.data.seq_len))
  return _train(config, (1, 1, 1, 1))


def _config(style: str, optimizer: str):
  config = tiny_config(**STYLES[style])
  if optimizer == 'sgd':
    config.optim.update(name='sgd', lr=0.1, weight_decay=0.0)
  return config


def _train(config, shape, steps=3):
  """(initial, final) parameters after `steps` steps on different batches."""
  program = build_program(config, shape)
  state = program.init(jax.random.PRNGKey(0))
  initial = flat(state.params)
  for i in range(steps):
    batch = random_batch(config.train.batch_size, config.data.seq_len, seed=i)
    state, _ = program.train_step(state, jax.device_put(batch, program.batch_sharding))
  return initial, state.params


def _assert_same_updates(sharded, single, tol):
  (initial, params), (_, expected) = sharded, single
  params, expected = flat(params), flat(expected)
  for path in expected:
    update = np.abs(expected[path] - initial[path]).max()
    assert update > 0, f'{path} did not move: the test would compare nothing'
    allowed = tol * update + 2 * np.finfo(np.float32).eps * np.abs(expected[path])
    excess = np.abs(params[path] - expected[path]) - allowed
    assert excess.max() <= 0, (path, float(np.abs(params[path] - expected[path]).max()), update)


@pytest.mark.parametrize('shape, style', CASES)
def test_sharded_gradients_and_steps_match_single_device(shape, style):
  config = _config(style, 'none')
  loss_1, grads_1 = _single_device(style, 'none')
  loss_n, grads_n = loss_and_grads(build_program(config, shape),
                                   random_batch(8, config.data.seq_len))
  np.testing.assert_allclose(float(loss_n), float(loss_1), rtol=1e-6)
  grads_1, grads_n = flat(grads_1), flat(grads_n)
  for path, g in grads_1.items():   # fp32 reduction order: 6e-7 of the leaf's largest entry
    np.testing.assert_allclose(grads_n[path], g, rtol=1e-5, atol=2e-6 * np.abs(g).max(),
                               err_msg=path)

  if style != 'mup':   # muP scales the rates of Adam-like optimizers (it refuses SGD)
    _assert_same_updates(_train(_config(style, 'sgd'), shape), _single_device(style, 'sgd'),
                         SGD_TOL)
  if shape in ((1, 8, 1, 1), (2, 2, 2, 1)):   # moments sharded over fsdp (and tensor)
    _assert_same_updates(_train(_config(style, 'adamw'), shape), _single_device(style, 'adamw'),
                         ADAMW_TOL)


@pytest.mark.parametrize('shape', [(2, 2, 2, 1), (1, 1, 2, 1)])
def test_parameters_and_moments_are_sharded_by_their_logical_axes(shape):
  config = tiny_config(**STYLES['gqa'])
  program = build_program(config, shape)
  state = program.init(jax.random.PRNGKey(0))
  params = state.params
  data, fsdp, tensor, _ = shape
  q = params['layers']['attn']['q']['kernel']           # layers x embed x heads x head_dim
  kv = params['layers']['attn']['kv']['kernel']         # layers x embed x 2 x kv_heads x head_dim
  wi = params['layers']['mlp']['wi']['kernel']
  assert q.shape[0] == config.model.n_layers
  assert _spec(q) == P('stage', 'fsdp', 'tensor', None)   # 'stage' has size 1 here
  assert _spec(kv) == P('stage', 'fsdp', None, 'tensor', None)
  assert _spec(wi)[1] == 'fsdp' and _spec(wi)[-1] == 'tensor'
  assert _spec(params['embed']['embedding']) == P('tensor', 'fsdp')
  # every device holds 1 / (fsdp * tensor) of the q kernel, and of the kv heads
  assert q.addressable_shards[0].data.size == q.size // (fsdp * tensor)
  assert kv.addressable_shards[0].data.shape[3] == 2 // tensor
  # optimizer moments are sharded like the parameters
  mu = state.opt_state.inner_state[1][0].mu['layers']['attn']['q']['kernel']
  assert _spec(mu) == _spec(q)


def _spec(x):
  spec = tuple(x.sharding.spec)
  return P(*(spec + (None,) * (x.ndim - len(spec))))


@pytest.mark.parametrize('style', ['gpt', 'llama'])
def test_init_compiled_at_llvm_o1_equals_the_default_compile_bit_for_bit(style, monkeypatch):
  """On CPU a run's init (parameters and optimizer state, sharded) compiles at LLVM -O1, which
  is faster (steps.run_once_options): it must give the bits of the default -O3 compile."""
  jax.config.update('jax_disable_most_optimizations', False)   # as a run compiles
  config = tiny_config(**STYLES[style], d_model=64, d_ff=256)
  jit, options = jax.jit, {}
  monkeypatch.setattr(jax, 'jit', lambda fun, **kw: (
      options.setdefault(getattr(fun, '__name__', ''), kw.get('compiler_options')),
      jit(fun, **kw))[1])
  program = build_program(config, (2, 2, 2, 1))
  assert options['init'] == options['init_frozen'] == {'xla_backend_optimization_level': 1}
  monkeypatch.setattr(steps, 'run_once_options', lambda mesh: None)
  default = build_program(config, (2, 2, 2, 1))
  for seed in (0, 1337):
    fast, slow = program.init(jax.random.PRNGKey(seed)), default.init(jax.random.PRNGKey(seed))
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(slow), strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

"""Optimizer: schedules, weight-decay mask, gradient accumulation, non-finite skipping."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lm import config as config_lib
from lm.parallel import tpus
from lm.planning import plan
from lm.training import loop as train
from lm.training import optim
from tests.conftest import build_program, flat, loss_and_grads, random_batch, tiny_config
from tests.test_train import Recorder


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
@pytest.mark.parametrize('name', ['adamw', 'lion', 'sgd', 'adafactor'])
def test_weight_decay_is_decoupled_and_touches_exactly_the_masked_parameters(name,
                                                                            decay_embeddings):
  """With zero gradients an update is the decay alone: -lr * weight_decay * param, on the
  masked parameters only (Adafactor's too: optax adds its decay after the lr scaling)."""
  o = _optim_config(name=name, schedule='constant', lr=0.3, warmup_steps=0, weight_decay=0.5,
                    clip_norm=0.0, decay_embeddings=decay_embeddings)
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
  np.testing.assert_allclose(updates['layers']['attn']['q']['kernel'], -0.3 * 0.5, rtol=1e-6)


def test_adafactor_decay_follows_the_schedule():
  o = _optim_config(name='adafactor', schedule='cosine', weight_decay=0.5, clip_norm=0.0)
  tx, schedule = optim.make_optimizer(o)
  params = {'kernel': jnp.ones((4, 4))}
  state = tx.init(params)
  for step in range(12):
    updates, state = tx.update({'kernel': jnp.zeros((4, 4))}, state, params)
    np.testing.assert_allclose(updates['kernel'], -0.5 * schedule(step), rtol=1e-6, atol=1e-12)


def test_adam_with_weight_decay_points_at_adamw():
  config = tiny_config()
  config.optim.update(name='adam', weight_decay=0.1)
  with pytest.raises(config_lib.ConfigError, match="name='adamw'"):
    config_lib.validate(config_lib.resolve(config, None), 1)


@pytest.mark.parametrize('style', ['gpt', 'llama'])
@pytest.mark.parametrize('decay_embeddings', [True, False])
def test_weight_decay_mask_of_the_real_model(style, decay_embeddings):
  model = {} if style == 'gpt' else dict(positions='rope', norm='rmsnorm', mlp='swiglu',
                                         use_bias=False, tie_embeddings=False)
  params = build_program(tiny_config(**model)).abstract_state.params
  mask = optim.weight_decay_mask(params, decay_embeddings)
  decayed = sorted(jax.tree_util.keystr(p, simple=True, separator='/')
                   for p, d in jax.tree_util.tree_flatten_with_path(mask)[0] if d)
  kernels = ['layers/attn/kv/kernel', 'layers/attn/o/kernel', 'layers/attn/q/kernel',
             'layers/mlp/wi/kernel', 'layers/mlp/wo/kernel']
  tables = (['embed/embedding', 'pos_embed'] if style == 'gpt' else
            ['embed/embedding', 'head'])
  assert decayed == sorted(kernels + (tables if decay_embeddings else []))


@pytest.mark.parametrize('dropout', [0.0, 0.1])
def test_gradient_accumulation_equals_one_big_batch(dropout):
  """4 microbatches of 8 give the loss and gradients of one batch of 32 (leaf by leaf), and so
  the same SGD step, on 8 devices. With dropout the microbatches draw other masks than one
  batch would: accumulation on 8 devices then equals accumulation on one."""
  batch = random_batch(32, 16)
  results = []
  reference = (1, (2, 2, 2, 1)) if dropout == 0 else (4, (1, 1, 1, 1))
  for accum, shape in ((4, (2, 2, 2, 1)), reference):
    config = tiny_config(dropout=dropout)
    config.train.update(batch_size=32, grad_accum_steps=accum)
    config.optim.update(name='sgd', lr=0.1, weight_decay=0.0)
    program = build_program(config, shape)
    loss, grads = loss_and_grads(program, batch, accum_steps=accum)
    state, _ = program.train_step(program.init(jax.random.PRNGKey(0)),
                                  jax.device_put(batch, program.batch_sharding))
    results.append((float(loss), flat(grads), flat(state.params)))
  (loss, grads, params), (ref_loss, ref_grads, ref_params) = results
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  for path, g in ref_grads.items():
    np.testing.assert_allclose(grads[path], g, rtol=1e-5, atol=2e-6 * np.abs(g).max(),
                               err_msg=path)
    np.testing.assert_allclose(params[path], ref_params[path], rtol=1e-6, atol=1e-7,
                               err_msg=path)
  if dropout:   # the masks are drawn: the gradients are not the dropout-free model's
    no_dropout = tiny_config()
    no_dropout.train.batch_size = 32
    plain = flat(loss_and_grads(build_program(no_dropout), batch)[1])
    kernel = "['layers']['mlp']['wo']['kernel']"
    assert np.abs(grads[kernel] - plain[kernel]).max() > 0.1 * np.abs(plain[kernel]).max()


def test_each_accumulated_microbatch_draws_its_own_dropout_key():
  """Microbatch i (rows i, i + k, ...) drops out with fold_in(rng, i): accumulation equals the
  mean of the microbatches run alone with those keys, and not one key shared by all (which
  would drop the same units in every microbatch)."""
  batch, rng = random_batch(16, 16), jax.random.PRNGKey(7)
  def run(batch_size, accum, batch, rng):
    config = tiny_config(dropout=0.3)
    config.train.update(batch_size=batch_size, grad_accum_steps=accum)
    loss, grads = loss_and_grads(build_program(config), batch, accum_steps=accum, rng=rng)
    return float(loss), flat(grads)
  loss, grads = run(16, 2, batch, rng)
  alone = [run(8, 1, {k: v[i::2] for k, v in batch.items()}, jax.random.fold_in(rng, i))
           for i in range(2)]
  np.testing.assert_allclose(loss, np.mean([l for l, _ in alone]), rtol=1e-6)
  for path in grads:
    np.testing.assert_allclose(grads[path], np.mean([g[path] for _, g in alone], axis=0),
                               rtol=1e-5, atol=1e-7, err_msg=path)
  shared = [run(8, 1, {k: v[i::2] for k, v in batch.items()}, rng)[0] for i in range(2)]
  assert abs(loss - np.mean(shared)) > 1e-3


def test_nonfinite_gradients_skip_the_update_and_training_continues():
  config = tiny_config()
  config.optim.warmup_steps = 10   # a rising learning rate: the logged one must be the applied one
  program = build_program(config)
  state = program.init(jax.random.PRNGKey(0))
  good = random_batch(8, 16)
  poisoned = {**good, 'weights': np.full((8, 16), np.nan, np.float32)}
  good['weights'] = np.ones((8, 16), np.float32)
  state, first = program.train_step(state, good)
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
  # the schedule counts applied updates: the third step applied the second update's rate
  np.testing.assert_allclose([first['lr'], metrics['lr']],
                             [program.schedule(0), program.schedule(1)], rtol=1e-6)
  assert float(program.schedule(1)) > 0


def test_nonfinite_streak_of_the_real_optimizer_stops_the_run():
  """K poisoned batches in a row through the real step and logger end the run."""
  config = config_lib.resolve(tiny_config(), 64)
  program = build_program(tiny_config())
  logger = train.Logger(config, program, Recorder(), Recorder(), 0)
  state = program.init(jax.random.PRNGKey(0))
  batch = {**random_batch(8, 16), 'weights': np.full((8, 16), np.inf, np.float32)}
  limit = config.optim.max_nonfinite_steps
  with pytest.raises(train.NonFiniteError, match=f'{limit} updates in a row had non-finite'):
    for step in range(1, limit + 2):   # step n's metrics are checked when step n + 1 is pushed
      state, metrics = program.train_step(state, batch)
      logger.push(step, metrics)
  assert step == limit + 1


@pytest.mark.parametrize('branch', [False, True])
def test_skip_nonfinite_equals_optax_apply_if_finite(branch):
  """Both forms of the wrapper against optax's, step by step, through skipped, applied and
  (past max_consecutive_errors) given-up-on non-finite gradients."""
  inner = optax.chain(optax.clip_by_global_norm(0.5),
                      optax.adamw(0.1, weight_decay=0.1, mask=lambda p: optim.weight_decay_mask(
                          p, decay_embeddings=False)))
  ours, reference = optim.skip_nonfinite(inner, 2, branch), optax.apply_if_finite(inner, 2)
  params = _params()
  states = [ours.init(params), reference.init(params)]
  steps = [jax.jit(ours.update), jax.jit(reference.update)]
  rng = np.random.default_rng(0)
  for bad in (None, np.nan, None, np.inf, np.nan, -np.inf, None):   # the 6th is applied
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    if bad is not None:
      grads['layers']['attn']['q']['kernel'] = grads['layers']['attn']['q']['kernel'].at[
          0, 1, 0].set(bad)
    results = [step(grads, state, params) for step, state in zip(steps, states)]
    (updates, state), (ref_updates, ref_state) = results
    # two programs, fused differently: floats may differ in their last bits (updates are
    # about lr = 0.1 in size: 1e-7 is a millionth of one)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    jax.tree.map(close, updates, ref_updates)
    jax.tree.map(close, state, ref_state)
    states = [state, ref_state]
  assert int(state.total_notfinite) == 4 and int(state.inner_state[1][0].count) == 4


def _lowered_train_step(devices) -> str:
  config = config_lib.resolve(tiny_config(), 64)
  config.mesh.shape = (len(devices), 1, 1, 1)
  return plan.lower_train_step(plan.program_on(config, devices), config).as_text()


def test_the_skip_is_a_select_on_tpu_and_a_branch_on_cpu():
  """On a TPU mesh the non-finite skip is a select, so XLA can fuse the update into
  apply_updates; on a CPU mesh it is a lax.cond (see optim.skip_nonfinite), and there are no
  per-leaf isfinite reductions on either (the global norm tells)."""
  tpu = _lowered_train_step(tpus.parse('v5e:2x2').devices())
  cpu = _lowered_train_step(jax.devices()[:4])
  assert 'stablehlo.case' not in tpu and 'stablehlo.if' not in tpu
  assert 'stablehlo.case' in cpu
  for text in (tpu, cpu):
    assert 'stablehlo.is_finite' in text
    # the global norm's and log-sum-exp's (an isfinite of each leaf would add one per leaf)
    assert text.count('stablehlo.is_finite') <= 2, text.count('stablehlo.is_finite')

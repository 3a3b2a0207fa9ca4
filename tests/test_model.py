"""The transformer: parameter counts, attention kernels, scan / remat equivalences."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import config as config_lib
from lm import objectives
from lm.model import attention
from lm.model import transformer as model_lib
from lm.training import steps
from tests.conftest import tiny_config

LLAMA = dict(positions='rope', norm='rmsnorm', mlp='swiglu', use_bias=False,
             tie_embeddings=False, n_kv_heads=2)


def _model(**overrides):
  config = config_lib.resolve(tiny_config(**overrides), None)
  return model_lib.Transformer(model_lib.ModelConfig.from_config(config.model)), config


def _tokens(shape=(2, 16), seed=0):
  return jax.random.randint(jax.random.PRNGKey(seed), shape, 0, 64)


@pytest.mark.parametrize('overrides', [{}, LLAMA, dict(use_bias=False, tie_embeddings=False),
                                       dict(LLAMA, lowrank_rank=3, lowrank_targets='q|o|wi')])
def test_param_counts_match_initialised_model(overrides):
  model, _ = _model(**overrides)
  params = nn.unbox(model.init(jax.random.PRNGKey(0), _tokens())['params'])
  total = sum(x.size for x in jax.tree.leaves(params))
  counts = model.cfg.param_counts()
  assert counts['total'] == total
  tables = params['embed']['embedding'].size + params.get('pos_embed', np.zeros(0)).size
  tables += params.get('head', np.zeros(0)).size
  assert counts['non_embedding'] == total - tables


def test_flops_per_token_follows_palm_convention():
  cfg = model_lib.ModelConfig(vocab_size=65, n_layers=4, d_model=128, n_heads=4, n_kv_heads=4,
                              d_ff=512, max_len=64)
  n = cfg.param_counts()['non_embedding'] + 65 * 128
  assert cfg.flops_per_token(64) == 6 * n + 12 * 4 * 128 * 64


@pytest.mark.parametrize('causal', [True, False])
@pytest.mark.parametrize('kv_heads', [4, 2, 1])
@pytest.mark.parametrize('implementation', ['xla', 'xla_bf16'])
def test_xla_attention_matches_reference(causal, kv_heads, implementation):
  keys = jax.random.split(jax.random.PRNGKey(1), 3)
  q = jax.random.normal(keys[0], (2, 16, 4, 8))
  k = jax.random.normal(keys[1], (2, 16, kv_heads, 8))
  v = jax.random.normal(keys[2], (2, 16, kv_heads, 8))
  fn = lambda q, k, v: attention.attention(q, k, v, causal=causal,
                                           implementation=implementation)
  ref = lambda q, k, v: attention.reference_attention(q, k, v, causal)
  np.testing.assert_allclose(fn(q, k, v), ref(q, k, v), rtol=1e-5, atol=1e-5)
  loss = lambda f: lambda *a: (f(*a) * jnp.arange(8.0)).sum()
  for ours, theirs in zip(jax.grad(loss(fn), (0, 1, 2))(q, k, v),
                          jax.grad(loss(ref), (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('kv_heads', [4, 1])
def test_compute_dtype_attention_keeps_scores_in_bf16_and_stays_close(kv_heads):
  """'xla_bf16' with bf16 inputs: its L x M matrix products, forward and backward, are bf16
  (the bytes it saves; jax.nn.dot_product_attention's scores are float32), and its values
  and gradients within bf16 rounding of the float32 reference on the same (rounded) inputs,
  as jax.nn.dot_product_attention's are."""
  L = 64
  q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(kv_heads, length=L))
  loss = lambda f: lambda *a: (f(*a).astype(jnp.float32) * jnp.arange(8.0)).sum()
  ours = lambda q, k, v: attention.attention(q, k, v, causal=True, implementation='xla_bf16')
  xla = lambda q, k, v: attention.attention(q, k, v, causal=True, implementation='xla')
  f32 = lambda x: x.astype(jnp.float32)
  ref = lambda q, k, v: attention.reference_attention(f32(q), f32(k), f32(v), True)
  products = lambda jaxpr: [var.aval.dtype for eqn in jaxpr.eqns for var in eqn.outvars
                            if eqn.primitive.name == 'dot_general' and
                            var.aval.shape.count(L) == 2]   # what the TPU writes to HBM
  for fn, dtype in ((ours, jnp.bfloat16), (xla, jnp.float32)):
    dtypes = products(jax.make_jaxpr(jax.grad(loss(fn), (0, 1, 2)))(q, k, v).jaxpr)
    assert len(dtypes) == 2 and dtype in dtypes   # scores, and the backward's probabilities
    assert dtype == jnp.float32 or set(dtypes) == {jnp.dtype(dtype)}
  for fn in (ours, xla):
    np.testing.assert_allclose(f32(fn(q, k, v)), ref(q, k, v), atol=0.03)
    grads = lambda f: jax.grad(loss(f), (0, 1, 2))(q, k, v)
    for a, b in zip(grads(fn), grads(ref)):
      np.testing.assert_allclose(f32(a), b, atol=0.15, rtol=0.05)


def _qkv(kv_heads=2, length=16):
  keys = jax.random.split(jax.random.PRNGKey(1), 3)
  return (jax.random.normal(keys[0], (2, length, 4, 8)),
          *(jax.random.normal(key, (2, length, kv_heads, 8)) for key in keys[1:]))


@pytest.mark.parametrize('window', [1, 5])
@pytest.mark.parametrize('implementation', ['xla', 'xla_bf16', 'reference-mask',
                                            'xla_bf16-mask'])
def test_sliding_window_matches_reference_values_and_gradients(window, implementation):
  """Each way of applying a window (XLA's local_window_size; an explicit mask, as with packed
  segments or the cache) against the reference's own window, and a NumPy mask."""
  q, k, v = _qkv()
  L = q.shape[1]
  offsets = np.arange(L)[:, None] - np.arange(L)[None, :]
  numpy_mask = jnp.asarray((offsets >= 0) & (offsets < window))[None].repeat(2, 0)
  kernel, _, masked = implementation.partition('-')
  fn = lambda q, k, v: attention.attention(q, k, v, causal=True, implementation=kernel,
                                           mask=numpy_mask if masked else None, window=window)
  ref = lambda q, k, v: attention.reference_attention(q, k, v, True, window=window)
  np.testing.assert_allclose(fn(q, k, v), ref(q, k, v), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ref(q, k, v), attention.reference_attention(q, k, v, True,
                                                                         numpy_mask), atol=1e-6)
  loss = lambda f: lambda *a: (f(*a) * jnp.arange(8.0)).sum()
  for ours, theirs in zip(jax.grad(loss(fn), (0, 1, 2))(q, k, v),
                          jax.grad(loss(ref), (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('implementation', ['xla', 'xla_bf16', 'reference'])
def test_window_covering_the_sequence_is_causal_and_keys_outside_get_no_gradient(
    implementation):
  q, k, v = _qkv()
  full = attention.attention(q, k, v, causal=True, implementation=implementation)
  covering = attention.attention(q, k, v, causal=True, implementation=implementation,
                                 window=16)
  np.testing.assert_allclose(covering, full, rtol=1e-6, atol=1e-6)
  query, window = 11, 4   # sees keys 8 .. 11
  out_of = lambda k, v: attention.attention(q, k, v, causal=True, implementation=implementation,
                                            window=window)[:, query].sum()
  grad_k, grad_v = jax.grad(out_of, (0, 1))(k, v)
  for grad in (grad_k, grad_v):
    assert np.all(np.asarray(grad[:, :query - window + 1]) == 0.0)    # exactly zero
    assert np.all(np.asarray(grad[:, query + 1:]) == 0.0)
    assert np.abs(np.asarray(grad[:, query - window + 1:query + 1])).min() > 0


@pytest.mark.parametrize('causal,window,kv_heads', [(True, None, 2), (False, None, 4),
                                                     (True, 5, 2), (True, 128, 1)])
def test_splash_matches_reference_values_and_gradients(causal, window, kv_heads):
  """Pallas splash attention (interpret mode off TPU; its blocks need 128 positions)."""
  q, k, v = _qkv(kv_heads, length=128)
  fn = lambda q, k, v: attention.attention(q, k, v, causal=causal, implementation='splash',
                                           window=window)
  ref = lambda q, k, v: attention.reference_attention(q, k, v, causal, window=window)
  np.testing.assert_allclose(fn(q, k, v), ref(q, k, v), rtol=1e-5, atol=1e-5)
  if window == 128:   # a window covering the sequence is causal attention
    np.testing.assert_allclose(fn(q, k, v), attention.reference_attention(q, k, v, True),
                               rtol=1e-5, atol=1e-5)
  loss = lambda f: lambda *a: (f(*a) * jnp.arange(8.0)).sum()
  for ours, theirs in zip(jax.grad(loss(fn), (0, 1, 2))(q, k, v),
                          jax.grad(loss(ref), (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
  if window == 5:   # keys outside the window: exactly zero gradient
    query = 40
    grad_k = jax.grad(lambda k: fn(q, k, v)[:, query].sum())(k)
    assert np.all(np.asarray(grad_k[:, :query - 4]) == 0.0)
    assert np.all(np.asarray(grad_k[:, query + 1:]) == 0.0)
    assert np.abs(np.asarray(grad_k[:, query - 4:query + 1])).min() > 0


@pytest.mark.parametrize('kv_heads', [4, 8])
def test_splash_model_sharded_equals_reference_on_one_device(kv_heads):
  """attention='splash' runs per shard (shard_map over batch and heads) on fsdp 2 x tensor 4:
  8 query heads, with 4 key heads (one per shard, shared by its 2 query heads inside the
  kernel) or 8."""
  from tests.conftest import build_program, loss_and_grads, random_batch
  batch = random_batch(8, 128)
  results = {}
  for implementation, shape in (('reference', (1, 1, 1, 1)), ('splash', (1, 2, 4, 1))):
    config = tiny_config(attention=implementation, n_kv_heads=kv_heads)
    config.data.seq_len = 128
    results[implementation] = loss_and_grads(build_program(config, shape), batch)
  np.testing.assert_allclose(results['splash'][0], results['reference'][0], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(results['splash'][1]), jax.tree.leaves(results['reference'][1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_save_attention_remat_with_splash_equals_no_remat():
  """remat='save_attention' keeps q, k, v and splash's output and log-sum-exp for the backward
  pass (one kernel fewer: tests/test_tpu_compile.py) and recomputes the rest: the gradients
  stay."""
  from tests.conftest import build_program, loss_and_grads, random_batch
  batch = random_batch(4, 128)
  results = {}
  for remat in ('none', 'save_attention'):
    config = tiny_config(attention='splash', remat=remat)
    config.data.seq_len = 128
    results[remat] = loss_and_grads(build_program(config, (1, 1, 1, 1)), batch)
  np.testing.assert_allclose(results['save_attention'][0], results['none'][0], rtol=1e-6)
  for a, b in zip(*(jax.tree.leaves(results[r][1]) for r in ('save_attention', 'none'))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_windowed_model_with_segments_equals_the_fast_path():
  """The model's two window paths: the mask built with packed segments, and the kernel's
  local window when there are none."""
  model, _ = _model(attention_window=3, **LLAMA)
  tokens = _tokens()
  params = model.init(jax.random.PRNGKey(0), tokens)['params']
  apply = jax.jit(lambda t, s: model.apply({'params': params}, t, segments=s))
  plain = jax.jit(lambda t: model.apply({'params': params}, t))(tokens)
  np.testing.assert_allclose(apply(tokens, jnp.ones_like(tokens)), plain, rtol=1e-5, atol=1e-5)
  unwindowed, _ = _model(**LLAMA)
  assert not np.allclose(unwindowed.apply({'params': params}, tokens), plain, atol=1e-3)


def test_alternating_local_and_global_layers():
  """Every second layer global (Gemma-2 style): scanned layers (the flag a scanned input,
  lax.cond between the kernels) equal unrolled ones; one segment's mask path equals the
  plain path; every layer global is full attention and none global is all windowed."""
  style = dict(LLAMA, attention_window=3, n_layers=4)
  tokens = _tokens()
  outputs = {}
  for name, overrides in (('alternating', dict(attention_global_every=2)),
                          ('all global', dict(attention_global_every=1)),
                          ('none global', dict(attention_global_every=5)),
                          ('windowed', {}), ('full', dict(attention_window=None))):
    model, config = _model(**{**style, **overrides})
    params = nn.unbox(model.init(jax.random.PRNGKey(0), tokens)['params'])
    outputs[name] = np.asarray(jax.jit(model.apply)({'params': params}, tokens))
    if name == 'alternating':
      with_segments = jax.jit(lambda p, t, model=model: model.apply({'params': p}, t,
                                                       segments=jnp.ones_like(t)))
      np.testing.assert_allclose(with_segments(params, tokens), outputs[name], rtol=1e-5,
                                 atol=1e-5)
      unrolled_model, _ = _model(**{**style, **overrides, 'scan_layers': False})
      unrolled = jax.jit(unrolled_model.apply)(
          {'params': _unstack(params, config.model.n_layers)}, tokens)
      np.testing.assert_allclose(unrolled, outputs[name], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(outputs['all global'], outputs['full'], rtol=1e-6)
  np.testing.assert_allclose(outputs['none global'], outputs['windowed'], rtol=1e-6)
  for other in ('full', 'windowed'):
    assert np.abs(outputs['alternating'] - outputs[other]).max() > 1e-3, other


def test_reference_attention_against_numpy():
  """An independent NumPy softmax attention for one head."""
  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal((1, 5, 1, 4)).astype(np.float32) for _ in range(3))
  scores = q[0, :, 0] @ k[0, :, 0].T / 2.0
  scores = np.where(np.tril(np.ones((5, 5), bool)), scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  np.testing.assert_allclose(attention.reference_attention(q, k, v, True)[0, :, 0],
                             probs @ v[0, :, 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('causal', [True, False])
def test_causal_mask_hides_the_future(causal):
  model, _ = _model(causal=causal)
  tokens = _tokens()
  params = model.init(jax.random.PRNGKey(0), tokens)['params']
  changed = tokens.at[:, -1].set((tokens[:, -1] + 1) % 64)
  apply = jax.jit(lambda t: model.apply({'params': params}, t))
  a, b = apply(tokens), apply(changed)
  first_positions_equal = np.allclose(a[:, :-1], b[:, :-1], atol=1e-6)
  assert first_positions_equal == causal


def _loss_and_grads(overrides, params, tokens):
  model, _ = _model(**overrides)
  batch = {'inputs': tokens, 'targets': jnp.roll(tokens, -1, axis=1)}
  objective = objectives.pretrain.next_token(model)
  return jax.jit(lambda p, b: steps.loss_and_grads(p, {}, b, jax.random.PRNGKey(0), objective,
                                                   1)[:2])(params, batch)


def _unstack(scanned, n_layers):
  params = {k: v for k, v in scanned.items() if k != 'layers'}
  for i in range(n_layers):
    params[f'layers_{i}'] = jax.tree.map(lambda x, i=i: x[i], scanned['layers'])
  return params


@pytest.mark.parametrize('style', [{}, LLAMA])
def test_scan_equals_unrolled_and_remat_equals_plain(style):
  model, config = _model(**style)
  tokens = _tokens()
  scanned = nn.unbox(model.init(jax.random.PRNGKey(0), tokens)['params'])
  loss, grads = _loss_and_grads(style, scanned, tokens)
  for remat in ('full', 'dots', 'dots_no_batch', 'save_attention'):
    loss_r, grads_r = _loss_and_grads({**style, 'remat': remat}, scanned, tokens)
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 grads_r, grads)
  unrolled = _unstack(scanned, config.model.n_layers)
  for remat in ('none', 'full'):
    loss_u, grads_u = _loss_and_grads({**style, 'scan_layers': False, 'remat': remat},
                                      unrolled, tokens)
    np.testing.assert_allclose(loss_u, loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 grads_u, _unstack(grads, config.model.n_layers))


def test_rope_is_relative():
  """Rotary embeddings make q.k depend only on the distance between positions."""
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 1, 1, 8))
  y = jax.random.normal(jax.random.PRNGKey(1), (1, 1, 1, 8))
  positions = jnp.arange(12)[None]
  def score(i, j):
    q = model_lib.rotary(jnp.tile(x, (1, 12, 1, 1)), positions, 10000.0)[0, i, 0]
    k = model_lib.rotary(jnp.tile(y, (1, 12, 1, 1)), positions, 10000.0)[0, j, 0]
    return float(q @ k)
  np.testing.assert_allclose(score(3, 1), score(10, 8), rtol=1e-5)
  assert abs(score(3, 1) - score(3, 2)) > 1e-4

"""Post-training objectives against NumPy statements of their formulas: SFT masking and
packing, the reward model's Bradley-Terry loss, DPO, GRPO / PPO (policy, KL, value, GAE), and
LoRA (identity at init, merging, sharding)."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import config as config_lib
from lm import objectives
from lm.config import ConfigError
from lm.data import examples as post_data
from lm.data import tokenizers
from lm.model import lora as peft
from lm.model import transformer as model_lib
from lm.objectives import dpo, reward
from lm.training import rollouts as rl
from tests.conftest import assert_trees_close, build_program, flat, random_batch, tiny_config

LLAMA = dict(positions='rope', norm='rmsnorm', mlp='swiglu', use_bias=False,
             tie_embeddings=False, n_kv_heads=2)


def _model(scalar_head=False, **overrides):
  config = config_lib.resolve(tiny_config(**overrides), None)
  cfg = dataclasses.replace(model_lib.ModelConfig.from_config(config.model),
                            scalar_head=scalar_head)
  return model_lib.Transformer(cfg)


_JITTED = {}


def _apply(model, variables, tokens, **kwargs):
  """model.apply, jitted once per model (eager Flax is slow on CPU)."""
  if id(model) not in _JITTED:
    _JITTED[id(model)] = (model, jax.jit(model.apply, static_argnames=('scores',)))
  return _JITTED[id(model)][1](variables, tokens, **kwargs)


def _params(model, seed=0, scale=4.0):
  """Parameters larger than init, so that logits differ clearly between positions."""
  variables = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(seed),
                                            jnp.zeros((1, 8), jnp.int32)))
  return jax.tree.map(lambda x: x * scale + 0.01 * seed, variables['params'])


def _log_softmax(logits):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _token_logps(model, params, tokens):
  """NumPy log p(tokens[:, j] | tokens[:, :j]), j = 1 .. T-1, from the model's logits."""
  logp_all = _log_softmax(_apply(model, {'params': params}, tokens))[:, :-1]
  return np.take_along_axis(logp_all, np.asarray(tokens)[:, 1:, None], -1)[..., 0]


# --- SFT ----------------------------------------------------------------------------------

def _sft_rows(examples, seq_len=12, pack=True):
  truncation = post_data.Truncation('error', seq_len + 1, 'train')
  return post_data.sft_rows(tokenizers.ByteTokenizer(), examples, seq_len, pack, truncation)


def test_sft_rows_weight_the_response_and_pack_examples_apart():
  rows = _sft_rows([{'prompt': 'ab', 'response': 'cd'}, {'prompt': 'x', 'response': 'yz'}])
  a, b, c, d, x, y, z, eos = [ord(ch) for ch in 'abcdxyz'] + [256]
  np.testing.assert_array_equal(rows['inputs'][0, :8], [a, b, c, d, x, y, z, 0])
  np.testing.assert_array_equal(rows['targets'][0, :7], [b, c, d, eos, y, z, eos])
  np.testing.assert_array_equal(rows['weights'][0, :8], [0, 1, 1, 1, 1, 1, 1, 0])  # 'x' predicts y
  np.testing.assert_array_equal(rows['segments'][0, :8], [1, 1, 1, 1, 2, 2, 2, 0])
  np.testing.assert_array_equal(rows['positions'][0, :7], [0, 1, 2, 3, 0, 1, 2])
  chat = post_data.pieces({'messages': [{'role': 'user', 'content': 'hi'},
                                        {'role': 'assistant', 'content': 'yo'}]})
  assert chat == [('user: ', False), ('hi\n', False), ('assistant: ', False), ('yo\n', True)]


def test_sft_loss_is_the_masked_mean_and_prompt_targets_count_for_nothing():
  model = _model(vocab_size=260)
  params = _params(model)
  rows = _sft_rows([{'prompt': 'abc', 'response': 'de'}, {'prompt': 'q', 'response': 'rst'}],
                   seq_len=8, pack=False)
  objective = objectives.pretrain.next_token(model)
  total, count, _ = objective(params, {}, rows, None, False)
  logits = _apply(model, {'params': params}, rows['inputs'], positions=rows['positions'],
                       segments=rows['segments'])
  nll = -np.take_along_axis(_log_softmax(logits), rows['targets'][..., None], -1)[..., 0]
  w = rows['weights']
  assert w.sum() == 3 + 4   # 'de' + EOS and 'rst' + EOS
  np.testing.assert_allclose(float(total / count), (nll * w).sum() / w.sum(), rtol=1e-6)

  # other targets where the weight is 0 (prompt and padding): loss and gradient unchanged
  loss_and_grad = jax.jit(jax.value_and_grad(lambda p, b: objective(p, {}, b, None, False)[0]))
  perturbed = dict(rows, targets=np.where(w > 0, rows['targets'], (rows['targets'] + 7) % 256))
  assert (perturbed['targets'] != rows['targets']).any()
  (l0, g0), (l1, g1) = loss_and_grad(params, rows), loss_and_grad(params, perturbed)
  assert float(l0) == float(l1)
  for path, g in flat(g0).items():
    np.testing.assert_array_equal(flat(g1)[path], g, err_msg=path)


@pytest.mark.parametrize('overrides', [{}, LLAMA])
def test_packed_examples_do_not_attend_to_each_other(overrides):
  model = _model(vocab_size=260, **overrides)
  params = _params(model)
  first, second = {'prompt': 'abc', 'response': 'de'}, {'prompt': 'fg', 'response': 'hij'}
  packed = _sft_rows([first, second])
  alone = _sft_rows([second])
  logits = lambda r: np.asarray(_apply(model, {'params': params}, r['inputs'],
                                            positions=r['positions'], segments=r['segments']))
  n = int((alone['segments'][0] > 0).sum())
  start = int((packed['segments'][0] == 1).sum())
  np.testing.assert_allclose(logits(packed)[0, start:start + n], logits(alone)[0, :n],
                             rtol=1e-5, atol=1e-5)


# --- reward model and DPO ------------------------------------------------------------------

def _preference_batch(T=10, seed=0):
  """Two pairs (chosen, rejected) of random sequences; responses from position 4 to each
  sequence's length."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 64, (2, 2, T)).astype(np.int32)
  lengths = np.array([[10, 7], [8, 9]], np.int32)
  positions = np.arange(T)
  weights = ((positions >= 4) & (positions < lengths[..., None])).astype(np.float32)
  tokens = np.where(positions < lengths[..., None], tokens, 0)
  return {'tokens': tokens, 'weights': weights, 'lengths': lengths,
          'mask': np.ones(2, np.float32)}


def test_bradley_terry_reads_the_last_real_token():
  model = _model(scalar_head=True)
  params = _params(model)
  params['score_head'] = jax.random.normal(jax.random.PRNGKey(1), params['score_head'].shape)
  batch = _preference_batch()
  total, count, metrics = reward.bradley_terry(model)(params, {}, batch, None, False)
  rows = objectives.base.pair_rows(batch)
  _, scores = _apply(model, {'params': params}, rows['tokens'], scores=True)
  r = np.asarray(scores)[np.arange(4), rows['lengths'] - 1].reshape(2, 2)
  margin = r[:, 0] - r[:, 1]
  np.testing.assert_allclose(float(total), np.log1p(np.exp(-margin)).sum(), rtol=1e-5)
  assert float(count) == 2 and float(metrics['accuracy']) == (margin > 0).sum()


def _dpo_numpy(pi, ref, beta, smoothing):
  """Mean DPO loss and its derivative by each sequence log-probability (B x 2)."""
  m = (pi[:, 0] - ref[:, 0]) - (pi[:, 1] - ref[:, 1])
  sig = lambda x: 1 / (1 + np.exp(-x))
  loss = -(1 - smoothing) * np.log(sig(beta * m)) - smoothing * np.log(sig(-beta * m))
  dm = (-(1 - smoothing) * sig(-beta * m) + smoothing * sig(beta * m)) * beta / len(m)
  return loss.mean(), np.stack([dm, -dm], 1)


def test_dpo_is_log_2_at_the_reference_and_matches_numpy():
  model = _model()
  reference, policy = _params(model, seed=0), _params(model, seed=1)
  batch = _preference_batch()
  beta, smoothing = 0.5, 0.1
  objective = dpo.dpo(model, model, beta, smoothing)
  mean_loss = jax.jit(lambda p: (lambda t, c, _: t / c)(*objective(
      p, {'reference': reference}, batch, None, False)))
  np.testing.assert_allclose(float(mean_loss(reference)), np.log(2), rtol=1e-6)

  rows = objectives.base.pair_rows(batch)
  seq_logp = lambda p: (_token_logps(model, p, rows['tokens']) * rows['weights'][:, 1:]).sum(-1)
  pi, ref = seq_logp(policy).reshape(2, 2), seq_logp(reference).reshape(2, 2)
  expected, d_loss_d_logp = _dpo_numpy(pi, ref, beta, smoothing)
  np.testing.assert_allclose(float(mean_loss(policy)), expected, rtol=1e-5)

  # gradient: the chain rule through each sequence's log-probability, in NumPy
  row_grads = jax.jit(jax.jacrev(lambda p: dpo.sequence_logps(model, {'params': p}, rows,
                                                               False)))(policy)   # 4 x ...
  expected_grad = jax.tree.map(lambda g: np.tensordot(d_loss_d_logp.reshape(-1),
                                                      np.asarray(g, np.float64), 1), row_grads)
  grad = jax.jit(jax.grad(mean_loss))(policy)
  # float32 backpropagation against float32 per-row gradients combined in float64: entries
  # near zero differ by up to 1.5e-6 (XLA:CPU's older fusion emitters, tests/conftest.py)
  assert_trees_close(grad, expected_grad, rtol=2e-4, atol=3e-6)


# --- RL ------------------------------------------------------------------------------------

def _rollout_batch(model, params, seed=0, B=4, T=10):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 64, (B, T)).astype(np.int32)
  weights = np.zeros((B, T), np.float32)
  for b, (start, end) in enumerate([(3, 10), (5, 8), (4, 10), (6, 7)]):
    weights[b, start:end] = 1
  logp = _token_logps(model, params, tokens)
  return {'tokens': tokens, 'weights': weights,
          'old_logp': (logp + rng.normal(0, 0.3, logp.shape)).astype(np.float32),
          'ref_logp': (logp + rng.normal(0, 0.5, logp.shape)).astype(np.float32),
          'advantages': rng.normal(0, 1, (B, T - 1)).astype(np.float32),
          'old_values': rng.normal(0, 1, (B, T - 1)).astype(np.float32),
          'returns': rng.normal(0, 1, (B, T - 1)).astype(np.float32)}


@pytest.mark.parametrize('ppo', [False, True])
def test_policy_gradient_losses_match_numpy(ppo):
  model = _model(scalar_head=ppo)
  params = _params(model)
  if ppo:
    params['score_head'] = jax.random.normal(jax.random.PRNGKey(1), params['score_head'].shape)
  batch = _rollout_batch(model, params)
  settings = config_lib.get_base_config().rl
  total, count, metrics = objectives.policy.policy_gradient(model, model, settings, value=ppo)(
      params, {}, batch, None, False)

  out = _apply(model, {'params': params}, batch['tokens'], scores=ppo)
  logits, values = out if ppo else (out, None)
  logp_all = _log_softmax(logits)[:, :-1]
  logp = np.take_along_axis(logp_all, batch['tokens'][:, 1:, None], -1)[..., 0]
  w, eps, adv = batch['weights'][:, 1:], settings.clip_eps, batch['advantages']
  ratio = np.exp(logp - batch['old_logp'])
  policy = -np.minimum(ratio * adv, np.clip(ratio, 1 - eps, 1 + eps) * adv)
  kl = np.exp(batch['ref_logp'] - logp) - (batch['ref_logp'] - logp) - 1
  per_token = policy + settings.kl_coef * kl
  if ppo:
    v, old, ret = np.asarray(values)[:, :-1], batch['old_values'], batch['returns']
    clipped = old + np.clip(v - old, -settings.value_clip, settings.value_clip)
    per_token += settings.value_coef * 0.5 * np.maximum((v - ret) ** 2, (clipped - ret) ** 2)
  np.testing.assert_allclose(float(total / count), (per_token * w).sum() / w.sum(), rtol=1e-5)
  clipped_share = ((np.abs(ratio - 1) > eps) * w).sum()
  assert 0 < clipped_share < w.sum()   # the batch exercises both sides of the clip
  np.testing.assert_allclose(float(metrics['clip_fraction']), clipped_share, rtol=1e-6)
  np.testing.assert_allclose(float(metrics['kl']), (kl * w).sum(), rtol=1e-5)


def test_policy_at_its_own_rollout_has_ratio_1_and_kl_0():
  model = _model()
  params = _params(model)
  batch = _rollout_batch(model, params)
  logp = _token_logps(model, params, batch['tokens']).astype(np.float32)
  batch.update(old_logp=logp, ref_logp=logp)
  _, count, metrics = objectives.policy.policy_gradient(
      model, model, config_lib.get_base_config().rl, False)(params, {}, batch, None, False)
  np.testing.assert_allclose(float(metrics['ratio'] / count), 1.0, rtol=1e-6)
  assert abs(float(metrics['kl'] / count)) < 1e-6


def test_group_advantages_and_gae_match_a_direct_computation():
  rewards = np.array([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 5.0])
  adv = rl.group_advantages(rewards, 4)
  for g in range(2):
    r = rewards[4 * g:4 * g + 4]
    np.testing.assert_allclose(adv[4 * g:4 * g + 4], (r - r.mean()) / (r.std() + 1e-6))

  rng = np.random.default_rng(0)
  mask = np.zeros((3, 8))
  for b, (start, end) in enumerate([(2, 8), (4, 6), (0, 3)]):
    mask[b, start:end] = 1
  values, rewards = rng.normal(size=(3, 8)), rng.normal(size=3)
  gamma, lam = 0.9, 0.8
  advantages, returns = rl.gae(rewards, values, mask, gamma, lam)
  for b in range(3):   # the textbook recursion over each row's response tokens
    ts = np.flatnonzero(mask[b])
    expected, running = np.zeros(8), 0.0
    for k in reversed(range(len(ts))):
      t = ts[k]
      last = k == len(ts) - 1
      delta = (rewards[b] if last else 0.0) + (0.0 if last else gamma * values[b, ts[k + 1]])
      running = delta - values[b, t] + (0.0 if last else gamma * lam * running)
      expected[t] = running
    np.testing.assert_allclose(advantages[b], expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(returns[b], np.where(mask[b] > 0, expected + values[b], 0.0))


# --- LoRA ----------------------------------------------------------------------------------

def _lora_variables(model_config, seed=0):
  model = model_lib.Transformer(model_config)
  variables = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(seed),
                                            jnp.zeros((1, 8), jnp.int32)))
  return model, variables


@pytest.mark.parametrize('scan', [True, False])
def test_lora_is_the_base_model_at_init_and_merges_exactly(scan):
  base_cfg = model_lib.ModelConfig.from_config(
      config_lib.resolve(tiny_config(scan_layers=scan, **LLAMA), None).model)
  cfg = dataclasses.replace(base_cfg, lora_rank=4, lora_alpha=8.0, lora_targets='attn/(q|kv|o)|mlp')
  model, variables = _lora_variables(cfg)
  base = model_lib.Transformer(base_cfg)
  tokens = random_batch(2, 16)['inputs']
  adapted = jax.tree_util.tree_flatten_with_path(variables['lora'])[0]
  assert len(adapted) == 2 * 5 * (1 if scan else base_cfg.n_layers)   # a, b of q kv o wi wo
  np.testing.assert_array_equal(_apply(model, variables, tokens),
                                _apply(base, {'params': variables['params']}, tokens))

  trained = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(2), x.shape),
                         variables['lora'])   # b no longer zero
  merged = peft.merge_lora(variables['params'], trained, cfg.lora_alpha, cfg.lora_rank)
  with jax.default_matmul_precision('highest'):
    unmerged_logits = _apply(model, {'params': variables['params'], 'lora': trained}, tokens)
    merged_logits = _apply(base, {'params': merged}, tokens)
  assert np.abs(np.asarray(unmerged_logits - _apply(base,
      {'params': variables['params']}, tokens))).max() > 1e-3
  np.testing.assert_allclose(merged_logits, unmerged_logits, rtol=1e-5, atol=1e-6)


def _lora_config(**model):
  config = tiny_config(**LLAMA, **model)
  config.lora.update(rank=4, alpha=8.0)
  config.optim.update(name='sgd', lr=0.5, weight_decay=0.0)
  return config


def _lora_step(config, shape):
  program = build_program(config, shape)
  state = program.init(jax.random.PRNGKey(0))
  program = program.with_frozen(program.init_frozen(jax.random.PRNGKey(0)))
  for seed in range(2):
    state, metrics = program.train_step(state, jax.device_put(random_batch(8, 16, seed),
                                                              program.batch_sharding))
  return program, state, metrics


@pytest.mark.parametrize('shape, pipelined', [((2, 2, 2, 1), False), ((1, 2, 2, 2), True)])
def test_lora_trains_only_adapters_and_sharded_equals_one_device(shape, pipelined):
  model = dict(pipeline_microbatches=2) if pipelined else {}
  _, one, one_metrics = _lora_step(_lora_config(**model), (1, 1, 1, 1))
  program, sharded, metrics = _lora_step(_lora_config(**model), shape)
  leaves = flat(sharded.params)
  assert leaves and all(p.endswith("['a']") or p.endswith("['b']") for p in leaves)
  assert all(np.abs(v).max() > 0 for p, v in leaves.items() if p.endswith("['b']"))  # trained
  trained = sum(v.size for v in leaves.values())
  total = trained + sum(x.size for x in jax.tree.leaves(program.frozen['base']))
  assert trained / total < 0.2
  np.testing.assert_allclose(float(metrics['loss']), float(one_metrics['loss']), rtol=1e-5)
  assert_trees_close(sharded.params, one.params, rtol=1e-4, atol=1e-6)


def test_lora_targets_matching_nothing_is_an_error():
  config = _lora_config()
  config.lora.targets = 'attn/nothing'
  with pytest.raises(ConfigError, match='config.lora.targets.*matches no module'):
    build_program(config)

"""Sampling: filters on crafted distributions against a NumPy statement of each rule; the KV
cache against recomputing the whole window."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import config as config_lib
from lm.inference import sampler as sample
from lm.model import transformer as model_lib
from lm.parallel import sharding
from tests.conftest import build_program, tiny_config

PROBS = np.array([0.05, 0.5, 0.15, 0.3], np.float32)


def _kept(logits) -> set[int]:
  return set(np.flatnonzero(np.isfinite(np.asarray(logits))).tolist())


def test_top_k_keeps_exactly_the_k_largest():
  logits = jnp.array([1.0, 5.0, 3.0, 5.5, 2.0, 4.0, -1.0, 0.0])
  for k in range(1, 9):
    expected = set(np.argsort(-np.asarray(logits))[:k].tolist())
    filtered = sample.filter_logits(logits, 1.0, k, 1.0)
    assert _kept(filtered) == expected, k
    np.testing.assert_array_equal(np.asarray(filtered)[list(expected)],
                                  np.asarray(logits)[list(expected)])


@pytest.mark.parametrize('top_p', [0.3, 0.49, 0.51, 0.79, 0.81, 0.94, 0.96, 0.999])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p):
  """The nucleus: the most probable tokens, fewest first, until their mass reaches top_p
  (each value lies just below or above a boundary of the cumulative mass 0.5, 0.8, 0.95)."""
  order = np.argsort(-PROBS)
  size = int(np.searchsorted(np.cumsum(PROBS[order]), top_p) + 1)
  expected = set(order[:size].tolist())
  assert _kept(sample.filter_logits(jnp.log(PROBS), 1.0, 0, top_p)) == expected


def test_temperature_scales_and_near_zero_is_argmax():
  logits = jnp.log(PROBS)
  np.testing.assert_allclose(sample.filter_logits(logits, 0.5, 0, 1.0), 2 * logits, rtol=1e-6)
  cold = sample.filter_logits(logits, 1e-9, 0, 1.0)
  draws = jax.vmap(lambda key: jax.random.categorical(key, cold))(
      jax.random.split(jax.random.PRNGKey(0), 200))
  assert set(np.asarray(draws).tolist()) == {int(np.argmax(PROBS))}


class _FavoursPadding:
  """A stand-in model whose logits put almost all mass on the padded ids (>= 5) and, among
  real ids, prefer (last token + 1) % 5."""

  def apply(self, variables, window_1xL):
    onehot = jax.nn.one_hot((window_1xL + 1) % 5, 8) * 3.0
    return onehot + jnp.where(jnp.arange(8) >= 5, 50.0, 0.0)


def test_padded_vocabulary_ids_are_never_sampled_and_greedy_follows_argmax():
  for temperature, top_k, top_p in ((1.0, 0, 1.0), (2.0, 3, 0.9), (1e-9, 0, 1.0)):
    ids = sample.recompute_generate(_FavoursPadding(), None, np.array([0]), 40,
                                    jax.random.PRNGKey(1), sample.Settings(
                                        40, temperature, top_k, top_p), vocab_size=5, max_len=8)
    assert ids.max() < 5, ids
  # temperature -> 0: each token is the argmax among real ids, (previous + 1) % 5
  np.testing.assert_array_equal(ids, np.arange(41) % 5)


LLAMA = dict(positions='rope', norm='rmsnorm', mlp='swiglu', use_bias=False,
             tie_embeddings=False, n_kv_heads=2)   # grouped-query: 8 query heads over 2
PROMPTS = [np.array([5, 9, 2]), np.arange(3, 12), np.array([7]), np.array([1, 4, 4, 8, 2])]


STYLES = {'gpt': {}, 'llama': LLAMA, 'window': dict(LLAMA, attention_window=3),
          'alternating': dict(LLAMA, attention_window=3, attention_global_every=2)}


def _model_and_variables(style: str, vocab_size: int = 64):
  config = config_lib.resolve(tiny_config(**STYLES[style], vocab_size=vocab_size), None)
  cfg = model_lib.ModelConfig.from_config(config.model)
  model = model_lib.Transformer(cfg)
  variables = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
  # larger than init so that logits differ clearly between positions (init std is 0.02)
  variables = jax.tree.map(lambda x: x * 8.0, variables)
  return cfg, model, variables


def _generate(cfg, variables, settings, rng, return_logits=False, vocab_size=64):
  padded = sample.left_padded(PROMPTS, cfg.max_len - settings.max_new_tokens)
  return padded, _generator(cfg, settings, vocab_size, return_logits)(variables, padded, rng)


@functools.lru_cache
def _generator(cfg, settings, vocab_size: int, return_logits: bool):
  return jax.jit(lambda v, p, r: sample.generate(sample.decoder(cfg), v, p, r, settings,
                                                 vocab_size, return_logits=return_logits))


@pytest.mark.parametrize('style', ['gpt', 'llama', 'window', 'alternating'])
def test_cached_logits_equal_a_full_recompute_at_every_step(style):
  """Prompts of different lengths, left-padded in one batch; each sampled token's logits from
  the cache equal the plain model's on the unpadded prompt + tokens so far."""
  cfg, model, variables = _model_and_variables(style)
  settings = sample.Settings(max_new_tokens=6, temperature=1.0)
  _, (new, lengths, logits_NxBxV) = _generate(cfg, variables, settings, jax.random.PRNGKey(3),
                                               return_logits=True)
  np.testing.assert_array_equal(lengths, [6] * len(PROMPTS))
  apply = jax.jit(model.apply)
  for b, prompt in enumerate(PROMPTS):
    sequence = np.concatenate([prompt, np.asarray(new[b])])[None]
    full_LxV = np.asarray(apply(variables, sequence)[0])
    for i in range(settings.max_new_tokens):
      # float32 sums in another order: errors scale with the row's largest logit. The floor,
      # measured on an AVX-512 Xeon (jaxlib 0.12.1): the same rows from a batch of two differ
      # from a batch of one by up to 7.6e-6 of the row's largest logit, the cache by 1.6e-5
      # (under load); a window one position too wide errs by far more than the bound
      expected = full_LxV[len(prompt) - 1 + i]
      np.testing.assert_allclose(logits_NxBxV[i, b], expected, rtol=1e-5,
                                 atol=5e-5 * np.abs(expected).max(),
                                 err_msg=f'prompt {b}, token {i}')


@pytest.mark.parametrize('style', ['gpt', 'llama'])
def test_greedy_tokens_equal_recomputing_and_a_seed_repeats(style):
  cfg, model, variables = _model_and_variables(style)
  greedy = sample.Settings(max_new_tokens=7, greedy=True)   # every prompt fits: 9 + 7 <= 16
  _, (new, _) = _generate(cfg, variables, greedy, jax.random.PRNGKey(0))
  for b, prompt in enumerate(PROMPTS):
    recomputed = sample.recompute_generate(model, variables, prompt, 7, jax.random.PRNGKey(0),
                                           dataclasses.replace(greedy, temperature=1e-9),
                                           vocab_size=64, max_len=cfg.max_len)
    np.testing.assert_array_equal(np.asarray(new[b]), recomputed[len(prompt):], err_msg=b)
  hot = sample.Settings(max_new_tokens=10, temperature=1.5, top_k=20, top_p=0.9)
  first = _generate(cfg, variables, hot, jax.random.PRNGKey(7))[1][0]
  again = _generate(cfg, variables, hot, jax.random.PRNGKey(7))[1][0]
  other = _generate(cfg, variables, hot, jax.random.PRNGKey(8))[1][0]
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)


def test_eos_stops_a_row_and_padded_ids_are_never_drawn():
  cfg, _, variables = _model_and_variables('gpt')
  settings = sample.Settings(max_new_tokens=12, temperature=3.0)   # flat: every id is likely
  _, (new, lengths) = _generate(cfg, variables, settings, jax.random.PRNGKey(0), vocab_size=40)
  assert np.asarray(new).max() < 40
  eos = int(new[0, 2])
  _, (new, lengths) = _generate(cfg, variables, dataclasses.replace(settings, eos_id=eos),
                                jax.random.PRNGKey(0), vocab_size=40)
  for row, n in zip(np.asarray(new), np.asarray(lengths)):
    hits = np.flatnonzero(row == eos)
    assert n == (hits[0] + 1 if len(hits) else 12)
  assert lengths[0] == 3


def test_sharded_sampling_equals_one_device():
  """Parameters sharded over tensor x fsdp: the same tokens as on one device."""
  config = tiny_config(**LLAMA)
  settings = sample.Settings(max_new_tokens=8, temperature=1.0, top_k=10)
  out = {}
  for shape in ((1, 1, 1, 1), (1, 4, 2, 1)):
    program = build_program(config.copy_and_resolve_references(), shape)
    params = program.init(jax.random.PRNGKey(0)).params
    sampler = sample.Sampler(program.model_config, program.mesh, program.rules, 64)
    out[shape] = sampler(program.variables(params), PROMPTS, jax.random.PRNGKey(1), settings)[1]
  np.testing.assert_array_equal(out[(1, 1, 1, 1)], out[(1, 4, 2, 1)])


@pytest.mark.parametrize('prompt, programs', [(PROMPTS[1], 2), (PROMPTS[0], 1)],
                         ids=['long_prompt', 'short_prompt'])
def test_extend_runs_past_the_context_and_its_restarts_share_one_program(prompt, programs):
  """One prompt continued for about 3 contexts: when the cache is full, decoding restarts from
  the last half of the context; the tokens are those of unpadded sampler calls of exactly the
  sizes needed, although every restart runs the same program (the last one cut), and so does
  the first call when the prompt fits in half the context (left-padded); EOS stops it."""
  cfg, _, variables = _model_and_variables('llama')
  sampler = sample.Sampler(cfg, sharding.make_mesh((1, 1, 1, 1), jax.devices()[:1]), (), 64)
  settings, rng = sample.Settings(max_new_tokens=45), jax.random.PRNGKey(2)
  half = cfg.max_len // 2
  new = sampler.extend(variables, prompt, rng, settings)
  # the 9-token prompt: 7 new tokens fill the cache, then restarts of `half` tokens (7 + 8 +
  # 8 + 8 + 8 + 6), from 2 programs; the 3-token prompt: `half` tokens from the start, 1 program
  assert cfg.max_len == 16 and len(sampler._jitted) == programs
  ids, expected = list(prompt), []
  while len(expected) < 45:
    context = ids[-half:] if expected else ids
    n = min(45 - len(expected), cfg.max_len - max(len(context), half))
    tokens = sampler(variables, [np.asarray(context)], jax.random.fold_in(rng, len(expected)),
                     dataclasses.replace(settings, max_new_tokens=n))[1][0].tolist()
    expected, ids = expected + tokens, ids + tokens
  np.testing.assert_array_equal(new, expected)
  eos = expected[40]
  stopped = sampler.extend(variables, prompt, rng, dataclasses.replace(settings, eos_id=eos))
  np.testing.assert_array_equal(stopped, expected[:expected.index(eos) + 1])

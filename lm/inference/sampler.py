"""Sampling with a KV cache: prefill the prompts once, then one position per new token, all in
one jitted loop; temperature, top-k, top-p (nucleus) or greedy; stop at EOS.

Prompts of different lengths are left-padded to a common length P: padding has segment id 0
and real tokens segment 1, so no token attends to padding, and positions count from each
prompt's first real token (RoPE and learned positions continue correctly). The cache holds
K (key / value) heads per layer, not H. Shapes: B prompts, P prompt slots, N new tokens,
V vocabulary.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lm.compress import quant
from lm.model import pipeline
from lm.model import transformer as model_lib
from lm.parallel import sharding


def filter_logits(logits_V, temperature: float, top_k: int, top_p: float):
  """Logits with everything outside the top-k / top-p set at -inf, scaled by temperature."""
  logits_V = logits_V / max(temperature, 1e-6)
  if top_k:
    kth = jax.lax.top_k(logits_V, top_k)[0][..., -1:]
    logits_V = jnp.where(logits_V < kth, -jnp.inf, logits_V)
  if top_p < 1.0:
    sorted_V = jnp.sort(logits_V, axis=-1)[..., ::-1]
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_V, axis=-1), axis=-1)
    # the smallest logit still needed to reach top_p of the probability mass
    cutoff = jnp.take_along_axis(sorted_V, (cumulative < top_p).sum(-1, keepdims=True), axis=-1)
    logits_V = jnp.where(logits_V < cutoff, -jnp.inf, logits_V)
  return logits_V


@dataclasses.dataclass(frozen=True)
class Settings:
  """How tokens are picked."""
  max_new_tokens: int
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  greedy: bool = False
  eos_id: int | None = None


def left_padded(prompts: list[np.ndarray], room: int, slots: int = 1) -> dict[str, np.ndarray]:
  """Prompts (each cut to its last `room` tokens) right-aligned in B x P arrays, P at least
  `slots`: tokens, positions (from 0 at each prompt's first token) and segments (0 on
  padding)."""
  prompts = [np.asarray(p, np.int32)[-room:] if room else np.zeros([0], np.int32)
             for p in prompts]
  P = max(1, slots, max(len(p) for p in prompts))
  tokens = np.zeros((len(prompts), P), np.int32)
  segments = np.zeros((len(prompts), P), np.int32)
  for i, p in enumerate(prompts):
    if len(p):
      tokens[i, P - len(p):], segments[i, P - len(p):] = p, 1
    else:   # an empty prompt: start from token 0 as a one-token context
      segments[i, -1] = 1
  positions = np.maximum(np.arange(P)[None, :] - (P - segments.sum(1))[:, None], 0)
  return {'tokens': tokens, 'positions': positions.astype(np.int32), 'segments': segments}


def decoder(model_config: model_lib.ModelConfig) -> model_lib.Transformer:
  """The model for decoding: the layer stack unpipelined, attention writing a cache."""
  return quant.transformer(dataclasses.replace(
      model_config, pipeline_stages=1, pipeline_microbatches=0, pipeline_repeats=1), decode=True)


def in_logical_order(model_config: model_lib.ModelConfig, variables: dict) -> dict:
  """Variables whose stacked layers a circular pipeline stores out of order, reordered."""
  cfg = model_config
  if not (cfg.scan_layers and cfg.pipeline_stages > 1 and cfg.pipeline_repeats > 1):
    return variables
  order = np.array(pipeline.logical_order(cfg.n_layers, cfg.pipeline_stages,
                                          cfg.pipeline_repeats))
  return {name: {**tree, 'layers': jax.tree.map(lambda p: p[order], tree['layers'])}
          if 'layers' in tree else tree for name, tree in variables.items()}


def generate(model: model_lib.Transformer, variables: dict, prompts: dict, rng: jax.Array,
             settings: Settings, vocab_size: int, return_logits: bool = False):
  """(new tokens B x N, lengths B: tokens up to and including EOS) for left-padded prompts
  (`left_padded`), with `model` from `decoder`. Traceable: jit it (see `Sampler`). With
  `return_logits`, also the float32 logits each token was drawn from (N x B x V)."""
  tokens_BxP, positions_BxP, segments_BxP = (prompts['tokens'], prompts['positions'],
                                             prompts['segments'])
  B = tokens_BxP.shape[0]
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(
      functools.partial(model.init, positions=positions_BxP[:, :1],
                        segments=segments_BxP[:, :1]), jax.random.PRNGKey(0),
      tokens_BxP[:, :1])['cache'])

  def forward(cache, tokens, positions, segments):
    logits, updated = model.apply({**variables, 'cache': cache}, tokens, positions=positions,
                                  segments=segments, mutable=['cache'])
    return updated['cache'], logits[:, -1]

  def pick(logits_BxV, key):
    logits_BxV = jnp.where(jnp.arange(logits_BxV.shape[-1]) < vocab_size, logits_BxV, -jnp.inf)
    if settings.greedy:
      return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(
        logits_BxV, settings.temperature, settings.top_k, settings.top_p)).astype(jnp.int32)

  def step(carry, i):
    cache, logits_BxV, position_B, done_B = carry
    token_B = pick(logits_BxV, jax.random.fold_in(rng, i))
    finished_B = done_B
    if settings.eos_id is not None:
      finished_B = done_B | (token_B == settings.eos_id)
    cache, next_logits = forward(cache, token_B[:, None], position_B[:, None] + 1,
                                 jnp.ones((B, 1), jnp.int32))
    out = (token_B, done_B) + ((logits_BxV,) if return_logits else ())
    return (cache, next_logits, position_B + 1, finished_B), out

  cache, logits_BxV = forward(cache, tokens_BxP, positions_BxP, segments_BxP)
  carry = (cache, logits_BxV, positions_BxP[:, -1], jnp.zeros([B], bool))
  _, out = jax.lax.scan(step, carry, jnp.arange(settings.max_new_tokens))
  tokens_NxB, done_NxB = out[0], out[1]
  result = (tokens_NxB.T, (~done_NxB).sum(0).astype(jnp.int32))
  return result + (out[2],) if return_logits else result


class Sampler:
  """`generate` jitted once per settings and prompt shape, on a mesh with its logical-axis
  rules, the result replicated (every process gets every completion)."""

  def __init__(self, model_config: model_lib.ModelConfig, mesh: jax.sharding.Mesh, rules,
               vocab_size: int):
    self.model_config, self.mesh, self.rules = model_config, mesh, rules
    self.model, self.vocab_size = decoder(model_config), vocab_size
    self._jitted = {}

  def _compiled(self, settings: Settings):
    if settings in self._jitted:
      return self._jitted[settings]

    def fn(variables, prompts, rng):
      return generate(self.model, variables, prompts, rng, settings, self.vocab_size)
    self._jitted[settings] = sharding.with_mesh(jax.jit(fn, out_shardings=sharding.replicated(
        self.mesh)), self.mesh, self.rules)
    return self._jitted[settings]

  def __call__(self, variables: dict, prompts: list[np.ndarray], rng: jax.Array,
               settings: Settings, prompt_slots: int = 1) -> tuple[dict, np.ndarray, np.ndarray]:
    """(left-padded prompts, new tokens B x N, lengths B) as host arrays; prompts longer
    than max_len - max_new_tokens keep their last tokens. The prompts are padded to at least
    `prompt_slots` positions (a program's shape is its settings and prompt slots)."""
    room = self.model_config.max_len - settings.max_new_tokens
    if room < max(1, prompt_slots):
      raise ValueError(f'max_new_tokens={settings.max_new_tokens} leaves no room for a prompt '
                       f'of {max(1, prompt_slots)} slots in the model\'s '
                       f'{self.model_config.max_len} positions')
    padded = left_padded(prompts, room, prompt_slots)
    new, lengths = self._compiled(settings)(in_logical_order(self.model_config, variables),
                                            padded, rng)
    return padded, np.asarray(new), np.asarray(lengths)

  def extend(self, variables: dict, prompt: np.ndarray, rng: jax.Array,
             settings: Settings) -> np.ndarray:
    """Up to settings.max_new_tokens tokens after one prompt, even past the model's context.
    What fits after the prompt is one call of the size asked. Past the context, decoding
    restarts from the last half of the context whenever the cache is full, and every call
    runs one program: a context of max_len // 2 slots (the first call's prompt left-padded
    to them when shorter) and the other half of the positions for new tokens, the last call
    cut to what is asked (the CPU recipe's 200-token sample: 1 program compiled, not 2)."""
    max_len, ids, produced = self.model_config.max_len, list(prompt), []
    slots = max(1, max_len // 2)
    while len(produced) < settings.max_new_tokens:
      wanted = settings.max_new_tokens - len(produced)
      context = ids[-slots:] if produced else ids[-max(1, max_len - 1):]
      pad = slots if len(context) <= slots else 1
      n = max_len - max(pad, len(context))
      if not produced and wanted <= max_len - max(1, len(context)):   # it all fits at once
        n, pad = wanted, 1
      _, new, lengths = self(variables, [np.asarray(context, np.int32)],
                             jax.random.fold_in(rng, len(produced)),
                             dataclasses.replace(settings, max_new_tokens=n), prompt_slots=pad)
      kept = new[0, :min(lengths[0], wanted)].tolist()
      produced += kept
      ids += kept
      if lengths[0] < n:   # EOS
        break
    return np.asarray(produced, np.int32)


def completion_text(tokenizer, new_tokens: np.ndarray, length: int,
                    stop: tuple[str, ...] = ()) -> str:
  """The decoded completion, without EOS, cut before the first stop string."""
  ids = new_tokens[:length]
  if tokenizer.eos_id is not None and length and ids[-1] == tokenizer.eos_id:
    ids = ids[:-1]
  text = tokenizer.decode(ids)
  for s in stop:
    if s and s in text:
      text = text[:text.index(s)]
  return text


def recompute_generate(model: model_lib.Transformer, variables: dict, prompt: np.ndarray,
                       num_tokens: int, rng: jax.Array, settings: Settings, vocab_size: int,
                       max_len: int) -> np.ndarray:
  """The slow baseline: the whole window recomputed for every new token (one prompt, no
  cache); kept for `benchmarks/sample.py`."""

  @jax.jit
  def next_token(window_1xL, last, key):
    logits_V = model.apply(variables, window_1xL)[0, last]
    logits_V = jnp.where(jnp.arange(logits_V.shape[-1]) < vocab_size, logits_V, -jnp.inf)
    return jax.random.categorical(key, filter_logits(logits_V, settings.temperature,
                                                     settings.top_k, settings.top_p))

  ids = list(np.asarray(prompt).tolist()) or [0]
  window = np.zeros((1, max_len), np.int32)
  for i in range(num_tokens):
    context = ids[-max_len:]
    window[0, :len(context)] = context
    ids.append(int(next_token(window, np.int32(len(context) - 1), jax.random.fold_in(rng, i))))
  return np.asarray(ids, np.int32)


@functools.lru_cache(maxsize=8)
def _one_device_sampler(model_config: model_lib.ModelConfig, vocab_size: int) -> Sampler:
  """Runs of one shape, completed one after another in a process (the post-training chain's
  stages, evaluated), share one sampler and so its compiled programs."""
  return Sampler(model_config, sharding.make_mesh((1, 1, 1, 1), jax.devices()[:1]), (),
                 vocab_size)


def complete(run, prompts: list[str], settings: Settings, rng: jax.Array,
             stop: tuple[str, ...] = (), batch_size: int = 64) -> list[str]:
  """Completions of text prompts by a loaded run (`lm.training.runs.load`), a batch at a time; a
  single prompt may run past the model's context (see `Sampler.extend`)."""
  from lm.config import ConfigError
  sampler = _one_device_sampler(run.model_config, run.tokenizer.vocab_size)
  try:
    ids = [run.tokenizer.encode(p) for p in prompts]
  except ValueError as e:
    raise ConfigError(f'a prompt cannot be encoded by the run\'s tokenizer: {e}') from None
  if len(ids) == 1:
    new = sampler.extend(run.variables, ids[0], rng, settings)
    return [completion_text(run.tokenizer, new, len(new), stop)]
  if settings.max_new_tokens >= run.model_config.max_len:
    raise ConfigError(f'--max_new_tokens={settings.max_new_tokens} must be below the model\'s '
                      f'{run.model_config.max_len} positions for a batch of prompts')
  out = []
  for start in range(0, len(ids), batch_size):
    _, new, lengths = sampler(run.variables, ids[start:start + batch_size],
                              jax.random.fold_in(rng, start), settings)
    out += [completion_text(run.tokenizer, t, n, stop) for t, n in zip(new, lengths)]
  return out

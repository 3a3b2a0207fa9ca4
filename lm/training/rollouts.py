"""RLHF in the one train loop: rollouts from the policy (the KV-cache sampler, G completions
per prompt), rewards from a reward-model run or a Python function, and the advantages (GRPO:
normalised within each prompt's group; PPO: generalised advantage estimation, whitened) that
the losses of `lm.objectives.policy` read."""
import dataclasses
import importlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lm.config import ConfigError, objective_traits
from lm.inference import sampler as sample
from lm.objectives import base as objectives
from lm.objectives import reward as reward_lib
from lm.training import steps


def group_advantages(rewards_B: np.ndarray, group_size: int) -> np.ndarray:
  """Each reward relative to its group (consecutive rows): (R - mean) / (std + 1e-6)."""
  r = rewards_B.reshape(-1, group_size)
  return ((r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + 1e-6)).reshape(-1)


def gae(rewards_B: np.ndarray, values_BxT: np.ndarray, mask_BxT: np.ndarray, gamma: float,
        lam: float) -> tuple[np.ndarray, np.ndarray]:
  """(advantages, returns) over each row's contiguous masked tokens, the reward arriving at
  the last of them and the value after it 0."""
  B, T = mask_BxT.shape
  on = mask_BxT > 0
  last_t = T - 1 - np.argmax(on[:, ::-1], axis=1)
  token_rewards = np.zeros((B, T))
  token_rewards[np.arange(B), last_t] = np.where(on.any(1), rewards_B, 0.0)
  advantages = np.zeros((B, T))
  running, next_value = np.zeros(B), np.zeros(B)
  for t in reversed(range(T)):
    delta = token_rewards[:, t] + gamma * next_value - values_BxT[:, t]
    running = np.where(on[:, t], delta + gamma * lam * running, running)
    next_value = np.where(on[:, t], values_BxT[:, t], next_value)
    advantages[:, t] = np.where(on[:, t], running, 0.0)
  return advantages, np.where(on, advantages + values_BxT, 0.0)


def whiten(x_BxT: np.ndarray, mask_BxT: np.ndarray) -> np.ndarray:
  on = mask_BxT > 0
  mean, std = x_BxT[on].mean(), x_BxT[on].std()
  return np.where(on, (x_BxT - mean) / (std + 1e-8), 0.0)


def python_reward(spec: str):
  """function(prompt, completion, example) -> float named by 'module:function'."""
  module, _, name = spec.partition(':')
  try:
    fn = getattr(importlib.import_module(module), name)
  except (ImportError, AttributeError) as e:
    raise ConfigError(f'config.rl.reward=python:{spec}: {type(e).__name__}: {e}') from None
  return fn


class Rollouts:
  """Makes a training batch from a batch of prompts: samples G completions of each with the
  current policy, scores them, and computes log-probabilities (policy, reference), values
  and advantages. Every process computes the whole batch alike (the sampler's output is
  replicated) and the train step takes its rows."""

  def __init__(self, config: ml_collections.ConfigDict, program: steps.Program, data):
    from lm.training import runs  # runs builds programs: imported here to keep this module light
    self.config, self.program, self.data, rl = config, program, data, config.rl
    self.tokenizer, self.values = data.tokenizer, objective_traits.of(config).scalar_head
    self.sampler = sample.Sampler(program.model_config, program.mesh, program.rules,
                                  data.tokenizer.vocab_size)
    self.settings = sample.Settings(rl.max_new_tokens, rl.temperature, rl.top_k, rl.top_p,
                                    eos_id=data.tokenizer.eos_id)
    self.stop = (rl.stop,) if rl.stop else ()
    self.last = None   # the newest rollout's (batch, host metrics), reused between rollouts
    kind, _, target = rl.reward.partition(':')
    self.reward_fn = python_reward(target) if kind == 'python' else None
    if kind == 'model':
      self.reward_run = runs.load(target, 'config.rl.reward', mesh=program.mesh)
      if (self.reward_run.config.model.vocab_size != config.model.vocab_size
          or self.reward_run.tokenizer.fingerprint != data.tokenizer.fingerprint):
        raise ConfigError(f'config.rl.reward=model:{target}: its vocabulary (size '
                          f'{self.reward_run.config.model.vocab_size}, tokenizer '
                          f'{self.reward_run.tokenizer.fingerprint}) differs from the policy\'s '
                          f'({config.model.vocab_size}, {data.tokenizer.fingerprint})')
      if not self.reward_run.model_config.scalar_head:
        raise ConfigError(f'config.rl.reward=model:{target} is not a reward model (its '
                          "config.train.objective is not 'reward')")
      self.score_rewards = program.in_mesh(jax.jit(lambda v, s: reward_lib.last_scores(
          self.reward_run.model, v, s)))

    def score(params, frozen, seqs):
      logp, _, values = objectives.token_logps(program.model, objectives.policy_variables(
          params, frozen), seqs, False, None, scores=self.values)
      ref = objectives.token_logps(program.reference, objectives.reference_variables(frozen),
                                   seqs, False, None)[0]
      return logp, ref, jnp.zeros_like(logp) if values is None else values
    self.score = program.in_mesh(jax.jit(score, out_shardings=jax.sharding.NamedSharding(
        program.mesh, jax.sharding.PartitionSpec())))

  def _global(self, batch: dict) -> dict:
    """A batch every process holds whole, as arrays over the program's batch sharding."""
    sharding = self.program.batch_sharding
    return {k: jax.make_array_from_callback(v.shape, sharding, lambda i, v=v: v[i])
            for k, v in batch.items()}

  def sample(self, params, prompts_batch: dict, split: str, rng, settings: sample.Settings,
             group: int):
    """Sequences (left-padded prompt + completion), completion texts, rewards."""
    ids = [p[:n] for p, n in zip(prompts_batch['prompt'], prompts_batch['prompt_length'])]
    ids = [p for p in ids for _ in range(group)]
    padded, new, lengths = self.sampler(self.program.variables(params), ids, rng, settings)
    completions, lengths = self._cut(new, lengths)
    B, P = padded['tokens'].shape
    N = new.shape[1]
    done = np.arange(N)[None, :] < lengths[:, None]
    seqs = {'tokens': np.concatenate([padded['tokens'], new], 1),
            'positions': np.concatenate(
                [padded['positions'], padded['positions'][:, -1:] + 1 + np.arange(N)], 1),
            'segments': np.concatenate([padded['segments'], np.ones((B, N), np.int32)], 1),
            'weights': np.concatenate([np.zeros((B, P), np.float32), done], 1).astype(
                np.float32)}
    examples = [self.data.examples[split][i] for i in prompts_batch['index']
                for _ in range(group)]
    rewards = self._rewards(examples, completions, seqs, P + lengths)
    return seqs, completions, rewards

  def _cut(self, new: np.ndarray, lengths: np.ndarray):
    """Completion texts cut before a stop string, and their token counts (through it)."""
    texts, cut = [], lengths.copy()
    for i, (tokens, n) in enumerate(zip(new, lengths)):
      text = sample.completion_text(self.tokenizer, tokens, n)
      for s in self.stop:
        if s in text:
          cut[i] = next(k for k in range(1, n + 1)
                        if s in sample.completion_text(self.tokenizer, tokens, k))
          text = text[:text.index(s)]
      texts.append(text)
    return texts, cut

  def _rewards(self, examples, completions, seqs, lengths) -> np.ndarray:
    if self.reward_fn is not None:
      return np.array([float(self.reward_fn(ex['prompt'], c, ex))
                       for ex, c in zip(examples, completions)], np.float32)
    scored = {k: seqs[k] for k in ('tokens', 'positions', 'segments')}
    return np.asarray(self.score_rewards(self.reward_run.variables,
                                         {**scored, 'lengths': lengths.astype(np.int32)}))

  def next_batch(self, state, step: int) -> tuple[dict, dict]:
    """(the batch of this step, host metrics): a new rollout every
    config.rl.updates_per_rollout steps, the updates between reusing it (validation keeps
    checkpoints, hence resumes, on rollout boundaries)."""
    if (step - 1) % self.config.rl.updates_per_rollout == 0:
      self.last = self.rollout(state, next(self.data.train), step)
    return self.last

  def rollout(self, state, prompts_batch: dict, step: int) -> tuple[dict, dict]:
    """(the training batch, host metrics) for one rollout."""
    rl = self.config.rl
    rng = jax.random.fold_in(jax.random.fold_in(state.rng, step), 1 << 20)
    seqs, _, rewards = self.sample(state.params, prompts_batch, 'train', rng, self.settings,
                                   rl.group_size)
    logp, ref, values = (np.asarray(x) for x in self.score(
        state.params, self.program.frozen, self._global(seqs)))
    mask = seqs['weights'][:, 1:]
    batch = {**seqs, 'old_logp': logp, 'ref_logp': ref}
    if self.values:
      advantages, returns = gae(rewards, values, mask, rl.gamma, rl.gae_lambda)
      batch.update(advantages=whiten(advantages, mask), returns=returns, old_values=values)
    else:
      batch['advantages'] = group_advantages(rewards, rl.group_size)[:, None] * mask
    batch = {k: np.asarray(v, np.int32 if v.dtype.kind in 'iu' else np.float32)
             for k, v in batch.items()}
    metrics = {'reward': float(rewards.mean()), 'response_length': float(mask.sum(1).mean())}
    return self._global(batch), metrics

  def evaluate(self, params, split: str) -> dict[str, float]:
    """Mean reward of greedy completions of the split's first prompts."""
    greedy = dataclasses.replace(self.settings, greedy=True)
    rewards = []
    for batch in self.data.eval[split]:
      real = batch['prompt_length'] > 0
      chosen = {k: v[real] for k, v in batch.items()}
      rewards.append(self.sample(params, chosen, split, jax.random.PRNGKey(0), greedy, 1)[2])
    return {'reward': float(np.concatenate(rewards).mean())}

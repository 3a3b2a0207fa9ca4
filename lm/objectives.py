"""Training objectives: what the one train step minimises.

An objective maps (params, frozen, batch, rng, train) to (loss sum, count, metric sums): sums,
so that microbatches and evaluation batches add exactly and one division at the end gives
means per count (tokens, pairs). `params` are the trained parameters; `frozen` holds what is
not trained: 'base', the base model under LoRA adapters (then `params` are the adapters), and
'reference', the frozen model of DPO / GRPO / PPO (under LoRA the base is the reference).

Sequence batches (preference pairs, rollouts) carry whole sequences `tokens` B x T with
`weights` B x T on the tokens whose log-probability counts (the response), and optionally
`positions` / `segments`; the log-probability of token j is read from the logits at j - 1.
"""
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from lm import losses, peft
from lm import model as model_lib

Objective = Callable[..., tuple[jax.Array, jax.Array, dict[str, jax.Array]]]


def policy_variables(params, frozen: dict) -> dict:
  """Flax variables of the trained model: under LoRA the frozen base with the adapters (and
  the parameters trained beside them, `peft.FULL`, in their places)."""
  if 'base' in frozen:
    if peft.FULL in params:
      return {'params': peft.overlaid(frozen['base'], params[peft.FULL]),
              'lora': params[peft.ADAPTERS]}
    return {'params': frozen['base'], 'lora': params}
  return {'params': params}


def reference_variables(frozen: dict) -> dict:
  """Flax variables of the frozen reference (the base model itself under LoRA)."""
  return {'params': frozen['reference'] if 'reference' in frozen else frozen['base']}


def _rngs(rng, train: bool) -> dict:
  return {'dropout': rng} if train and rng is not None else {}


def next_token(model: model_lib.Transformer) -> Objective:
  """Cross-entropy of each target token (pretraining; SFT, whose weights are 0 on prompts
  and padding); packed batches carry `positions` and `segments`."""
  def loss(params, frozen, batch, rng, train):
    logits = model.apply(policy_variables(params, frozen), batch['inputs'], train=train,
                         positions=batch.get('positions'), segments=batch.get('segments'),
                         rngs=_rngs(rng, train))
    total, count = losses.cross_entropy(logits, batch['targets'], batch.get('weights'))
    return total, count, {}
  return loss


def mlm_corruption(tokens_BxL, rng, rate: float, mask_id: int, vocab_size: int):
  """BERT's corruption (Devlin et al. 2019): (corrupted tokens, chosen B x L). `rate` of the
  positions are chosen; of those 80% become [MASK] (`mask_id`), 10% a random token of the
  vocabulary's `vocab_size`, and 10% stay."""
  choose, how, which = jax.random.split(rng, 3)
  chosen_BxL = jax.random.uniform(choose, tokens_BxL.shape) < rate
  u_BxL = jax.random.uniform(how, tokens_BxL.shape)
  random_BxL = jax.random.randint(which, tokens_BxL.shape, 0, vocab_size, tokens_BxL.dtype)
  corrupted_BxL = jnp.where(chosen_BxL & (u_BxL < 0.8), mask_id,
                            jnp.where(chosen_BxL & (u_BxL < 0.9), random_BxL, tokens_BxL))
  return corrupted_BxL, chosen_BxL


def masked_lm(model: model_lib.Transformer, rate: float, mask_id: int) -> Objective:
  """Masked-LM (a bidirectional model): cross-entropy of the original token at the chosen
  positions only, and their `accuracy`. Evaluation corrupts with a fixed key, so every
  evaluation of a run sees the same pattern."""
  def loss(params, frozen, batch, rng, train):
    tokens_BxL = batch['inputs']
    corrupt_rng, dropout_rng = jax.random.split(rng if rng is not None else
                                                jax.random.PRNGKey(0))
    corrupted_BxL, chosen_BxL = mlm_corruption(tokens_BxL, corrupt_rng, rate, mask_id, mask_id)
    if 'weights' in batch:   # padding rows of packed evaluation batches
      chosen_BxL &= batch['weights'] > 0
    logits = model.apply(policy_variables(params, frozen), corrupted_BxL, train=train,
                         positions=batch.get('positions'), segments=batch.get('segments'),
                         rngs=_rngs(dropout_rng if rng is not None else None, train))
    total, count = losses.cross_entropy(logits, tokens_BxL, chosen_BxL)
    correct = ((logits.argmax(-1) == tokens_BxL) & chosen_BxL).sum().astype(jnp.float32)
    return total, count, {'accuracy': correct}
  return loss


def distillation(model: model_lib.Transformer, teacher: model_lib.Transformer,
                 temperature: float, kl_weight: float) -> Objective:
  """Knowledge distillation (Hinton et al. 2015): (1 - kl_weight) x next-token cross-entropy
  + kl_weight x T^2 x KL(teacher_T || student_T) per token, both softened by `temperature` T;
  the teacher ('teacher' in frozen, any size) is never differentiated. Logs `kl` and `ce`."""
  def loss(params, frozen, batch, rng, train):
    rows = dict(positions=batch.get('positions'), segments=batch.get('segments'))
    logits = model.apply(policy_variables(params, frozen), batch['inputs'], train=train,
                         rngs=_rngs(rng, train), **rows).astype(jnp.float32)
    teacher_logits = jax.lax.stop_gradient(teacher.apply(
        {'params': frozen['teacher']}, batch['inputs'], **rows).astype(jnp.float32))
    ce, count = losses.cross_entropy(logits, batch['targets'], batch.get('weights'))
    kl_BxL = optax.losses.kl_divergence_with_log_targets(
        jax.nn.log_softmax(logits / temperature), jax.nn.log_softmax(teacher_logits / temperature))
    weights = batch.get('weights')
    kl = (kl_BxL if weights is None else kl_BxL * weights).sum()
    total = (1.0 - kl_weight) * ce + kl_weight * temperature ** 2 * kl
    return total, count, {'kl': kl, 'ce': ce}
  return loss


def token_logps(model: model_lib.Transformer, variables: dict, seqs: dict, train: bool, rng,
                scores: bool = False):
  """(log p(tokens[:, j] | tokens[:, :j]) for j = 1 .. T-1 as B x (T-1), the log-softmax
  B x (T-1) x V it was read from, and with `scores` the scalar head's B x (T-1) values at the
  positions that predict those tokens)."""
  out = model.apply(variables, seqs['tokens'], train=train, positions=seqs.get('positions'),
                    segments=seqs.get('segments'), scores=scores, rngs=_rngs(rng, train))
  logits, values = out if scores else (out, None)
  logp_all = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  logp = jnp.take_along_axis(logp_all, seqs['tokens'][:, 1:, None], axis=-1)[..., 0]
  return logp, logp_all, None if values is None else values[:, :-1]


def pair_rows(batch: dict) -> dict:
  """A preference batch (B x 2 x T: chosen, rejected) as 2B rows, pairs adjacent."""
  return {k: v.reshape(-1, *v.shape[2:]) for k, v in batch.items() if k != 'mask'}


def make(config: ml_collections.ConfigDict, model: model_lib.Transformer,
         reference: model_lib.Transformer, teacher: model_lib.Transformer | None) -> Objective:
  """The objective named by config.train.objective."""
  from lm.post import dpo, reward, rl  # the post-training objectives build on this module
  name = config.train.objective
  if name in ('lm', 'sft'):
    return next_token(model)
  if name == 'mlm':
    return masked_lm(model, config.mlm.rate, config.mlm.mask_id)
  if name == 'distill':
    return distillation(model, teacher, config.distill.temperature, config.distill.kl_weight)
  if name == 'reward':
    return reward.bradley_terry(model)
  if name == 'dpo':
    return dpo.dpo(model, reference, config.dpo.beta, config.dpo.label_smoothing,
                   config.dpo.sft_weight)
  return rl.policy_gradient(model, reference, config.rl, value=name == 'ppo')

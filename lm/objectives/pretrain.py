"""The pretraining objectives: next-token cross-entropy (also SFT's), BERT's masked LM and
knowledge distillation."""
import jax
import jax.numpy as jnp
import optax

from lm.model import transformer as model_lib
from lm.objectives import losses
from lm.objectives.base import Objective, policy_variables, rngs


def next_token(model: model_lib.Transformer) -> Objective:
  """Cross-entropy of each target token (pretraining; SFT, whose weights are 0 on prompts
  and padding); packed batches carry `positions` and `segments`."""
  def loss(params, frozen, batch, rng, train):
    logits = model.apply(policy_variables(params, frozen), batch['inputs'], train=train,
                         positions=batch.get('positions'), segments=batch.get('segments'),
                         rngs=rngs(rng, train))
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
                         rngs=rngs(dropout_rng if rng is not None else None, train))
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
                         rngs=rngs(rng, train), **rows).astype(jnp.float32)
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

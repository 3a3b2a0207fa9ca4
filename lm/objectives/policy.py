"""GRPO and PPO losses over rollouts (`lm.training.rollouts` makes the batches).

Per completion token t, with r_t = exp(logp_t - old_t) and advantage A_t:
  policy loss  -min(r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t)        (Schulman et al. 2017)
  KL penalty   kl_coef * (exp(ref_t - logp_t) - (ref_t - logp_t) - 1)  (the k3 estimator)
GRPO (Shao et al. 2024): A_t = the sequence's reward normalised within its group of G
completions of one prompt, (R - mean) / (std + 1e-6); no value model.
PPO: a value head V; the sequence reward arrives at its last token; A_t by generalised
advantage estimation (Schulman et al. 2016, gamma, lambda), whitened over the batch; value
loss 0.5 * max((V - R_t)^2, (V_old + clip(V - V_old, -c, c) - R_t)^2) with returns
R_t = A_t + V_old, weighted by value_coef. Losses are means over completion tokens.
"""
import jax.numpy as jnp
import ml_collections

from lm.model import transformer as model_lib
from lm.objectives import base as objectives


def policy_gradient(model: model_lib.Transformer, reference: model_lib.Transformer,
                    rl: ml_collections.ConfigDict, value: bool) -> objectives.Objective:
  del reference   # its log-probabilities come with the rollouts (`ref_logp`)
  eps = rl.clip_eps

  def loss(params, frozen, batch, rng, train):
    w = batch['weights'][:, 1:]
    logp, logp_all, values = objectives.token_logps(
        model, objectives.policy_variables(params, frozen), batch, train, rng, scores=value)
    ratio = jnp.exp(logp - batch['old_logp'])
    adv = batch['advantages']
    per_token = -jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - eps, 1 + eps) * adv)
    log_ref_ratio = batch['ref_logp'] - logp
    kl = jnp.exp(log_ref_ratio) - log_ref_ratio - 1
    per_token = per_token + rl.kl_coef * kl
    metrics = {'kl': kl, 'ratio': ratio, 'clip_fraction': jnp.abs(ratio - 1) > eps,
               'entropy': -(jnp.exp(logp_all) * logp_all).sum(-1)}
    if value:
      old, returns = batch['old_values'], batch['returns']
      clipped = old + jnp.clip(values - old, -rl.value_clip, rl.value_clip)
      value_loss = 0.5 * jnp.maximum((values - returns) ** 2, (clipped - returns) ** 2)
      per_token = per_token + rl.value_coef * value_loss
      metrics['value_loss'] = value_loss
    return (per_token * w).sum(), w.sum(), {k: (m * w).sum() for k, m in metrics.items()}
  return loss

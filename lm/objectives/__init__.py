"""Training objectives: what the one train step minimises (`base` says the shape every
objective has). `make` picks the one a run names."""
import ml_collections

from lm.model import transformer as model_lib
from lm.objectives import base, dpo, policy, pretrain, reward


def make(config: ml_collections.ConfigDict, model: model_lib.Transformer,
         reference: model_lib.Transformer, teacher: model_lib.Transformer | None) -> base.Objective:
  """The objective named by config.train.objective."""
  name = config.train.objective
  if name in ('lm', 'sft'):
    return pretrain.next_token(model)
  if name == 'mlm':
    return pretrain.masked_lm(model, config.mlm.rate, config.mlm.mask_id)
  if name == 'distill':
    return pretrain.distillation(model, teacher, config.distill.temperature,
                                 config.distill.kl_weight)
  if name == 'reward':
    return reward.bradley_terry(model)
  if name == 'dpo':
    return dpo.dpo(model, reference, config.dpo.beta, config.dpo.label_smoothing,
                   config.dpo.sft_weight)
  return policy.policy_gradient(model, reference, config.rl, value=name == 'ppo')

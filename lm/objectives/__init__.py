"""Training objectives: what the one train step minimises (`base` says the shape every
objective has). Each name of `lm.config.objective_traits.TRAITS` has a builder here."""
import ml_collections

from lm.model import transformer as model_lib
from lm.objectives import base, dpo, policy, pretrain, reward

# (config, model, reference, teacher) -> the objective
BUILDERS = {
    'lm': lambda c, model, reference, teacher: pretrain.next_token(model),
    'sft': lambda c, model, reference, teacher: pretrain.next_token(model),
    'mlm': lambda c, model, reference, teacher: pretrain.masked_lm(model, c.mlm.rate,
                                                                   c.mlm.mask_id),
    'distill': lambda c, model, reference, teacher: pretrain.distillation(
        model, teacher, c.distill.temperature, c.distill.kl_weight),
    'reward': lambda c, model, reference, teacher: reward.bradley_terry(model),
    'dpo': lambda c, model, reference, teacher: dpo.dpo(
        model, reference, c.dpo.beta, c.dpo.label_smoothing, c.dpo.sft_weight),
    'grpo': lambda c, model, reference, teacher: policy.policy_gradient(
        model, reference, c.rl, value=False),
    'ppo': lambda c, model, reference, teacher: policy.policy_gradient(
        model, reference, c.rl, value=True),
}


def make(config: ml_collections.ConfigDict, model: model_lib.Transformer,
         reference: model_lib.Transformer, teacher: model_lib.Transformer | None) -> base.Objective:
  """The objective named by config.train.objective."""
  return BUILDERS[config.train.objective](config, model, reference, teacher)

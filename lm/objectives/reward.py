"""Reward models: the transformer's scalar head read at each sequence's last real token,
trained on preference pairs with the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected)
(Ouyang et al. 2022)."""
import jax
import jax.numpy as jnp

from lm.model import transformer as model_lib
from lm.objectives import base as objectives


def last_scores(model: model_lib.Transformer, variables: dict, seqs: dict, train: bool = False,
                rng=None):
  """The scalar head at the last real token (`lengths` - 1) of each row: B rewards."""
  out = model.apply(variables, seqs['tokens'], train=train, positions=seqs.get('positions'),
                    segments=seqs.get('segments'), scores=True,
                    rngs={'dropout': rng} if train and rng is not None else {})
  last_B = seqs['lengths'] - 1
  return jnp.take_along_axis(out[1], last_B[:, None], axis=1)[:, 0]


def bradley_terry(model: model_lib.Transformer) -> objectives.Objective:
  def loss(params, frozen, batch, rng, train):
    rewards_Bx2 = last_scores(model, objectives.policy_variables(params, frozen),
                              objectives.pair_rows(batch), train, rng).reshape(-1, 2)
    margin_B = rewards_Bx2[:, 0] - rewards_Bx2[:, 1]
    mask_B = batch['mask']
    return ((-jax.nn.log_sigmoid(margin_B) * mask_B).sum(), mask_B.sum(),
            {'accuracy': ((margin_B > 0) * mask_B).sum(), 'margin': (margin_B * mask_B).sum()})
  return loss

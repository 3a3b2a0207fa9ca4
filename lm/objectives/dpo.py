"""Direct preference optimisation (Rafailov et al. 2023): with sequence log-probabilities
over response tokens of the policy (pi) and the frozen reference (ref),

  loss = -(1 - s) log sigmoid(beta * m) - s log sigmoid(-beta * m),
  m = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected),

s the label smoothing (conservative DPO); log 2 while the policy equals the reference.
With sft_weight w > 0, w times the chosen response's mean token negative log-likelihood is
added (RPO, Pang et al. 2024): DPO alone lowers the chosen answer's likelihood too, which can
lower the rate of correct greedy answers even as the preference margin grows."""
import jax
import jax.numpy as jnp

from lm.model import transformer as model_lib
from lm.objectives import base as objectives


def sequence_logps(model: model_lib.Transformer, variables: dict, rows: dict, train: bool,
                   rng=None):
  """Sum of response-token log-probabilities of each row."""
  logp, _, _ = objectives.token_logps(model, variables, rows, train, rng)
  return (logp * rows['weights'][:, 1:]).sum(-1)


def dpo(model: model_lib.Transformer, reference: model_lib.Transformer, beta: float,
        label_smoothing: float, sft_weight: float = 0.0) -> objectives.Objective:
  def loss(params, frozen, batch, rng, train):
    rows = objectives.pair_rows(batch)
    pi_Bx2 = sequence_logps(model, objectives.policy_variables(params, frozen), rows, train,
                            rng).reshape(-1, 2)
    ref_Bx2 = jax.lax.stop_gradient(sequence_logps(
        reference, objectives.reference_variables(frozen), rows, False).reshape(-1, 2))
    rewards_Bx2 = beta * (pi_Bx2 - ref_Bx2)   # the implicit rewards
    margin_B = rewards_Bx2[:, 0] - rewards_Bx2[:, 1]
    per_pair_B = (-(1 - label_smoothing) * jax.nn.log_sigmoid(margin_B)
                  - label_smoothing * jax.nn.log_sigmoid(-margin_B))
    chosen_tokens_B = jnp.maximum(rows['weights'][::2, 1:].sum(-1), 1.0)
    nll_B = -pi_Bx2[:, 0] / chosen_tokens_B
    per_pair_B = per_pair_B + sft_weight * nll_B
    mask_B = batch['mask']
    sums = lambda x: (x * mask_B).sum()
    return sums(per_pair_B), mask_B.sum(), {
        'accuracy': sums(margin_B > 0), 'margin': sums(margin_B), 'chosen_nll': sums(nll_B),
        'chosen_reward': sums(rewards_Bx2[:, 0]), 'rejected_reward': sums(rewards_Bx2[:, 1])}
  return loss

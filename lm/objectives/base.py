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

from lm.model import lora as peft
from lm.model import transformer as model_lib

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


def rngs(rng, train: bool) -> dict:
  return {'dropout': rng} if train and rng is not None else {}


def token_logps(model: model_lib.Transformer, variables: dict, seqs: dict, train: bool, rng,
                scores: bool = False):
  """(log p(tokens[:, j] | tokens[:, :j]) for j = 1 .. T-1 as B x (T-1), the log-softmax
  B x (T-1) x V it was read from, and with `scores` the scalar head's B x (T-1) values at the
  positions that predict those tokens)."""
  out = model.apply(variables, seqs['tokens'], train=train, positions=seqs.get('positions'),
                    segments=seqs.get('segments'), scores=scores, rngs=rngs(rng, train))
  logits, values = out if scores else (out, None)
  logp_all = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  logp = jnp.take_along_axis(logp_all, seqs['tokens'][:, 1:, None], axis=-1)[..., 0]
  return logp, logp_all, None if values is None else values[:, :-1]


def pair_rows(batch: dict) -> dict:
  """A preference batch (B x 2 x T: chosen, rejected) as 2B rows, pairs adjacent."""
  return {k: v.reshape(-1, *v.shape[2:]) for k, v in batch.items() if k != 'mask'}

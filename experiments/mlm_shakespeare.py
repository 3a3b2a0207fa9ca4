"""A bidirectional character encoder trained with masked-LM on Tiny Shakespeare (BERT's
recipe: 15% of positions chosen, 80% [MASK] / 10% random / 10% kept; loss and accuracy on the
chosen positions only).

    python -m lm.main --config experiments/mlm_shakespeare.py --workdir runs/mlm

The shape of experiments/shakespeare_char.py (4 layers, 128 channels, context 64) with
`causal=False`; `val_accuracy` is the masked-token accuracy. `:smoke` runs 60 steps.
"""
from experiments import shakespeare_char


def get_config(variant: str = ''):
  c = shakespeare_char.get_config(variant)   # which reads the variant
  c.model.causal = False
  c.train.objective = 'mlm'
  c.mlm.rate = 0.15
  c.sample.num_tokens = 0   # an encoder does not generate
  # evaluation masks with a fixed key, so its pattern follows the batch shape: batches of 12,
  # as when the README's accuracy was measured (the CPU recipe now evaluates in 48s)
  c.train.update(eval_batch_size=12, eval_batches=4 if variant == 'smoke' else 100)
  return c

"""Pruning the nanoGPT recipe's model (experiments/shakespeare_char.py) while fine-tuning it on
the same corpus for 300 steps: 50% magnitude pruning per layer or global, one-shot or
gradual, and 2:4 structured sparsity.

    python -m lm.main --config experiments/shakespeare_char.py --workdir runs/sc
    python -m lm.main --config experiments/prune_shakespeare.py:magnitude --workdir runs/prune_mag
    python -m lm.main --config experiments/prune_shakespeare.py:global    --workdir runs/prune_glob
    python -m lm.main --config experiments/prune_shakespeare.py:gradual   --workdir runs/prune_grad
    python -m lm.main --config experiments/prune_shakespeare.py:nm        --workdir runs/prune_nm

`before` in the variant (`magnitude,before`) takes one step at learning rate 0: the pruned
model's loss before fine-tuning. `init_from=DIR` names the dense run (default runs/sc);
`smoke` shortens the run to 20 steps.
"""
from experiments import shakespeare_char
from lm import config as config_lib

METHODS = {'magnitude': dict(method='magnitude'),
           'global': dict(method='magnitude', scope='global'),
           'gradual': dict(method='magnitude', schedule='gradual', end_step=200),
           'nm': dict(method='nm', n=2, m=4)}


def get_config(variant: str = 'magnitude'):
  v = config_lib.read_variant(variant, names=tuple(METHODS), flags=('smoke', 'before'),
                              keys={'init_from': 'runs/sc'})
  c = shakespeare_char.get_config()
  c.train.init_from = v.options['init_from']
  c.prune.update(sparsity=0.5, **METHODS[v.name])
  c.train.update(steps=300, eval_every=100, checkpoint_every=300)
  c.optim.update(lr=3e-4, min_lr=3e-5, warmup_steps=0)
  c.sample.num_tokens = 0
  if 'smoke' in v.flags:
    c.train.update(steps=20, eval_every=20, checkpoint_every=20, eval_batches=4)
  if 'before' in v.flags:
    c.train.update(steps=1, eval_every=1, checkpoint_every=1)
    c.optim.update(lr=0.0, min_lr=0.0, weight_decay=0.0)
  return c

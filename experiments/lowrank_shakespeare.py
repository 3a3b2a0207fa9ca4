"""Fine-tuning a low-rank compressed run of the nanoGPT recipe (experiments/shakespeare_char.py)
for 300 steps on the same corpus; the architecture (the rank) comes from the compressed run.

    python -m lm.main --config experiments/shakespeare_char.py --workdir runs/sc
    python -m lm.lowrank --workdir runs/sc --rank 32 --out runs/sc_r32
    python -m lm.main --config experiments/lowrank_shakespeare.py:init_from=runs/sc_r32 \\
        --workdir runs/sc_r32_tuned
"""
from experiments import shakespeare_char
from lm import config as config_lib


def get_config(variant: str = 'init_from=runs/sc_r32'):
  options = config_lib.read_variant(variant, keys={'init_from': 'runs/sc_r32'}).options
  c = shakespeare_char.get_config()
  c.train.init_from = options['init_from']
  c.model.from_init_from = True
  c.train.update(steps=300, eval_every=100, checkpoint_every=300)
  c.optim.update(lr=3e-4, min_lr=3e-5, warmup_steps=0)
  c.sample.num_tokens = 0
  return c

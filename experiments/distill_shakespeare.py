"""Knowledge distillation on Tiny Shakespeare: a student of 2 layers and 64 channels (0.1M
parameters) taught by the nanoGPT recipe's model (experiments/shakespeare_char.py, 0.8M),
against the same student trained from scratch for the same steps.

    python -m lm.main --config experiments/shakespeare_char.py --workdir runs/sc
    python -m lm.main --config experiments/distill_shakespeare.py:scratch --workdir runs/student
    python -m lm.main --config experiments/distill_shakespeare.py:distill --workdir runs/distill

`teacher=DIR` in the variant (`distill_shakespeare.py:distill,teacher=DIR`) names the teacher
run (default runs/sc); it must use the same tokenizer (characters of the same corpus).
"""
from experiments import shakespeare_char
from lm import config as config_lib


def get_config(variant: str = 'distill'):
  v = config_lib.read_variant(variant, names=('distill', 'scratch'),
                              keys={'teacher': 'runs/sc'})
  stage, teacher = v.name, v.options['teacher']
  c = shakespeare_char.get_config()
  c.model.update(n_layers=2, d_model=64, n_heads=4)
  c.sample.num_tokens = 0
  if stage == 'distill':
    c.train.objective = 'distill'
    c.distill.update(teacher=teacher, temperature=2.0, kl_weight=0.5)
  return c

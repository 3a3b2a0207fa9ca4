"""A scaling sweep on Tiny Shakespeare (characters): 5 model sizes x 3 token budgets.

    python -m launch.sweep --config experiments/scaling_shakespeare.py --sweep_dir runs/scaling
    python -m lm.compare runs/scaling --fit 3 --plots runs/scaling/plots

Models of 2-4 layers and 32-128 channels (20k-0.8M parameters) train for 300, 600 or 1200
steps of 16 x 64 tokens (0.3M-1.2M tokens), each with its own cosine schedule, and are
evaluated once at the end. About 9 minutes for all 15 runs on 2 CPU cores.
"""
from lm import config as config_lib
from lm.config import sweeps


def get_config():
  c = config_lib.get_base_config()
  c.data.update(source='shakespeare', tokenizer='char', seq_len=64)
  c.model.update(n_layers=4, d_model=128, n_heads=4, dtype='float32', scan_layers=False,
                 attention='reference')
  c.train.update(steps=1200, batch_size=16, eval_every=100_000, checkpoint_every=100_000,
                 eval_batches=40, eval_batch_size=16, log_every=100)
  c.optim.update(lr=2e-3, min_lr=2e-4, warmup_steps=50, b2=0.99)
  c.sample.num_tokens = 0
  return c


def get_sweep():
  sizes = sweeps.zipped(**{'model.n_layers': [2, 2, 3, 4, 4],
                           'model.d_model': [32, 48, 64, 96, 128],
                           'model.n_heads': [2, 4, 4, 4, 4]})
  return sweeps.product(sizes, sweeps.grid(**{'train.steps': [300, 600, 1200]}))

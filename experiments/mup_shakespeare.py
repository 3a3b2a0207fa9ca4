"""muP on Tiny Shakespeare (characters): the base of the coordinate check and of the
learning-rate transfer sweep (docs/guides/mup.md).

    python -m lm.mup coord_check --config experiments/mup_shakespeare.py \
        --widths 64,128,256,512,1024 --steps 10 --seeds 3 --out runs/mup/coord_check
    python -m launch.sweep --config experiments/mup_shakespeare.py --sweep_dir runs/mup/sweep
    python -m lm.mup transfer --sweep_dir runs/mup/sweep --out runs/mup/transfer

2 layers, 4 heads, width (d_model) 64 by default, muP's base width 64 (where muP equals SP),
context 64, batch 16, 300 steps of AdamW at learning rate 0.01 (20 warm-up steps, then a
cosine to 0, so that the final loss reads the learning rate rather than the last steps'
noise), no weight decay, no gradient clipping (either would blur how the update size scales
with the width; the coordinate check holds the rate constant). The sweep: learning rate
2^-12 .. 2^-5 x width 64 .. 512 x SP / muP, 64 runs (about 50 minutes on 2 CPU cores).
Variants: `sp` (the standard parametrization); `smoke`.
"""
from lm import config as config_lib
from lm.config import sweeps

WIDTHS = (64, 128, 256, 512)
LEARNING_RATES = tuple(2.0 ** -k for k in range(12, 4, -1))   # 2^-12 (2.4e-4) .. 2^-5 (0.031)


def get_config(variant: str = ''):
  options = config_lib.read_variant(variant, names=('', 'sp', 'smoke'))
  c = config_lib.get_base_config()
  c.data.source = 'shakespeare'
  c.data.tokenizer = 'char'
  c.data.seq_len = 64
  c.model.update(n_layers=2, d_model=64, n_heads=4, dropout=0.0, tie_embeddings=True,
                 dtype='float32', scan_layers=False, attention='reference',
                 parametrization='sp' if options.name == 'sp' else 'mup', mup_base_width=64)
  c.mesh.cpu_devices = 2
  c.train.update(steps=300, batch_size=16, eval_every=300, eval_batches=18,
                 eval_batch_size=48, checkpoint_every=300, log_every=50)
  c.optim.update(name='adamw', lr=1e-2, b1=0.9, b2=0.99, weight_decay=0.0, warmup_steps=20,
                 schedule='cosine', min_lr=0.0, clip_norm=0.0)
  c.sample.num_tokens = 0
  if options.name == 'smoke':
    c.train.update(steps=20, eval_every=20, checkpoint_every=20, eval_batches=2)
  return c


def get_sweep():
  """Learning rate (a factor-2 grid) x width x parametrization: 64 runs of 300 steps."""
  return sweeps.grid(**{'model.parametrization': ['sp', 'mup'], 'model.d_model': list(WIDTHS),
                        'optim.lr': list(LEARNING_RATES)})

"""nanoGPT's 'baby GPT' for Tiny Shakespeare characters, sized for one GPU.

    python -m lm.main --config experiments/shakespeare_char_gpu.py --workdir runs/sc_gpu
    # on an NVIDIA GPU, cuDNN's fused attention: --config.model.attention=cudnn

6 layers, 6 heads, 384 channels, context 256, batch 64, 5000 steps, dropout 0.2, AdamW
lr 1e-3 (betas 0.9 / 0.99, weight decay 0.1), 100 warm-up steps, cosine to 1e-4, bf16
compute. nanoGPT reports validation loss about 1.47 for this recipe (a few minutes on one
A100-class GPU; hours on a laptop CPU).
"""
from lm import config as config_lib


def get_config(variant: str = ''):
  smoke = config_lib.read_variant(variant, names=('', 'smoke')).name == 'smoke'
  c = config_lib.get_base_config()
  c.data.update(source='shakespeare', tokenizer='char', seq_len=256)
  c.model.update(n_layers=6, d_model=384, n_heads=6, dropout=0.2, tie_embeddings=True,
                 dtype='bfloat16', vocab_multiple=64)
  c.train.update(steps=5000, batch_size=64, eval_every=250, eval_batches=100,
                 eval_batch_size=64, checkpoint_every=1000, log_every=50)
  c.optim.update(name='adamw', lr=1e-3, min_lr=1e-4, b1=0.9, b2=0.99, weight_decay=0.1,
                 warmup_steps=100, schedule='cosine', clip_norm=1.0)
  if smoke:
    c.train.update(steps=20, eval_every=10, checkpoint_every=10, log_every=5, eval_batches=2,
                   batch_size=8, eval_batch_size=8)
    c.optim.warmup_steps = 5
  return c

"""nanoGPT's CPU recipe for Tiny Shakespeare, characters (shipped with the package).

    python -m lm.main --config experiments/shakespeare_char.py --workdir runs/sc

4 layers, 4 heads, 128 channels, context 64, batch 12, 2000 steps, AdamW lr 1e-3
(betas 0.9 / 0.99, weight decay 0.1), 100 warm-up steps, cosine to 1e-4, no dropout, tied
embeddings. Reaches validation loss about 1.88 in about 2 minutes on 2 CPU cores.
A 2-minute smoke version: --config experiments/shakespeare_char.py:smoke
"""
from lm import config as config_lib


def get_config(variant: str = ''):
  smoke = config_lib.read_variant(variant, names=('', 'smoke')).name == 'smoke'
  c = config_lib.get_base_config()
  c.data.source = 'shakespeare'
  c.data.tokenizer = 'char'
  c.data.seq_len = 64
  # On 2 CPU cores, unrolled layers and the einsum attention are the fastest (measured with
  # benchmarks/throughput.py); float32 compute, as bf16 casts cost more than they save there.
  c.model.update(n_layers=4, d_model=128, n_heads=4, dropout=0.0, tie_embeddings=True,
                 dtype='float32', scan_layers=False, attention='reference')
  # two XLA:CPU devices, one per core of a laptop-class CPU, along the data axis: 45 against
  # 70 ms per step on one (lm/cli.py split_cpu)
  c.mesh.cpu_devices = 2
  # the whole validation split (864 sequences) in 18 batches of 48: the same loss as in 72
  # batches of 12, about 0.76 instead of 0.87 s (val_wall_s in metrics.jsonl; README)
  c.train.update(steps=2000, batch_size=12, eval_every=250, eval_batches=25,
                 eval_batch_size=48, checkpoint_every=500, log_every=50)
  c.optim.update(name='adamw', lr=1e-3, min_lr=1e-4, b1=0.9, b2=0.99, weight_decay=0.1,
                 warmup_steps=100, schedule='cosine', clip_norm=1.0)
  if smoke:
    c.train.update(steps=60, eval_every=30, checkpoint_every=30, log_every=10, eval_batches=1)
    c.optim.warmup_steps = 10
    c.sample.num_tokens = 50
  return c

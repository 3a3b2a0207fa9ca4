"""A tiny Llama-style model on Tiny Shakespeare with a SentencePiece BPE vocabulary.

    python -m lm.main --config experiments/llama_tiny.py --workdir runs/llama_tiny

RoPE, RMSNorm, SwiGLU, grouped-query attention (8 query / 2 key-value heads), no biases,
untied output head, layers stacked with nn.scan and rematerialised ('dots' policy). The
1024-piece BPE vocabulary is trained on the training split and saved in the workdir.
About 33 minutes on 2 CPU cores (643 ms per step on an AMD EPYC, 300 on an earlier machine);
the smoke variant (":smoke") under a minute.
"""
from lm import config as config_lib


def get_config(variant: str = ''):
  smoke = config_lib.read_variant(variant, names=('', 'smoke')).name == 'smoke'
  c = config_lib.get_base_config()
  c.data.update(source='shakespeare', tokenizer='spm_bpe', spm_vocab_size=1024, seq_len=128)
  c.model.update(n_layers=4, d_model=256, n_heads=8, n_kv_heads=2, d_ff=688,
                 positions='rope', norm='rmsnorm', mlp='swiglu', use_bias=False,
                 tie_embeddings=False, dtype='float32', scan_layers=True, remat='dots')
  c.train.update(steps=3000, batch_size=16, eval_every=500, eval_batches=50, eval_batch_size=16,
                 checkpoint_every=1000)
  c.optim.update(name='adamw', lr=1e-3, min_lr=1e-4, warmup_steps=200, schedule='wsd',
                 b2=0.95, weight_decay=0.1, decay_embeddings=False)
  if smoke:
    c.train.update(steps=30, eval_every=15, checkpoint_every=15, log_every=5, eval_batches=2)
    c.optim.warmup_steps = 5
    c.sample.num_tokens = 20
  return c

"""GPT-2 small (124M parameters) on the One Billion Word benchmark from TFDS (needs network).

    python -m lm.main --config experiments/gpt2_124m_lm1b.py --workdir gs://BUCKET/gpt2_lm1b

12 layers, 12 heads, 768 channels, context 1024, a 50,304-piece SentencePiece BPE vocabulary
trained on lm1b's training split, documents packed with an end-of-document token, global
batch 512 sequences (0.5M tokens), AdamW lr 6e-4 (betas 0.9 / 0.95, weight decay 0.1), 2000
warm-up steps, cosine to 6e-5 over 20k steps, bf16 compute, splash attention (TPU; use
--config.model.attention=cudnn on GPUs), FSDP over every device. lm1b has
only train / test splits: half of the test split validates, the other half tests. TFDS
downloads and prepares lm1b (about 4 GB) on first use. Sized for a TPU v5e-16 / 8 x H100.
"""
from lm import config as config_lib


def get_config():
  c = config_lib.get_base_config()
  c.data.update(source='tfds:lm1b', text_key='text', tfds_splits=('train', 'test[:50%]',
                'test[50%:]'), tokenizer='spm_bpe', spm_vocab_size=50304, seq_len=1024,
                packing='pack', add_eos=True)
  c.model.update(n_layers=12, d_model=768, n_heads=12, dropout=0.0, tie_embeddings=True,
                 dtype='bfloat16', vocab_multiple=128, scan_layers=True, remat='dots_no_batch',
                 attention='splash')   # the TPU kernel; 'cudnn' on GPUs
  # 2 microbatches of 256: 32 sequences a step do not fit a v5e chip (lm.plan: 21 GB)
  c.train.update(steps=20000, batch_size=512, grad_accum_steps=2, eval_every=1000,
                 eval_batches=50, eval_batch_size=64, checkpoint_every=1000, log_every=20)
  c.optim.update(name='adamw', lr=6e-4, min_lr=6e-5, b1=0.9, b2=0.95, weight_decay=0.1,
                 warmup_steps=2000, schedule='cosine', clip_norm=1.0)
  c.mesh.shape = (1, -1, 1, 1)
  return c


def scaled(n_layers: int, d_model: int, n_heads: int, lr: float, grad_accum_steps: int):
  """This recipe at another GPT-2 size (GPT-3's learning rate for it, min_lr lr / 10)."""
  c = get_config()
  c.model.update(n_layers=n_layers, d_model=d_model, n_heads=n_heads)
  c.optim.update(lr=lr, min_lr=lr / 10)
  c.train.grad_accum_steps = grad_accum_steps
  return c

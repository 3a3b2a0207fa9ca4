"""A Llama-3.2-1B-shaped model on lm1b, sized for a TPU v5p-8 (4 chips).

    python -m lm.plan --config experiments/llama3_1b_lm1b.py --topology v5p-8
    python -m lm.main --config experiments/llama3_1b_lm1b.py --workdir gs://BUCKET/llama3_1b

16 layers, 2048 channels, 32 query / 8 key-value heads, SwiGLU 8192, RoPE (theta 500k),
RMSNorm, tied embeddings, a 128,256-entry vocabulary (a SentencePiece BPE trained on lm1b
here; point config.data.tokenizer at hf:PATH for Llama 3's own). 2048-token documents packed,
0.5M-token batches, AdamW lr 3e-4, bf16 compute, splash attention (the TPU kernel; lm.plan
on v5p-8: 45.7% estimated MFU with 'xla', 77.6% with splash, whose kernel time XLA's
estimate leaves out), layers scanned, FSDP over every chip. TFDS
downloads lm1b on first use.
"""
from lm import config as config_lib


def get_config():
  c = config_lib.get_base_config()
  c.data.update(source='tfds:lm1b', text_key='text', tfds_splits=('train', 'test[:50%]',
                'test[50%:]'), tokenizer='spm_bpe', spm_vocab_size=128256, seq_len=2048,
                packing='pack', add_eos=True)
  c.model.update(n_layers=16, d_model=2048, n_heads=32, n_kv_heads=8, d_ff=8192,
                 positions='rope', rope_theta=500000.0, norm='rmsnorm', mlp='swiglu',
                 use_bias=False, tie_embeddings=True, dtype='bfloat16', vocab_multiple=128,
                 scan_layers=True, remat='dots_no_batch', attention='splash')   # GPUs: 'cudnn'
  # 4 microbatches: 16 sequences of 2048 per chip at a time (lm.plan: 78 of 102 GB)
  c.train.update(steps=20000, batch_size=256, grad_accum_steps=4, eval_every=1000, eval_batches=50,
                 eval_batch_size=32, checkpoint_every=1000, log_every=20)
  c.optim.update(name='adamw', lr=3e-4, min_lr=3e-5, b1=0.9, b2=0.95, weight_decay=0.1,
                 warmup_steps=2000, schedule='cosine', clip_norm=1.0, decay_embeddings=False)
  c.mesh.shape = (1, -1, 1, 1)
  return c

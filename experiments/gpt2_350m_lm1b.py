"""GPT-2 medium (350M parameters) on lm1b, sized for a TPU v5p-8 (4 chips).

    python -m lm.plan --config experiments/gpt2_350m_lm1b.py --topology v5p-8
    python -m lm.main --config experiments/gpt2_350m_lm1b.py --workdir gs://BUCKET/gpt2_350m

GPT-2 small's recipe (experiments/gpt2_124m_lm1b.py: 0.5M-token batches, AdamW, cosine,
bf16 compute) at 24 layers, 16 heads and 1024 channels, lr 3e-4 as in GPT-3's table for
this size; FSDP over every chip.
"""
from experiments import gpt2_124m_lm1b


def get_config():
  # layers, channels, heads; 64 sequences per chip at a time (lm.plan: 58 of 102 GB)
  return gpt2_124m_lm1b.scaled(24, 1024, 16, lr=3e-4, grad_accum_steps=2)

"""GPT-2 large (774M parameters) on lm1b, sized for a TPU v5p-16 (8 chips).

    python -m lm.plan --config experiments/gpt2_774m_lm1b.py --topology v5p-16
    python -m lm.main --config experiments/gpt2_774m_lm1b.py --workdir gs://BUCKET/gpt2_774m

GPT-2 small's recipe (experiments/gpt2_124m_lm1b.py) at 36 layers, 20 heads and 1280
channels, lr 2.5e-4 (GPT-3's table); FSDP over every chip.
"""
from experiments import gpt2_124m_lm1b


def get_config():
  # layers, channels, heads; 32 sequences per chip at a time (lm.plan: 53 of 102 GB)
  return gpt2_124m_lm1b.scaled(36, 1280, 20, lr=2.5e-4, grad_accum_steps=2)

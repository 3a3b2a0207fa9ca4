"""GPT-2 XL (1.5B parameters) on lm1b, sized for a TPU v5p-32 (16 chips).

    python -m lm.plan --config experiments/gpt2_1.5b_lm1b.py --topology v5p-32
    python -m lm.main --config experiments/gpt2_1.5b_lm1b.py --workdir gs://BUCKET/gpt2_1.5b

GPT-2 small's recipe (experiments/gpt2_124m_lm1b.py) at 48 layers, 25 heads and 1600
channels, lr 2e-4 (GPT-3's table); FSDP over every chip.
"""
from experiments import gpt2_124m_lm1b


def get_config():
  # layers, channels, heads; 32 sequences per chip (lm.plan: 74 of 102 GB)
  return gpt2_124m_lm1b.scaled(48, 1600, 25, lr=2e-4, grad_accum_steps=1)

"""A Llama-3-8B-shaped model on lm1b, sized for a TPU v5p-64 (32 chips).

    python -m lm.plan --config experiments/llama3_8b_lm1b.py --topology v5p-64
    python -m lm.main --config experiments/llama3_8b_lm1b.py --workdir gs://BUCKET/llama3_8b

32 layers, 4096 channels, 32 query / 8 key-value heads, SwiGLU 14336, untied output head,
otherwise the 1B recipe (experiments/llama3_1b_lm1b.py); every layer rematerialised except
its attention's q, k, v and splash's output (remat 'save_attention'), FSDP over every chip.
"""
from experiments import llama3_1b_lm1b


def get_config():
  c = llama3_1b_lm1b.get_config()
  c.model.update(n_layers=32, d_model=4096, d_ff=14336, tie_embeddings=False,
                 remat='save_attention')
  c.train.grad_accum_steps = 1   # 8 sequences of 2048 per chip (lm.plan: 46 of 102 GB)
  return c

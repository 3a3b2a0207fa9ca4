"""Fine-tune an imported Hugging Face model on the post-training task (`lm/tasks/reverse.py`).

    python -m lm.hf import --from tests/fixtures/hf_tiny_llama --workdir runs/hf/base
    python -m lm.tasks.reverse make --out data/reverse
    python -m lm.main --config experiments/hf.py:lora_sft --workdir runs/hf/lora_sft
    python -m lm.hf export --workdir runs/hf/lora_sft --out exports/hf_lora_sft

The architecture and tokenizer are the imported run's (`config.model.from_init_from`):
`base=DIR` in the variant (default runs/hf/base) names it, `data=DIR` moves the task files.
Variants: `sft` (every parameter) and `lora_sft` (rank-8 adapters on every projection).
"""
from lm import config as config_lib


def get_config(variant: str = 'lora_sft'):
  v = config_lib.read_variant(variant, names=('sft', 'lora_sft'),
                              keys={'base': 'runs/hf/base', 'data': 'data/reverse'})
  stage, base, data = v.name, v.options['base'], v.options['data']
  c = config_lib.get_base_config()
  c.model.update(from_init_from=True, dtype='float32')
  c.data.update(source=f'jsonl:{data}/sft.jsonl', format='sft', packing='pack', seq_len=32)
  c.train.update(init_from=base, objective='sft', steps=200, batch_size=16, eval_batch_size=32,
                 eval_batches=4, log_every=10, eval_every=100, checkpoint_every=100)
  c.optim.update(name='adam', lr=1e-3, min_lr=1e-4, warmup_steps=10, weight_decay=0.0)
  c.sample.num_tokens = 0
  if stage == 'lora_sft':
    c.lora.update(rank=8, alpha=16.0)
    c.optim.lr = 3e-3
  return c

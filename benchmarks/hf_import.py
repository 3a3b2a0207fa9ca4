"""Peak host memory and time of `lm.hf import` for a random Llama written as safetensors
(numpy, no torch), read onto an FSDP mesh of every device. Prints one JSON line.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/hf_import.py \
        --d_model 1024 --layers 8

`peak_host_memory_mib` is the process's peak resident memory during the import (Linux VmHWM,
reset when it starts), which includes Orbax's buffers while it writes the checkpoint; on CPU
the "devices" live in host memory, so after reading, anonymous memory holds the parameters
once (`params_mib` above what it held at the start) and file-backed memory the safetensors
pages mapped while reading (page cache the kernel may reclaim).
"""
import json
import pathlib
import shutil
import tempfile
import time

import jax
import numpy as np
import safetensors.numpy

from lm import cli
from lm.config import arguments
from lm.interop import hf

FIXTURE = pathlib.Path(__file__).parent.parent / 'tests' / 'fixtures' / 'hf_tiny_llama'


def write_model(directory: pathlib.Path, d: int, layers: int, vocab: int, heads: int,
                kv_heads: int, d_ff: int) -> int:
  rng = np.random.default_rng(0)
  dh = d // heads
  shapes = {'model.embed_tokens.weight': (vocab, d), 'lm_head.weight': (vocab, d),
            'model.norm.weight': (d,)}
  for i in range(layers):
    p = f'model.layers.{i}.'
    shapes.update({p + 'input_layernorm.weight': (d,), p + 'post_attention_layernorm.weight': (d,),
                   p + 'self_attn.q_proj.weight': (heads * dh, d),
                   p + 'self_attn.k_proj.weight': (kv_heads * dh, d),
                   p + 'self_attn.v_proj.weight': (kv_heads * dh, d),
                   p + 'self_attn.o_proj.weight': (d, heads * dh),
                   p + 'mlp.gate_proj.weight': (d_ff, d), p + 'mlp.up_proj.weight': (d_ff, d),
                   p + 'mlp.down_proj.weight': (d, d_ff)})
  tensors = {k: rng.standard_normal(s, np.float32) * 0.02 for k, s in shapes.items()}
  safetensors.numpy.save_file(tensors, str(directory / 'model.safetensors'),
                              metadata={'format': 'pt'})
  config = dict(architectures=['LlamaForCausalLM'], model_type='llama', vocab_size=vocab,
                hidden_size=d, intermediate_size=d_ff, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads,
                max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False)
  (directory / 'config.json').write_text(json.dumps(config))
  for name in ('tokenizer.json', 'tokenizer_config.json'):
    shutil.copy(FIXTURE / name, directory / name)
  return sum(t.nbytes for t in tensors.values())


def main(argv: list[str]) -> None:
  parser = arguments.parser('python benchmarks/hf_import.py', __doc__)
  parser.add_argument('--d_model', type=int, default=1024, help="the written model's width")
  parser.add_argument('--layers', type=int, default=8, help='its layers')
  parser.add_argument('--vocab', type=int, default=32000, help='its vocabulary')
  parser.add_argument('--heads', type=int, default=8, help='its attention heads')
  parser.add_argument('--kv_heads', type=int, default=2, help='its key/value heads')
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    (tmp / 'hf').mkdir()
    file_bytes = write_model(tmp / 'hf', args.d_model, args.layers, args.vocab, args.heads,
                             args.kv_heads, 4 * args.d_model)
    start = time.perf_counter()
    summary = hf.import_model(str(tmp / 'hf'), str(tmp / 'run'),
                              (1, jax.device_count(), 1, 1))
    seconds = time.perf_counter() - start
  print(json.dumps({'devices': jax.device_count(), 'parameters': summary['parameters'],
                    'file_mib': round(file_bytes / 2**20, 1),
                    'params_mib': round(summary['parameters'] * 4 / 2**20, 1),
                    **{k: v for k, v in summary.items() if k.endswith('_mib')},
                    'import_s': round(seconds, 2)}))


if __name__ == '__main__':
  cli.run(main)

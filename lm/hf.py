"""Hugging Face GPT-2 / Llama checkpoints and tokenizers, in and out
(`lm.interop.hf` says how):

    python -m lm.hf import --from HF_DIR --workdir RUN [--mesh_shape 1,2,4,1]
    python -m lm.hf export --workdir RUN --out HF_DIR [--dtype bfloat16]
"""
import json
import re

from lm import cli
from lm.config import ConfigError, arguments
from lm.interop import hf


def _size(text: str) -> int:
  match = re.fullmatch(r'(\d+(?:\.\d+)?)\s*([KMG]?B)', text.strip().upper())
  if not match:
    raise ConfigError(f'--max_shard_size={text!r} is not a size like 500MB or 2GB')
  return int(float(match[1]) * {'B': 1, 'KB': 1 << 10, 'MB': 1 << 20, 'GB': 1 << 30}[match[2]])


def main(argv: list[str]) -> None:
  parser = arguments.parser('python -m lm.hf', hf.__doc__)
  commands = parser.add_subparsers(dest='command', required=True)
  imp = commands.add_parser('import', help='a Hugging Face model directory -> a run directory')
  imp.add_argument('--from', dest='hf_dir', required=True, help='Hugging Face model directory')
  imp.add_argument('--workdir', required=True, help='the run directory to write')
  imp.add_argument('--mesh_shape', default='1,1,1,1',
                   help='data,fsdp,tensor,stage sizes of the mesh the parameters are read onto')
  imp.add_argument('--param_dtype', default='float32', choices=('float32', 'bfloat16'),
                   help='the dtype the parameters are stored in')
  exp = commands.add_parser('export', help='a run directory -> a Hugging Face model directory')
  exp.add_argument('--workdir', required=True, help='run directory or RUN/checkpoints/STEP')
  exp.add_argument('--out', required=True, help='the Hugging Face model directory to write')
  exp.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16', 'float16'),
                   help='the dtype of the written tensors')
  exp.add_argument('--max_shard_size', default='2GB', help='split the safetensors above this')
  exp.add_argument('--no_tokenizer', action='store_true', help='write the model only')
  args = parser.parse_args(argv)
  if args.command == 'import':
    shape = tuple(int(s) for s in args.mesh_shape.split(','))
    summary = hf.import_model(args.hf_dir, args.workdir, shape, args.param_dtype)
    summary.pop('params')
    print(json.dumps(summary))
  else:
    files = hf.export_model(args.workdir, args.out, args.dtype, _size(args.max_shard_size),
                         not args.no_tokenizer)
    print(f'exported {args.out}: {", ".join(files)}')


if __name__ == '__main__':
  cli.run(main)

"""Completions from a run: python -m lm.sample --workdir RUN (--prompt TEXT | --prompts_file
F.jsonl) [--greedy] [--top_k K] [--top_p P] [--stop S] [--out F.jsonl]. The sampler is
`lm.inference.sampler`."""
import json

import jax

from lm import cli
from lm.config import ConfigError, arguments
from lm.data import examples
from lm.inference import sampler
from lm.training import runs


def main(argv: list[str]) -> None:
  """python -m lm.sample --workdir RUN (--prompt TEXT | --prompts_file F.jsonl) ..."""
  parser = arguments.parser('python -m lm.sample', 'Completions from a run (pretrained, SFT, '
                            'RL, LoRA, exported or imported).')
  parser.add_argument('--workdir', required=True, help='run directory or RUN/checkpoints/STEP')
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument('--prompt', help='one prompt')
  source.add_argument('--prompts_file', help='JSONL with a "prompt" field per line')
  parser.add_argument('--max_new_tokens', type=int, default=100, help='tokens per completion')
  parser.add_argument('--temperature', type=float, default=1.0, help='softmax temperature')
  parser.add_argument('--top_k', type=int, default=0, help='sample from the K likeliest (0: all)')
  parser.add_argument('--top_p', type=float, default=1.0,
                      help='sample from the smallest set of this probability (nucleus)')
  parser.add_argument('--seed', type=int, default=0, help='the sampling key')
  parser.add_argument('--greedy', action='store_true', help='argmax instead of sampling')
  parser.add_argument('--stop', action='append', default=[], help='cut before this string')
  parser.add_argument('--batch_size', type=int, default=64, help='prompts decoded together')
  parser.add_argument('--out', help='write {"prompt", "completion"} JSON lines here')
  args = parser.parse_args(argv)
  if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
    raise ConfigError('--max_new_tokens must be >= 1, --temperature >= 0, --top_p in (0, 1]')
  prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts_file)
  run = runs.load(args.workdir, '--workdir')
  completions = sampler.complete(run, prompts, sampler.Settings(
      args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.greedy,
      run.tokenizer.eos_id), jax.random.PRNGKey(args.seed), tuple(args.stop), args.batch_size)
  out = open(args.out, 'w') if args.out else None
  for prompt, completion in zip(prompts, completions):
    if out:
      out.write(json.dumps({'prompt': prompt, 'completion': completion}) + '\n')
    else:
      print(prompt + completion + ('\n' + '-' * 40 if len(prompts) > 1 else ''))
  if out:
    out.close()


def read_prompts(path: str) -> list[str]:
  """The "prompt" field of each line of a JSONL file (file:line on error)."""
  prompts = []
  for number, example in examples.read_jsonl(path, '--prompts_file'):
    if not isinstance(example.get('prompt'), str):
      raise ConfigError(f'--prompts_file: {path}:{number}: no string "prompt"')
    prompts.append(example['prompt'])
  return prompts


if __name__ == '__main__':
  cli.run(main)

"""A synthetic task for post-training that can be checked exactly: reverse a string of digits.

    python -m lm.tasks.reverse make --out data/reverse        # writes the files below
    python -m lm.tasks.reverse eval --workdir RUN --data data/reverse [--split test]

Prompt `Q: 372 A: `, answer `273` then a newline. Every digit string appears once, in a
seeded order shared by all files, so the last examples (the validation and test splits by
the default split fractions 0.9 / 0.05 / 0.05) are never trained on in any stage:
- pretrain.txt: the format with *random* answers (a base model that knows the format, not
  the task);
- sft.jsonl {"prompt", "response"}, a fraction `noise` of the responses wrong, like the
  demonstrations of careless annotators: SFT then learns the task but keeps sampling wrong
  answers, which preference tuning and RL are there to remove;
- preference.jsonl {"prompt", "chosen", "rejected"} (a wrong answer: the string itself, one
  digit changed, or random digits);
- prompts.jsonl {"prompt", "answer"} for RL, with `exact_match` as the reward function
  (`config.rl.reward=python:lm.tasks.reverse:exact_match`).
"""
import json
import os
import sys

import numpy as np

from lm.config import arguments

DIGITS = 4
STOP = '\n'


def prompt_of(s: str) -> str:
  return f'Q: {s} A: '


def answer_of(s: str) -> str:
  return s[::-1]


def exact_match(prompt: str, completion: str, example: dict) -> float:
  """1.0 when the completion (cut at the newline) is the answer."""
  del prompt
  return float(completion.split(STOP)[0].strip() == example['answer'])


def _wrong(s: str, rng: np.random.Generator) -> str:
  right = answer_of(s)
  kind = rng.integers(3)
  if kind == 0 and s != right:
    return s
  if kind <= 1:
    i = rng.integers(len(right))
    return right[:i] + str((int(right[i]) + rng.integers(1, 10)) % 10) + right[i + 1:]
  wrong = right
  while wrong == right:
    wrong = ''.join(rng.choice(list('0123456789'), len(right)))
  return wrong


def make(out: str, seed: int = 0, pretrain_lines: int = 30000, noise: float = 0.3) -> None:
  rng = np.random.default_rng(seed)
  strings = [f'{i:0{DIGITS}d}' for i in rng.permutation(10 ** DIGITS)]
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, 'pretrain.txt'), 'w') as f:
    for _ in range(pretrain_lines):
      s, random_answer = (''.join(rng.choice(list('0123456789'), DIGITS)) for _ in range(2))
      f.write(prompt_of(s) + random_answer + STOP)
  files = {name: open(os.path.join(out, f'{name}.jsonl'), 'w')
           for name in ('sft', 'preference', 'prompts')}
  for s in strings:
    p, a = prompt_of(s), answer_of(s)
    demonstrated = _wrong(s, rng) if rng.random() < noise else a
    rows = {'sft': {'prompt': p, 'response': demonstrated + STOP},
            'preference': {'prompt': p, 'chosen': a + STOP, 'rejected': _wrong(s, rng) + STOP},
            'prompts': {'prompt': p, 'answer': a}}
    for name, row in rows.items():
      files[name].write(json.dumps(row) + '\n')
  for f in files.values():
    f.close()


def heldout(data_dir: str, split: str = 'test', fractions=(0.9, 0.05, 0.05)) -> list[dict]:
  """The prompts of one split of prompts.jsonl (the same cut the training data uses)."""
  from lm.data import examples as post_data
  examples = post_data.read_examples(os.path.join(data_dir, 'prompts.jsonl'), 'prompt')
  return post_data.split(examples, fractions)[split]


def evaluate(run_dir: str, examples: list[dict], seed: int = 0) -> dict[str, float]:
  """Exact-match rates of a run's completions: greedy (`exact_match`), and sampled at
  temperature 1 (`sampled_exact_match`: how often the model's own distribution answers
  right, which preference tuning and RL raise)."""
  import jax

  from lm.inference import sampler as sample
  from lm.training import runs
  run = runs.load(run_dir, '--workdir')
  prompts = [ex['prompt'] for ex in examples]
  rates = {}
  for name, greedy in (('exact_match', True), ('sampled_exact_match', False)):
    completions = sample.complete(run, prompts, sample.Settings(
        DIGITS + 1, greedy=greedy, eos_id=run.tokenizer.eos_id), jax.random.PRNGKey(seed),
        batch_size=256)
    rates[name] = sum(exact_match(ex['prompt'], c, ex)
                      for ex, c in zip(examples, completions)) / len(examples)
  return rates


def main(argv: list[str]) -> None:
  parser = arguments.parser('python -m lm.tasks.reverse', __doc__)
  sub = parser.add_subparsers(dest='command', required=True)
  make_cmd = sub.add_parser('make', help='write the task files')
  make_cmd.add_argument('--out', required=True, help='the directory to write the files to')
  make_cmd.add_argument('--seed', type=int, default=0, help='of the drawn numbers')
  make_cmd.add_argument('--noise', type=float, default=0.3, help='fraction of wrong SFT answers')
  eval_cmd = sub.add_parser('eval', help='exact match of a run on held-out prompts (JSON)')
  eval_cmd.add_argument('--workdir', required=True, nargs='+', help='runs to score')
  eval_cmd.add_argument('--data', required=True, help='the directory `make` wrote')
  eval_cmd.add_argument('--split', default='test', choices=('validation', 'test'),
                        help='the held-out prompts to complete')
  args = parser.parse_args(argv)
  if args.command == 'make':
    make(args.out, args.seed, noise=args.noise)
    print(f'wrote {args.out}: pretrain.txt, sft.jsonl, preference.jsonl, prompts.jsonl')
    return
  examples = heldout(args.data, args.split)
  for run in args.workdir:
    rates = evaluate(run, examples)
    print(json.dumps({'run': run, 'split': args.split, 'prompts': len(examples),
                      **{k: round(v, 4) for k, v in rates.items()}}))


if __name__ == '__main__':
  main(sys.argv[1:])

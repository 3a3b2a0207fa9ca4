"""`python -m lm.reward --workdir RUN --prompts_file F.jsonl [--batch_size N]`: a reward
model's score of each line's {"prompt", "response"} (the response may be absent, or named
"completion" as `lm.sample --out` writes it), one number per line, in order."""
from lm import cli
from lm.config import arguments
from lm.tools import rewards
from lm.training import runs


def main(argv: list[str]) -> None:
  parser = arguments.parser('python -m lm.reward', __doc__)
  parser.add_argument('--workdir', required=True, help='a reward-model run (objective reward)')
  parser.add_argument('--prompts_file', required=True,
                      help='JSONL with "prompt" and "response" (or "completion") per line')
  parser.add_argument('--batch_size', type=int, default=64, help='pairs scored together')
  args = parser.parse_args(argv)
  pairs = rewards.read_pairs(args.prompts_file)
  scores = rewards.score(runs.load(args.workdir, '--workdir'), pairs, args.batch_size)
  for value in scores:
    print(f'{value:.6f}')


if __name__ == '__main__':
  cli.run(main)

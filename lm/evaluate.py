"""`python -m lm.evaluate --workdir RUN [--split validation|test] [--source SOURCE]`: the
next-token loss and perplexity of any run (trained, fine-tuned, LoRA, exported, imported) on
its own validation / test data, through the training loop's evaluation path; one JSON line.

Runs trained on text are evaluated on their corpus (`lm` objective), SFT runs on the
responses of their JSONL (`sft`); runs trained on preference or prompt data need `--source`
(a text corpus, as config.data.source). LoRA adapters are merged first.
"""
import json

from lm import cli
from lm.config import arguments
from lm.tools import evaluation


def main(argv: list[str]) -> None:
  parser = arguments.parser('python -m lm.evaluate', __doc__)
  parser.add_argument('--workdir', required=True, help='run directory or RUN/checkpoints/STEP')
  parser.add_argument('--split', choices=tuple(evaluation.SPLITS), help='one split (default: both)')
  parser.add_argument('--source', help='evaluate on this corpus (config.data.source) instead')
  parser.add_argument('--eval_batches', type=int, help='at most this many batches per split')
  args = parser.parse_args(argv)
  splits = (args.split,) if args.split else tuple(evaluation.SPLITS)
  print(json.dumps(evaluation.evaluate(args.workdir, splits, args.source, args.eval_batches)))


if __name__ == '__main__':
  cli.run(main)

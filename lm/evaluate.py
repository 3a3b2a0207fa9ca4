"""`python -m lm.evaluate --workdir RUN [--split validation|test] [--source SOURCE]`: the
next-token loss and perplexity of any run (trained, fine-tuned, LoRA, exported, imported) on
its own validation / test data, through the training loop's evaluation path; one JSON line.

Runs trained on text are evaluated on their corpus (`lm` objective), SFT runs on the
responses of their JSONL (`sft`); runs trained on preference or prompt data need `--source`
(a text corpus, as config.data.source). LoRA adapters are merged first.
"""
import argparse
import json
import math

import jax

from lm import cli
from lm import config as config_lib
from lm.config import ConfigError, objective_traits
from lm.training import loop as train
from lm.training import runs

SPLITS = {'validation': 'val', 'test': 'test'}


def evaluate(workdir: str, splits=('validation', 'test'), source: str | None = None,
             eval_batches: int | None = None) -> dict[str, float]:
  """{'val_loss', 'test_loss', ..., 'perplexity'} of the run's newest checkpoint (or
  RUN/checkpoints/STEP); perplexity is exp of the first split's loss."""
  run = runs.load(workdir, '--workdir')
  config, params = run.config, run.variables['params']   # a quantized run stays quantized
  if 'lora' in run.variables:   # adapters folded into the (dequantized) base: a float model
    params, config.quant.scheme = runs.merged_params(run), 'none'
  if source:
    config.data.update(source=source, format='text')
  elif config.data.format not in ('text', 'sft'):
    raise ConfigError(f'--workdir={workdir} trained on {config.data.format!r} data, which has no '
                      'next-token loss: give --source (e.g. shakespeare or text:PATH)')
  if objective_traits.of(config).causal:   # a masked-LM run keeps its objective
    config.train.objective = objective_traits.NEXT_TOKEN[config.data.format]
  runs.plain_config(config)
  devices = jax.device_count()
  config.mesh.shape = (-1, 1, 1, 1)   # every device, data parallel
  config.train.eval_batch_size = math.ceil(config.train.eval_batch_size / devices) * devices
  # unused here, but validated: a training batch these devices cannot split is not an error
  config.train.update(batch_size=math.ceil(config.train.batch_size / devices) * devices,
                      grad_accum_steps=1)
  if eval_batches:
    config.train.eval_batches = eval_batches
  config_lib.validate(config_lib.resolve(config, None), devices)
  ready = train.setup(config, run.step_dir.parent.parent)
  config, data, program = ready.config, ready.data, ready.program
  params = jax.device_put({k: v for k, v in params.items() if k != 'score_head'},
                          program.state_sharding.params)
  out = {}
  for split in splits:
    metrics = train.evaluate(program, params, data.eval[split], config.train.eval_batch_size)
    out.update({f'{SPLITS[split]}_{k}': v for k, v in metrics.items()})
  out['perplexity'] = math.exp(min(out[f'{SPLITS[splits[0]]}_loss'], 50.0))
  return out


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(prog='python -m lm.evaluate', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', required=True, help='run directory or RUN/checkpoints/STEP')
  parser.add_argument('--split', choices=tuple(SPLITS), help='one split (default: both)')
  parser.add_argument('--source', help='evaluate on this corpus (config.data.source) instead')
  parser.add_argument('--eval_batches', type=int, help='at most this many batches per split')
  args = parser.parse_args(argv)
  splits = (args.split,) if args.split else tuple(SPLITS)
  print(json.dumps(evaluate(args.workdir, splits, args.source, args.eval_batches)))


if __name__ == '__main__':
  cli.run(main)

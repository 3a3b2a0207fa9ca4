"""The next-token loss and perplexity of any run (trained, fine-tuned, LoRA, exported,
imported) on its own validation / test data, through the training loop's evaluation path
(`python -m lm.evaluate`)."""
import math

import jax

from lm import config as config_lib
from lm.config import ConfigError, objective_traits
from lm.training import loop as train
from lm.training import runs, start

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
  # evaluated, not trained: a quantized run without adapters is fine
  config_lib.validate(config_lib.resolve(config, None), devices, training=False)
  ready = start.setup(config, run.step_dir.parent.parent, training=False)
  config, data, program = ready.config, ready.data, ready.program
  params = jax.device_put({k: v for k, v in params.items() if k != 'score_head'},
                          program.state_sharding.params)
  out = {}
  for split in splits:
    metrics = train.evaluate(program, params, data.eval[split], config.train.eval_batch_size)
    out.update({f'{SPLITS[split]}_{k}': v for k, v in metrics.items()})
  out['perplexity'] = math.exp(min(out[f'{SPLITS[splits[0]]}_loss'], 50.0))
  return out

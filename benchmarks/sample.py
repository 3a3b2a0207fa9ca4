"""Decoding speed with the KV cache against recomputing the whole window for every token:
prints one JSON line.

    python benchmarks/sample.py --config experiments/shakespeare_char.py \
        [--prompt_len 256] [--new_tokens 200] [--batch 1] [--config.model.d_model=256 ...]

The model is the experiment's, randomly initialised (speed does not depend on the weights),
with max_len = prompt_len + new_tokens. Keys: cached_tokens_per_s and recompute_tokens_per_s
(new tokens per second over the batch, after a compile run), speedup, cached_compile_s; and
what a run's closing sample pays, compiles included: past_context_s, new_tokens after a
one-token prompt with the experiment's own context (decoding restarts from its last half
when the cache is full), and past_context_programs, the programs it compiled.
"""
import dataclasses
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm import cli
from lm import config as config_lib
from lm.config import arguments
from lm.inference import sampler as sample
from lm.model import transformer as model_lib

VOCAB = 256


def main(argv: list[str]) -> None:
  parser = arguments.parser('python benchmarks/sample.py', __doc__)
  arguments.add_config(parser)
  parser.add_argument('--prompt_len', type=int, default=256, help='prompt tokens')
  parser.add_argument('--new_tokens', type=int, default=200,
                      help='tokens generated after the prompt')
  parser.add_argument('--batch', type=int, default=1,
                      help='prompts decoded together (cached decoding)')
  args = arguments.parse(parser, argv)
  config = config_lib.resolve(args.config, VOCAB)
  cfg = dataclasses.replace(model_lib.ModelConfig.from_config(config.model),
                            max_len=args.prompt_len + args.new_tokens)
  model = model_lib.Transformer(cfg)
  variables = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
  prompts = [np.random.default_rng(i).integers(0, VOCAB, args.prompt_len)
             for i in range(args.batch)]
  settings = sample.Settings(args.new_tokens, temperature=1.0)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1, 1),
                           ('data', 'fsdp', 'tensor', 'stage'))
  sampler = sample.Sampler(cfg, mesh, (), VOCAB)

  def cached():
    return sampler(variables, prompts, jax.random.PRNGKey(0), settings)[1]

  start = time.perf_counter()
  cached()
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  cached()
  cached_s = time.perf_counter() - start

  def recompute(tokens: int):
    return sample.recompute_generate(model, variables, prompts[0], tokens, jax.random.PRNGKey(0),
                                     settings, VOCAB, cfg.max_len)
  recompute(2)   # compile
  start = time.perf_counter()
  recompute(args.new_tokens)
  recompute_s = time.perf_counter() - start

  own = model_lib.ModelConfig.from_config(config.model)
  own_variables = nn.unbox(model_lib.Transformer(own).init(jax.random.PRNGKey(0),
                                                           jnp.zeros((1, 8), jnp.int32)))
  start = time.perf_counter()
  closing = sample.Sampler(own, mesh, (), VOCAB)
  closing.extend(own_variables, np.array([1]), jax.random.PRNGKey(0), settings)
  past_context_s = time.perf_counter() - start

  cached_rate = args.batch * args.new_tokens / cached_s
  recompute_rate = args.new_tokens / recompute_s   # one prompt at a time
  print(json.dumps({
      'prompt_len': args.prompt_len, 'new_tokens': args.new_tokens, 'batch': args.batch,
      'parameters': cfg.param_counts()['total'], 'device': jax.devices()[0].device_kind,
      'cached_compile_s': round(compile_s, 3), 'cached_tokens_per_s': round(cached_rate, 1),
      'recompute_tokens_per_s': round(recompute_rate, 1),
      'speedup': round(cached_rate / recompute_rate / args.batch, 2),
      'past_context_s': round(past_context_s, 2),
      'past_context_programs': len(closing._jitted)}))


if __name__ == '__main__':
  cli.run(main)

"""A reward model's scores of (prompt, response) pairs read from JSONL (`python -m lm.reward`)."""
import jax
import numpy as np

from lm.config import ConfigError
from lm.data import examples as post_data
from lm.objectives import reward as reward_lib
from lm.training import runs


def read_pairs(path: str) -> list[tuple[str, str]]:
  """(prompt, response) of each JSONL line; file:line on a bad one."""
  pairs = []
  for number, example in post_data.read_jsonl(path, '--prompts_file'):
    response = example.get('response', example.get('completion', ''))
    if not isinstance(example.get('prompt'), str) or not isinstance(response, str):
      raise ConfigError(f'--prompts_file: {path}:{number}: needs a string "prompt" (and a '
                        'string "response" or "completion" if any)')
    pairs.append((example['prompt'], response))
  return pairs


def score(run: runs.Run, pairs: list[tuple[str, str]], batch_size: int = 64) -> list[float]:
  """Rewards of (prompt, response) pairs, encoded as in training (response + EOS), the
  sequence cut to the model's last max_len tokens."""
  if not run.model_config.scalar_head:
    raise ConfigError(f'--workdir={run.step_dir}: not a reward model (config.train.objective '
                      f'is {run.config.train.objective!r}, not \'reward\')')
  max_len = run.model_config.max_len
  fn = jax.jit(lambda v, s: reward_lib.last_scores(run.model, v, s))
  scores = []
  for start in range(0, len(pairs), batch_size):
    encoded = []
    for prompt, response in pairs[start:start + batch_size]:
      try:
        ids, _ = post_data.encoded(run.tokenizer, [(prompt, False), (response, True)], True)
      except ValueError as e:
        raise ConfigError(f'--prompts_file: line {start + len(encoded) + 1} cannot be encoded '
                          f'by the run\'s tokenizer: {e}') from None
      encoded.append(ids[-max_len:])
    tokens = np.zeros((len(encoded), max(len(ids) for ids in encoded)), np.int32)
    for i, ids in enumerate(encoded):
      tokens[i, :len(ids)] = ids
    lengths = np.array([len(ids) for ids in encoded], np.int32)
    scores += np.asarray(fn(run.variables, {'tokens': tokens, 'lengths': lengths})).tolist()
  return scores

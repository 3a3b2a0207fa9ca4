"""JSONL examples for post-training, templated, tokenized and cut into batches.

Formats (`config.data.format`), one JSON object per line:
- `sft`: {"prompt", "response"} (the text is prompt + response, as written), or {"messages":
  [{"role", "content"}, ...]} rendered as "ROLE: CONTENT\\n" per message; the loss is on the
  response / assistant tokens only (and the EOS after them, where the tokenizer has one).
- `preference`: {"prompt", "chosen", "rejected"}: two sequences per example.
- `prompt`: {"prompt", ...}: prompts for RL; the whole object goes to the reward function.

Splits are contiguous cuts by `config.data.split_fractions`. Examples are held in memory
(post-training sets are small next to pretraining corpora). SFT rows hold inputs / targets /
weights / positions / segments of seq_len tokens, one example per row or, with
`config.data.packing='pack'`, several (segment ids keep them apart, positions restart at
each). Preference rows hold `tokens`, `weights`, `lengths` B x 2 x seq_len (chosen, rejected)
and `mask` B; prompt rows `prompt` B x seq_len, `prompt_length` and `index` (into the split's
examples). Batches are global; each process keeps its `rows`.
"""
import json

import grain
import jax
import numpy as np
from etils import epath

from lm.config import ConfigError, RunDir
from lm.data import local_text, sources, text, tokenizers
from lm.parallel import distributed

FIELDS = {'preference': ('prompt', 'chosen', 'rejected'), 'prompt': ('prompt',)}


def read_jsonl(path: str, field: str) -> list[tuple[int, dict]]:
  """(line number, object) of each non-empty line; ConfigError naming `field`, the file and
  the line for one that is not a JSON object."""
  try:
    lines = open(path, encoding='utf-8').read().splitlines()
  except OSError as e:
    raise ConfigError(f'{field}: {e}') from None
  objects = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise ConfigError(f'{field}: {path}:{number}: not JSON ({e})') from None
    if not isinstance(obj, dict):
      raise ConfigError(f'{field}: {path}:{number}: not a JSON object')
    objects.append((number, obj))
  return objects


def read_examples(path: str, fmt: str) -> list[dict]:
  """Every line of a JSONL file, checked for the format's fields (file:line on error)."""
  sources.check_text_file(epath.Path(path), 'config.data.source')
  examples = read_jsonl(path, 'config.data.source')
  for number, example in examples:
    _check(example, fmt, f'config.data.source: {path}:{number}')
  return [example for _, example in examples]


def _check(example: dict, fmt: str, where: str) -> None:
  if fmt == 'sft' and 'messages' in example:
    messages = example['messages']
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get('role'), str) and isinstance(m.get('content'), str)
        for m in messages):
      raise ConfigError(f'{where}: "messages" must be a list of {{"role", "content"}} strings')
    if not any(m['role'] == 'assistant' for m in messages):
      raise ConfigError(f'{where}: "messages" has no "assistant" message to train on')
    return
  for field in FIELDS.get(fmt, ('prompt', 'response')):
    if not isinstance(example.get(field), str):
      raise ConfigError(f'{where}: missing string field {field!r} (config.data.format={fmt!r})')


def split(examples: list, fractions) -> dict[str, list]:
  cuts = local_text._cuts(len(examples), fractions)
  return {name: examples[a:b] for name, a, b in zip(local_text.SPLITS, cuts, cuts[1:])}


def pieces(example: dict) -> list[tuple[str, bool]]:
  """(text, trained) pieces of an sft example, in order."""
  if 'messages' in example:
    return [piece for m in example['messages'] for piece in
            ((f'{m["role"]}: ', False), (m['content'] + '\n', m['role'] == 'assistant'))]
  return [(example['prompt'], False), (example['response'], True)]


def texts(example: dict, fmt: str) -> list[str]:
  """All text of an example (to build a vocabulary from)."""
  if fmt == 'sft':
    return [text for text, _ in pieces(example)]
  return [example[f] for f in FIELDS[fmt]]


def encoded(tokenizer, example_pieces, eos: bool) -> tuple[np.ndarray, np.ndarray]:
  ids, trained = [], []
  for piece_text, is_trained in example_pieces:
    piece = tokenizer.encode(piece_text)
    ids.append(piece)
    trained.append(np.full(len(piece), is_trained))
  if eos and tokenizer.eos_id is not None:
    ids.append(np.array([tokenizer.eos_id], np.int32))
    trained.append(np.array([True]))
  return np.concatenate(ids).astype(np.int32), np.concatenate(trained)


class Truncation:
  """Applies config.data.overlong to sequences longer than `limit` tokens, counting them."""

  def __init__(self, policy: str, limit: int, split_name: str):
    self.policy, self.limit, self.split, self.count = policy, limit, split_name, 0

  def __call__(self, ids: np.ndarray, index: int, what: str, keep_end: bool = False):
    if len(ids) <= self.limit:
      return ids
    if self.policy == 'error':
      raise ConfigError(f'config.data.overlong=error: {what} {index} of the {self.split} split '
                        f'has {len(ids)} tokens, more than the {self.limit} that '
                        'config.data.seq_len allows; set config.data.overlong=truncate or '
                        'raise seq_len')
    self.count += 1
    return ids[-self.limit:] if keep_end else ids[:self.limit]


def sft_rows(tokenizer, examples: list, seq_len: int, pack: bool,
             truncation: Truncation) -> dict[str, np.ndarray]:
  """Rows of seq_len tokens; the loss weight is 1 where the target is a trained token."""
  rows, current = [], []

  def close():
    if current:
      rows.append(current.copy())
      current.clear()

  for i, example in enumerate(examples):
    ids, trained = encoded(tokenizer, pieces(example), eos=True)
    ids = truncation(ids, i, 'example')   # limit seq_len + 1: inputs and targets
    trained = trained[:len(ids)]
    if not pack or sum(len(x[0]) - 1 for x in current) + len(ids) - 1 > seq_len:
      close()
    current.append((ids, trained))
  close()
  out = {k: np.zeros((len(rows), seq_len), np.int32) for k in
         ('inputs', 'targets', 'positions', 'segments')}
  out['weights'] = np.zeros((len(rows), seq_len), np.float32)
  for r, row in enumerate(rows):
    start = 0
    for segment, (ids, trained) in enumerate(row, 1):
      n = len(ids) - 1
      span = slice(start, start + n)
      out['inputs'][r, span], out['targets'][r, span] = ids[:-1], ids[1:]
      out['weights'][r, span] = trained[1:]
      out['positions'][r, span], out['segments'][r, span] = np.arange(n), segment
      start += n
  return out


def preference_rows(tokenizer, examples: list, seq_len: int,
                    truncation: Truncation) -> dict[str, np.ndarray]:
  """Chosen and rejected sequences of each example, right-padded to seq_len tokens."""
  n = len(examples)
  out = {'tokens': np.zeros((n, 2, seq_len), np.int32),
         'weights': np.zeros((n, 2, seq_len), np.float32),
         'lengths': np.zeros((n, 2), np.int32), 'mask': np.ones(n, np.float32)}
  for i, example in enumerate(examples):
    for j, side in enumerate(('chosen', 'rejected')):
      ids, trained = encoded(tokenizer, [(example['prompt'], False), (example[side], True)],
                              eos=True)
      ids = truncation(ids, i, f'the {side} sequence of example')
      out['tokens'][i, j, :len(ids)], out['weights'][i, j, :len(ids)] = ids, trained[:len(ids)]
      out['lengths'][i, j] = len(ids)
  return out


def prompt_rows(tokenizer, examples: list, seq_len: int,
                truncation: Truncation) -> dict[str, np.ndarray]:
  """Prompt tokens (at most truncation.limit, leaving room for the completion),
  right-padded."""
  n = len(examples)
  out = {'prompt': np.zeros((n, seq_len), np.int32), 'prompt_length': np.zeros(n, np.int32),
         'index': np.arange(n, dtype=np.int32)}
  for i, example in enumerate(examples):
    # a cut prompt keeps its end, which leads to the answer
    ids = truncation(tokenizer.encode(example['prompt']), i, 'the prompt of example',
                     keep_end=True)
    out['prompt'][i, :len(ids)], out['prompt_length'][i] = ids, len(ids)
  return out


def train_batches(rows: dict[str, np.ndarray], batch_size: int, seed: int,
                  local: slice) -> grain.IterDataset:
  """Shuffled global batches, epoch after epoch (checkpointable); this process's rows."""
  return (grain.MapDataset.range(len(next(iter(rows.values())))).shuffle(seed).repeat()
          .batch(batch_size, drop_remainder=True)
          .map(lambda idx: {k: v[np.asarray(idx)[local]] for k, v in rows.items()})
          .to_iter_dataset(grain.ReadOptions(num_threads=0)))


def eval_batches(rows: dict[str, np.ndarray], batch_size: int, max_batches: int,
                 local: slice) -> list[dict[str, np.ndarray]]:
  """Batches in order, the last padded with rows of weight (or mask) 0."""
  n = len(next(iter(rows.values())))
  batches = []
  for start in range(0, min(n, batch_size * max_batches), batch_size):
    batch = {k: v[start:start + batch_size] for k, v in rows.items()}
    missing = batch_size - len(batch[next(iter(batch))])
    batch = {k: np.concatenate([v, np.zeros((missing, *v.shape[1:]), v.dtype)])
             for k, v in batch.items()}
    batches.append({k: v[local] for k, v in batch.items()})
  return batches


def _rows(config, tokenizer, examples: list, split_name: str) -> dict[str, np.ndarray]:
  d = config.data
  limits = {'sft': d.seq_len + 1, 'preference': d.seq_len,
            'prompt': d.seq_len - config.rl.max_new_tokens}
  truncation = Truncation(d.overlong, limits[d.format], split_name)
  try:
    if d.format == 'sft':
      rows = sft_rows(tokenizer, examples, d.seq_len, d.packing == 'pack', truncation)
    elif d.format == 'preference':
      rows = preference_rows(tokenizer, examples, d.seq_len, truncation)
    else:
      rows = prompt_rows(tokenizer, examples, d.seq_len, truncation)
  except ValueError as e:   # text the tokenizer cannot encode
    raise ConfigError(f'config.data.source={d.source!r}, {split_name} split: {e}') from None
  if truncation.count and jax.process_index() == 0:
    print(f'{split_name}: {truncation.count} of {len(examples)} examples longer than '
          f'{truncation.limit} tokens were truncated (config.data.overlong=truncate)')
  return rows


def make_data(config, workdir: epath.Path | None, rows: text.Rows,
              tokenizer_from: epath.Path | None) -> text.Data:
  """Tokenizer (built from every example's text, or the warm-start run's), shuffled training
  batches and evaluation batches of a post-training JSONL file."""
  d, t = config.data, config.train
  path = d.source.removeprefix('jsonl:')

  def prepare():
    examples = read_examples(path, d.format)
    saved = RunDir(workdir).tokenizer if workdir else None
    if saved and tokenizer_from and not saved.exists():
      tokenizers.copy(RunDir(tokenizer_from).tokenizer, saved)
    tokenizer = tokenizers.load_or_build(
        d.tokenizer, (text for ex in examples for text in texts(ex, d.format)),
        d.spm_vocab_size, saved)
    return examples, tokenizer

  examples, tokenizer = distributed.main_first(prepare, 'preparing the data')
  splits = split(examples, d.split_fractions)
  for name, part in splits.items():
    if not part:
      raise ConfigError(f'config.data.source={d.source!r}: the {name} split is empty '
                        f'({len(examples)} examples, config.data.split_fractions='
                        f'{tuple(d.split_fractions)})')
  split_rows = {name: _rows(config, tokenizer, part, name) for name, part in splits.items()}
  if d.format == 'prompt':   # every process samples every rollout: it reads all prompts
    batch, local, eval_local = t.batch_size // config.rl.group_size, slice(None), slice(None)
  else:
    batch, local, eval_local = t.batch_size, rows(t.batch_size), rows(t.eval_batch_size)
  train = train_batches(split_rows['train'], batch, t.seed, local)
  evals = {name: eval_batches(split_rows[name], t.eval_batch_size, t.eval_batches, eval_local)
           for name in text.EVAL_SPLITS}
  return text.Data(tokenizer=tokenizer, train=iter(train), eval=evals, examples=splits)

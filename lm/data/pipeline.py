"""A run's data: the tokenizer, the training iterator and the evaluation batches, from plain
text (`text`: windows or packing) or from JSONL examples (`examples`: SFT, preference pairs,
RL prompts), by `config.data.format`."""
from etils import epath

from lm.data import examples, text
from lm.data.text import EVAL_SPLITS, Data, Rows, all_rows

__all__ = ['EVAL_SPLITS', 'Data', 'Rows', 'all_rows', 'make_data']


def make_data(config, workdir: epath.Path | None, rows: Rows = all_rows,
              tokenizer_from: epath.Path | None = None) -> Data:
  """Tokenizer (saved in / reloaded from the workdir, or copied from `tokenizer_from`, a run
  directory), training iterator and evaluation batches. Process 0 prepares the files first;
  the others then read them (or prepare their own copy on another machine)."""
  if config.data.format == 'text':
    return text.text_data(config, workdir, rows, tokenizer_from)
  return examples.make_data(config, workdir, rows, tokenizer_from)

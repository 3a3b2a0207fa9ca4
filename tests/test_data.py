"""Tokenizers, the local-text TFDS builder and the Grain pipelines."""
import json

import numpy as np
import pytest
from etils import epath

from lm import config as config_lib
from lm.data import pipeline, sources, text, tokenizers

TEXT = sources.SHAKESPEARE.read_text()


def _data_config(tfds_dir, **overrides):
  c = config_lib.get_base_config()
  c.data.dir = tfds_dir
  c.data.update(overrides)
  c.train.update(batch_size=8, eval_batch_size=8, eval_batches=3, seed=3)
  return c


def test_char_and_byte_tokenizers_round_trip():
  char = tokenizers.CharTokenizer.build([TEXT])
  assert char.vocab_size == 65
  assert char.decode(char.encode(TEXT[:5000])) == TEXT[:5000]
  byte = tokenizers.ByteTokenizer()
  text = 'naïve café — 東京\n'
  assert byte.decode(byte.encode(text)) == text
  with pytest.raises(ValueError, match='not in the vocabulary'):
    char.encode('東')


@pytest.mark.parametrize('kind', ['spm_bpe', 'spm_unigram'])
def test_sentencepiece_trains_offline_and_round_trips(kind, tmp_path):
  path = epath.Path(tmp_path) / 'tokenizer.json'
  tok = tokenizers.load_or_build(kind, [TEXT[:200_000]], 512, path)
  assert tok.vocab_size == 512
  sample = TEXT[300_000:302_000]
  ids = tok.encode(sample)
  assert len(ids) < 0.7 * len(sample)        # it learned merges, not just characters
  assert tok.decode(ids) == sample
  reloaded = tokenizers.load_or_build(kind, [], 512, path)   # from the workdir, no training
  np.testing.assert_array_equal(reloaded.encode(sample), ids)


def test_local_text_splits_are_contiguous_disjoint_and_complete(tfds_dir):
  docs = sources.documents(_data_config(tfds_dir).data).splits
  parts = {split: ''.join(docs[split]) for split in ('train', 'validation', 'test')}
  assert parts['train'] + parts['validation'] + parts['test'] == TEXT
  for split, fraction in (('train', 0.9), ('validation', 0.05), ('test', 0.05)):
    assert abs(len(parts[split]) / len(TEXT) - fraction) < 0.001
  # no held-out passage appears in the training text
  for split in ('validation', 'test'):
    held_out = parts[split]
    for start in range(0, len(held_out) - 200, 200):
      assert held_out[start:start + 200] not in parts['train']


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_same_seed_same_batches_other_seed_other_batches(tfds_dir):
  a = pipeline.make_data(_data_config(tfds_dir), None)
  b = pipeline.make_data(_data_config(tfds_dir), None)
  other = _data_config(tfds_dir)
  other.train.seed = 4
  c = pipeline.make_data(other, None)
  batches_a, batches_b, batches_c = _take(a.train, 5), _take(b.train, 5), _take(c.train, 5)
  for x, y in zip(batches_a, batches_b):
    np.testing.assert_array_equal(x['inputs'], y['inputs'])
  assert not any(np.array_equal(x['inputs'], z['inputs']) for x, z in zip(batches_a, batches_c))
  first = batches_a[0]
  assert first['inputs'].shape == (8, 64) and first['inputs'].dtype == np.int32
  np.testing.assert_array_equal(first['inputs'][:, 1:], first['targets'][:, :-1])


def test_process_shards_are_disjoint_and_make_up_the_global_batch():
  tokens = np.arange(10_000, dtype=np.int32)   # token value == position in the stream
  kw = dict(seq_len=16, stride=1, batch_size=8, seed=0)
  whole = text.window_batches(tokens, rows=slice(0, 8), **kw)
  shards = [text.window_batches(tokens, rows=slice(2 * p, 2 * p + 2), **kw)
            for p in range(4)]
  seen = set()
  for step in range(50):
    parts = [s[step]['inputs'] for s in shards]
    starts = [set(part[:, 0].tolist()) for part in parts]
    assert all(len(s) == 2 for s in starts)
    for i in range(4):
      for j in range(i + 1, 4):
        assert not starts[i] & starts[j]
    np.testing.assert_array_equal(np.concatenate(parts), whole[step]['inputs'])
    for s in starts:
      assert not s & seen
      seen |= s


def test_iterator_state_resumes_the_same_batches(tfds_dir):
  data = pipeline.make_data(_data_config(tfds_dir), None)
  _take(data.train, 3)
  state = data.train.get_state()
  expected = _take(data.train, 3)
  fresh = pipeline.make_data(_data_config(tfds_dir), None)
  fresh.train.set_state(state)
  for x, y in zip(_take(fresh.train, 3), expected):
    np.testing.assert_array_equal(x['inputs'], y['inputs'])


def test_jsonl_documents_with_eos_and_packing(tfds_dir, tmp_path):
  path = tmp_path / 'docs.jsonl'
  lines = [json.dumps({'body': f'document number {i} ' * (i % 7 + 1)}) for i in range(400)]
  path.write_text('\n'.join(lines) + '\n')
  for packing in ('window', 'pack'):
    c = _data_config(tfds_dir, source=f'jsonl:{path}', text_key='body', tokenizer='byte',
                     add_eos=True, seq_len=32, packing=packing)
    data = pipeline.make_data(c, None)
    batch = next(data.train)
    assert batch['inputs'].shape == (8, 32)
    assert (batch['inputs'] == tokenizers.ByteTokenizer.eos_id).any()
    text = data.tokenizer.decode(batch['inputs'][0])
    assert 'document number' in text
  docs = sources.documents(c.data).splits
  assert [len(docs[s]) for s in ('train', 'validation', 'test')] == [360, 20, 20]


def test_tfds_dataset_by_name(tfds_dir):
  """tfds:NAME reads a prepared dataset through tfds.data_source (here the local builder's
  output, as no network is available)."""
  c = _data_config(tfds_dir)
  local = sources.documents(c.data).splits
  name = next(p.name for p in (epath.Path(tfds_dir) / 'local_text').iterdir()
              if p.name.startswith('tinyshakespeare'))
  by_name = sources.documents(
      _data_config(tfds_dir, source=f'tfds:local_text/{name}').data).splits
  assert ''.join(by_name['validation']) == ''.join(local['validation'])


def test_evaluation_windows_come_from_their_own_split(tfds_dir):
  data = pipeline.make_data(_data_config(tfds_dir), None)
  texts = {split: ''.join(docs) for split, docs in
           sources.documents(_data_config(tfds_dir).data).splits.items()}
  for split in ('validation', 'test'):
    assert len(data.eval[split]) == 3
    for batch in data.eval[split]:
      for inputs, targets in zip(batch['inputs'], batch['targets']):
        window = data.tokenizer.decode(np.concatenate([inputs, targets[-1:]]))
        assert window in texts[split]


def test_window_split_is_tokenized_once_into_a_memory_mapped_file(tmp_path):
  # a directory of its own: the shared one holds other tokenizers' files of the same split
  c = _data_config(str(tmp_path))
  pipeline.make_data(c, None)
  files = sorted((epath.Path(tmp_path) / 'tokens').glob('tinyshakespeare-*-validation-*.bin'))
  assert len(files) == 1
  tokens = np.memmap(files[0], np.uint16, mode='r')
  validation = ''.join(sources.documents(c.data).splits['validation'])
  tokenizer = tokenizers.CharTokenizer.build([TEXT])
  np.testing.assert_array_equal(tokens, tokenizer.encode(validation))
  mtime = files[0].stat().mtime
  pipeline.make_data(c, None)                       # reused, not written again
  assert files[0].stat().mtime == mtime


@pytest.mark.parametrize('packing', ['window', 'pack'])
def test_processes_rows_make_up_the_global_batches(tfds_dir, packing):
  """Two processes' rows of every evaluation batch (padded with zero-weight rows in 'pack'
  mode) put together are one process's batch, and there are as many on each."""
  c = _data_config(tfds_dir, packing=packing, tokenizer='byte', add_eos=True)
  c.train.eval_batches = 1000   # the whole validation split: the last 'pack' batch is partial
  whole = pipeline.make_data(c, None)
  halves = [pipeline.make_data(c, None, rows=lambda b, i=i: slice(i * b // 2, (i + 1) * b // 2))
            for i in range(2)]
  for split in ('validation', 'test'):
    assert len(halves[0].eval[split]) == len(halves[1].eval[split]) == len(whole.eval[split])
    for a, b, both in zip(halves[0].eval[split], halves[1].eval[split], whole.eval[split]):
      for key in both:
        np.testing.assert_array_equal(np.concatenate([a[key], b[key]]), both[key])
  if packing == 'pack':
    weights = np.concatenate([b['weights'] for b in whole.eval['validation']])
    assert 0 < weights.sum() < weights.size and set(np.unique(weights)) == {0.0, 1.0}


def test_text_check_reads_in_chunks(tmp_path):
  path = epath.Path(tmp_path) / 'big.txt'
  # a 3-byte character across the 1 MiB chunk boundary is fine; a bad byte far in is found
  head = b'a' * (sources.CHUNK_BYTES - 1) + '€'.encode()
  path.write_bytes(head + b'text\n')
  sources.check_text_file(path, 'config.data.source')
  path.write_bytes(head + b'text\xff\n')
  with pytest.raises(config_lib.ConfigError, match=f'bad byte at offset {len(head) + 4}'):
    sources.check_text_file(path, 'config.data.source')


def test_the_first_use_of_the_shipped_corpus_says_so_in_one_line(tmp_path, capsys):
  config = config_lib.get_base_config()
  config.data.dir = str(tmp_path)
  sources.documents(config.data)
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      f'preparing tinyshakespeare.txt for its first use, in {tmp_path}'), lines
  sources.documents(config.data)   # prepared: nothing to say
  assert capsys.readouterr().out == ''

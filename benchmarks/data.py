"""Data pipeline throughput and memory on a generated corpus: prints one JSON line.

    python benchmarks/data.py --megabytes 300 [--tokenizer byte] [--packing window]
        [--seq_len 1024] [--batch_size 32] [--batches 3000] [--dir /tmp/lm-data-bench]

The corpus (Tiny Shakespeare repeated to the size asked) is written once under --dir, and
so are the prepared files (TFDS array_record, token files); delete --dir to time a cold
prepare. Keys: corpus_mb, prepare_s (splits, tokenizer and token files, or only reading
them when already prepared), tokens_per_s (training tokens delivered to the host per
second, one process reading every row), peak_rss_gb (the process's peak resident memory),
and at the end rss_file_gb / rss_anon_gb: resident pages of mapped files (the token file's
pages that windows touched: page cache the kernel may reclaim, shared by the processes of a
machine) and the process's own memory.
"""
import json
import os
import resource
import time

from etils import epath

from lm import cli
from lm import config as config_lib
from lm.config import arguments
from lm.data import pipeline, sources


def make_corpus(path: epath.Path, megabytes: int) -> None:
  if path.exists() and path.stat().length >= megabytes << 20:
    return
  text = sources.SHAKESPEARE.read_bytes()
  with open(path, 'wb') as f:
    for _ in range((megabytes << 20) // len(text) + 1):
      f.write(text)


def main(argv: list[str]) -> None:
  parser = arguments.parser('python benchmarks/data.py', __doc__.split('\n')[0])
  parser.add_argument('--megabytes', type=int, default=300, help='size of the text file read')
  parser.add_argument('--tokenizer', default='byte', choices=config_lib.TOKENIZERS,
                      help="as config.data.tokenizer")
  parser.add_argument('--packing', default='window', choices=config_lib.PACKINGS,
                      help='as config.data.packing')
  parser.add_argument('--seq_len', type=int, default=1024, help='as config.data.seq_len')
  parser.add_argument('--batch_size', type=int, default=32, help='as config.train.batch_size')
  parser.add_argument('--batches', type=int, default=3000, help='batches timed')
  parser.add_argument('--dir', default='/tmp/lm-data-bench',
                      help='where the text and the prepared dataset are written')
  args = parser.parse_args(argv)
  directory = epath.Path(args.dir)
  directory.mkdir(parents=True, exist_ok=True)
  corpus = directory / f'corpus-{args.megabytes}mb.txt'
  make_corpus(corpus, args.megabytes)

  c = config_lib.get_base_config()
  c.data.update(source=f'text:{corpus}', dir=str(directory), tokenizer=args.tokenizer,
                packing=args.packing, seq_len=args.seq_len)
  c.train.update(batch_size=args.batch_size, eval_batch_size=args.batch_size, eval_batches=10)
  start = time.perf_counter()
  data = pipeline.make_data(c, None)
  prepare_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(args.batches):
    next(data.train)
  seconds = time.perf_counter() - start
  print(json.dumps({
      'corpus_mb': round(corpus.stat().length / 2**20, 1), 'tokenizer': args.tokenizer,
      'packing': args.packing, 'seq_len': args.seq_len, 'batch_size': args.batch_size,
      'prepare_s': round(prepare_s, 2),
      'tokens_per_s': round(args.batches * args.batch_size * args.seq_len / seconds),
      'peak_rss_gb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3),
      **_resident(), 'cpus': os.cpu_count()}))


def _resident() -> dict[str, float]:
  """Current resident memory by kind, from /proc/self/status (Linux)."""
  out = {}
  for line in epath.Path('/proc/self/status').read_text().splitlines():
    key, _, value = line.partition(':')
    if key in ('RssFile', 'RssAnon'):
      out[f'rss_{key[3:].lower()}_gb'] = round(int(value.split()[0]) / 1e6, 3)
  return out


if __name__ == '__main__':
  cli.run(main)

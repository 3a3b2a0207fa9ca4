"""What checkpoint checksums cost: save and restore of a train state the size of GPT-2 124M's
(parameters and Adam's two moments in float32, 1.5 GB) through lm.training.checkpoint.Checkpointer,
with checksums and without, in turn.

    python benchmarks/checkpoint_cost.py [--rounds 3] [--dir /tmp]

Prints one JSON line per round and a last one with the medians: save_s (begin to committed,
synchronous) and restore_s (read back, the files checked on a thread beside it), each with
and without checksums (`_plain`), the checkpoint's bytes, and the checksums' own work alone:
write_checksums_s (CRC32C of every file, at save) and verify_s (checking them, at restore).
The restore reads what the save just wrote, mostly from the page cache: a cold read from a
disk or a bucket is slower for both, and the checksums' share smaller.
"""
import json
import os
import statistics
import tempfile
import time

import grain
import jax
import numpy as np
from etils import epath
from orbax.checkpoint._src.path import atomicity_defaults

from lm import cli
from lm.config import arguments
from lm.training import checkpoint, checksums

D, V, T, LAYERS = 768, 50257, 1024, 12   # GPT-2 124M


def gpt2_124m_state(seed: int = 0) -> dict:
  """Random float32 arrays of GPT-2 124M's parameter shapes, and two more of each (Adam)."""
  rng = np.random.default_rng(seed)
  layer = {'qkv': (D, 3 * D), 'qkv_bias': (3 * D,), 'o': (D, D), 'o_bias': (D,),
           'fc': (D, 4 * D), 'fc_bias': (4 * D,), 'proj': (4 * D, D), 'proj_bias': (D,),
           'ln1': (D,), 'ln1_bias': (D,), 'ln2': (D,), 'ln2_bias': (D,)}
  shapes = {'wte': (V, D), 'wpe': (T, D), 'ln_f': (D,), 'ln_f_bias': (D,),
            **{f'h{i}_{k}': s for i in range(LAYERS) for k, s in layer.items()}}
  tree = lambda: {k: rng.standard_normal(s, np.float32) for k, s in shapes.items()}
  return {'params': tree(), 'mu': tree(), 'nu': tree(), 'step': np.int32(1)}


def save_and_restore(directory: epath.Path, state: dict, with_checksums: bool) -> dict:
  default = atomicity_defaults.get_default_temporary_path_class(directory)
  saved = dict(checksums.CHECKSUMMED)
  verify = checksums.verify
  if not with_checksums:   # Orbax's own protocol, nothing verified
    checksums.CHECKSUMMED[default] = default
    checksums.verify = lambda directory: False
  try:
    data = iter(grain.MapDataset.range(4).to_iter_dataset())
    ckpt = checkpoint.Checkpointer(directory, keep=1, async_save=False)
    start = time.perf_counter()
    ckpt.save(1, state, data, {'signature': {}})
    ckpt.wait()
    save_s = time.perf_counter() - start
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
        a.shape, a.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])), state)
    start = time.perf_counter()
    restored = ckpt.restore_latest(target, data, {'signature': {}}, hint='')
    jax.block_until_ready(restored)
    restore_s = time.perf_counter() - start
    ckpt.close()
    timings = {}
    if with_checksums:   # the checksums' own work, alone: writing them, checking the files
      start = time.perf_counter()
      checksums.write(directory / '1')
      timings['write_checksums_s'] = time.perf_counter() - start
      start = time.perf_counter()
      assert checksums.verify(directory / '1')
      timings['verify_s'] = time.perf_counter() - start
  finally:
    checksums.CHECKSUMMED.update(saved)
    checksums.verify = verify
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(directory / '1')
             for f in fs)
  return {'save_s': save_s, 'restore_s': restore_s, 'bytes': size, **timings}


def main(argv: list[str]) -> None:
  parser = arguments.parser('python benchmarks/checkpoint_cost.py', __doc__)
  parser.add_argument('--rounds', type=int, default=3,
                      help='save-and-restore rounds, each with and without checksums')
  parser.add_argument('--dir', default=None, help='where to write (default: a temporary dir)')
  args = parser.parse_args(argv)
  state = jax.device_put(gpt2_124m_state())
  rows = []
  for round_ in range(args.rounds):
    row = {'round': round_}
    for with_checksums in (True, False):
      with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        result = save_and_restore(epath.Path(directory), state, with_checksums)
      suffix = '' if with_checksums else '_plain'
      row.update({f'{k}{suffix}': v for k, v in result.items()})
    row['save_ratio'] = row['save_s'] / row['save_s_plain']
    row['restore_ratio'] = row['restore_s'] / row['restore_s_plain']
    rows.append(row)
    print(json.dumps(row), flush=True)
  keys = [k for k in rows[0] if k != 'round']
  print(json.dumps({'median': {k: statistics.median(r[k] for r in rows) for k in keys},
                    'jax': jax.__version__}))


if __name__ == '__main__':
  cli.run(main)

"""Where the CPU gap to PyTorch comes from: the matmuls of nanoGPT's CPU recipe (768 tokens x
128 channels; qkv, attention output, MLP in and out), forward and both gradients, each timed
alone in XLA (jitted) and in PyTorch (oneDNN), on the same threads. Prints one JSON line.

    python benchmarks/cpu_matmul.py [--tokens 768] [--d 128] [--repeats 200]

Needs torch (the `test` extra).
"""
import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np


def _median_us(fn, args: tuple, repeats: int) -> float:
  fn(*args)
  fn(*args)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn(*args)
    times.append(time.perf_counter() - start)
  return 1e6 * float(np.median(times))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--tokens', type=int, default=768, help='batch x context')
  parser.add_argument('--d', type=int, default=128)
  parser.add_argument('--repeats', type=int, default=200)
  args = parser.parse_args()
  import torch
  rng = np.random.default_rng(0)
  d, n = args.d, args.tokens
  shapes = {'qkv': (d, 3 * d), 'attn_out': (d, d), 'mlp_in': (d, 4 * d), 'mlp_out': (4 * d, d)}
  synced = lambda f: lambda *a: f(*a).block_until_ready()
  xla = [synced(jax.jit(f)) for f in (lambda x, w: x @ w, lambda x, g: x.T @ g,
                                       lambda g, w: g @ w.T)]
  rows, total = {}, {'xla': 0.0, 'torch': 0.0}
  for name, (k, m) in shapes.items():
    x, w, g = (rng.standard_normal(s, dtype=np.float32) for s in ((n, k), (k, m), (n, m)))
    jx, jw, jg = map(jnp.asarray, (x, w, g))
    tx, tw, tg = map(torch.from_numpy, (x, w, g))
    calls = {  # forward, weight gradient, input gradient
        'xla': zip(xla, ((jx, jw), (jx, jg), (jg, jw))),
        'torch': zip([torch.matmul] * 3, ((tx, tw), (tx.T, tg), (tg, tw.T)))}
    rows[name] = {}
    for side, pairs in calls.items():
      us = sum(_median_us(fn, fn_args, args.repeats) for fn, fn_args in pairs)
      rows[name][f'{side}_us'] = round(us, 1)
      total[side] += us
  print(json.dumps({'tokens': n, 'd': d, 'threads': torch.get_num_threads(),
                    'per_layer_fwd_bwd_us': rows,
                    'xla_over_torch': round(total['xla'] / total['torch'], 2)}))


if __name__ == '__main__':
  main()

"""Where the CPU gap to PyTorch comes from: the matmuls of nanoGPT's CPU recipe (768 tokens x
128 channels; qkv, attention output, MLP in and out), forward and both gradients, each timed
in XLA and in PyTorch (MKL) on the same threads. Prints one JSON line.

    python benchmarks/cpu_matmul.py [--tokens 768] [--d 128] [--cpu_devices 2] [--dtype bfloat16]

XLA runs each product `CHAIN` times in one jitted call, every result feeding the next product,
so that the ~60 us of dispatching a jitted call is not counted (a train step pays it once for
~1,100 kernels); PyTorch's eager call is timed as its training loop makes it.
`--cpu_devices N` splits the tokens over N XLA:CPU devices as config.mesh.cpu_devices does.
Needs torch (the `test` extra).
"""
import json
import time

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lm import cli
from lm.config import arguments

CHAIN = 20   # products per timed XLA call


def _median_us(fn, args: tuple, repeats: int, per_call: int = 1) -> float:
  fn(*args)
  fn(*args)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn(*args)
    times.append(time.perf_counter() - start)
  return 1e6 * float(np.median(times)) / per_call


def _xla_products(mesh):
  """Forward, weight-gradient and input-gradient products, each `CHAIN` times in one jitted
  call, unrolled: every product's input nudged by one element of the previous result, so that
  they run one after another, as in a train step, and none is hoisted or merged. (A
  `lax.fori_loop` would copy its carry every iteration.)"""
  # each device multiplies its own tokens (the weight gradient stays per device: the train
  # step's all-reduce of it is not a matmul), with the product's output spec
  products = [(lambda x, w, g: x @ w, P('data')), (lambda x, w, g: x.T @ g, P()),
              (lambda x, w, g: g @ w.T, P('data'))]

  def chained(product, out_spec):
    def run(x, w, g):
      for _ in range(CHAIN):
        out = product(x, w, g)
        x, g = x + 1e-9 * out[0, 0], g + 1e-9 * out[0, 0]   # the unused one is dropped
      return out
    return jax.jit(jax.shard_map(run, mesh=mesh, in_specs=(P('data'), P(), P('data')),
                                 out_specs=out_spec, check_vma=False))
  return [chained(*p) for p in products]


def main(argv: list[str]) -> None:
  parser = arguments.parser('python benchmarks/cpu_matmul.py', __doc__.split('\n')[0])
  parser.add_argument('--tokens', type=int, default=768, help='batch x context')
  parser.add_argument('--d', type=int, default=128, help='the model width (d_model)')
  parser.add_argument('--cpu_devices', type=int, default=0,
                      help='XLA:CPU devices the tokens are split over (0: one)')
  parser.add_argument('--repeats', type=int, default=20, help='timings per product (median)')
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'),
                      help='both sides multiply in it (bfloat16: PyTorch uses AMX where the '
                      'CPU has it)')
  args = parser.parse_args(argv)
  cli.split_cpu(args.cpu_devices)
  import torch
  rng = np.random.default_rng(0)
  d, n = args.d, args.tokens
  mesh = jax.make_mesh((jax.device_count(),), ('data',))
  xla = [lambda *a, f=f: jax.block_until_ready(f(*a)) for f in _xla_products(mesh)]
  shapes = {'qkv': (d, 3 * d), 'attn_out': (d, d), 'mlp_in': (d, 4 * d), 'mlp_out': (4 * d, d)}
  rows, total = {}, {'xla': 0.0, 'torch': 0.0}
  for name, (k, m) in shapes.items():
    x, w, g = (rng.standard_normal(s, dtype=np.float32) for s in ((n, k), (k, m), (n, m)))
    jx, jg = (jax.device_put(a.astype(args.dtype), NamedSharding(mesh, P('data')))
              for a in (x, g))
    jw = jax.device_put(w.astype(args.dtype), NamedSharding(mesh, P()))
    tx, tw, tg = (torch.from_numpy(a).to(getattr(torch, args.dtype)) for a in (x, w, g))
    us = {'xla': sum(_median_us(f, (jx, jw, jg), args.repeats, CHAIN) for f in xla),
          'torch': sum(_median_us(torch.matmul, pair, 10 * args.repeats) for pair in
                       ((tx, tw), (tx.T, tg), (tg, tw.T)))}   # forward, dW, dx
    rows[name] = {f'{side}_us': round(t, 1) for side, t in us.items()}
    total = {side: total[side] + us[side] for side in total}
  print(json.dumps({'tokens': n, 'd': d, 'dtype': args.dtype, 'xla_devices': jax.device_count(),
                    'threads': torch.get_num_threads(), 'per_layer_fwd_bwd_us': rows,
                    'xla_over_torch': round(total['xla'] / total['torch'], 2)}))


if __name__ == '__main__':
  cli.run(main)

"""Truncated SVD of Linear kernels (`python -m lm.lowrank` factors a run with it), and
factored kernels multiplied back out."""
import re

import numpy as np
from flax import traverse_util


def kernels(params, targets: str) -> dict[tuple, np.ndarray]:
  """{module path: kernel} of the targeted Linear modules."""
  flat = traverse_util.flatten_dict(params)
  return {path[:-1]: np.asarray(w, np.float32) for path, w in flat.items()
          if path[-1] == 'kernel' and re.search(targets, '/'.join(path[:-1]))}


def matrices(kernel: np.ndarray, n_in: int, stacked: bool) -> np.ndarray:
  """The kernel as [layers,] inputs x outputs."""
  lead = kernel.shape[:1] if stacked else ()
  rest = kernel.shape[len(lead):]
  return kernel.reshape(*lead, int(np.prod(rest[:n_in])), int(np.prod(rest[n_in:])))


def energy_rank(singular_values: np.ndarray, energy: float) -> int:
  """The smallest rank keeping `energy` of sum(S^2) (for each row of a stack: the largest)."""
  share = np.cumsum(singular_values ** 2, -1) / np.sum(singular_values ** 2, -1, keepdims=True)
  return int(np.max(np.sum(share < energy - 1e-12, -1) + 1))


def folded(params):
  """`params` with every factored kernel multiplied back out (kernel = u @ v), for formats
  that know only dense kernels (Hugging Face export)."""
  flat = traverse_util.flatten_dict(params)
  for path in [p[:-1] for p in flat if p[-1] == 'u']:
    u, v = flat.pop(path + ('u',)), flat.pop(path + ('v',))
    product = lambda u, v: np.tensordot(np.asarray(u), np.asarray(v), 1)
    flat[path + ('kernel',)] = (np.stack([product(a, b) for a, b in zip(u, v)])
                                if path[0] == 'layers' else product(u, v))
  return traverse_util.unflatten_dict(flat)

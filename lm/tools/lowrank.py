"""A run directory whose Linear kernels are replaced by their truncated SVD
(`python -m lm.lowrank` says how)."""
import dataclasses

import flax.linen as nn
import jax
import numpy as np
from etils import epath
from flax import traverse_util

from lm.compress import svd
from lm.config import ConfigError
from lm.model import transformer as model_lib
from lm.training import runs


def compress(workdir: str, out: str, rank: int | None, energy: float | None,
             targets: str) -> dict:
  """Writes the factored run directory `out` (rank `rank`, or the least keeping `energy` of
  every targeted kernel's squared singular values); returns a summary (ranks, sizes)."""
  if (rank is None) == (energy is None):
    raise ConfigError('give one of --rank R or --energy E')
  if energy is not None and not 0 < energy <= 1:
    raise ConfigError(f'--energy={energy} must be in (0, 1]')
  run = runs.load(workdir, '--workdir')
  if run.config.model.lowrank_rank:
    raise ConfigError(f'--workdir={workdir} is already low-rank (rank '
                      f'{run.config.model.lowrank_rank})')
  params = jax.device_get(runs.merged_params(run))
  kernels = svd.kernels(params, targets)
  if not kernels:
    raise ConfigError(f'--targets={targets!r} matches no Linear module')
  # how many leading kernel axes are inputs: u's axes in a factored model, less its rank
  probe = dataclasses.replace(run.model_config, lowrank_rank=1, lowrank_targets=targets)
  shapes = traverse_util.flatten_dict(nn.unbox(jax.eval_shape(
      lambda: model_lib.Transformer(probe).init(jax.random.PRNGKey(0), np.zeros((1, 1), int)))[
          'params']))
  n_in = {path: shapes[path + ('u',)].ndim - 1 - (path[0] == 'layers') for path in kernels}
  svds = {path: np.linalg.svd(svd.matrices(w, n_in[path], path[0] == 'layers'),
                              full_matrices=False) for path, w in kernels.items()}
  if energy is not None:
    rank = max(svd.energy_rank(s, energy) for _, s, _ in svds.values())
  smallest = min(s.shape[-1] for _, s, _ in svds.values())
  if not 0 < rank <= smallest:
    raise ConfigError(f'--rank={rank} must be in 1 .. {smallest} (the smallest targeted '
                      'kernel dimension)')
  config = runs.plain_config(run.config)
  config.model.update(lowrank_rank=rank, lowrank_targets=targets)
  config.quant.scheme = 'none'
  flat = traverse_util.flatten_dict(params)
  kept = []
  for path, (u, s, vt) in svds.items():
    kernel = flat.pop(path + ('kernel',))
    split = (path[0] == 'layers') + n_in[path]   # lead + input axes of the kernel
    root = np.sqrt(s[..., :rank])
    flat[path + ('u',)] = (u[..., :rank] * root[..., None, :]).reshape(
        *kernel.shape[:split], rank)
    flat[path + ('v',)] = (root[..., :, None] * vt[..., :rank, :]).reshape(
        *kernel.shape[:split - n_in[path]], rank, *kernel.shape[split:])
    kept.append(np.min(np.sum(s[..., :rank] ** 2, -1) / np.sum(s ** 2, -1)))
  factored = traverse_util.unflatten_dict(flat)
  count = lambda tree: sum(np.size(x) for x in jax.tree.leaves(tree))
  step_dir = runs.write(epath.Path(out), config, factored, run.tokenizer, int(run.step_dir.name))
  return {'rank': rank, 'kernels': len(kernels), 'min_energy_kept': float(min(kept)),
          'params_before': count(params), 'params_after': count(factored),
          'kernel_params_before': sum(w.size for w in kernels.values()),
          'kernel_params_after': sum(flat[p + ('u',)].size + flat[p + ('v',)].size
                                     for p in kernels), 'out': str(step_dir)}

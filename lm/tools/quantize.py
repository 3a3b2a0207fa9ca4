"""A run directory whose Linear kernels are stored quantized (`python -m lm.quantize`)."""
import pathlib

import jax
from etils import epath

from lm import config as config_lib
from lm.compress import quant
from lm.config import ConfigError
from lm.parallel import sharding
from lm.training import runs, steps


def quantize_run(workdir: str, scheme: str, group_size: int | None, out: str) -> dict:
  """Writes the quantized run directory; returns a summary (sizes in bytes)."""
  if scheme not in quant.SCHEMES:
    raise ConfigError(f'--scheme={scheme!r}: one of {", ".join(quant.SCHEMES)}')
  run = runs.load(workdir, '--workdir')
  if run.config.quant.scheme != 'none':
    raise ConfigError(f'--workdir={workdir} is already quantized ({run.config.quant.scheme})')
  params = jax.device_get(runs.merged_params(run))
  config = runs.plain_config(run.config)
  config.mesh.shape = (-1, 1, 1, 1)
  config.quant.update(scheme=scheme, group_size=group_size or 0)
  config = config_lib.resolve(config, None)
  config_lib.validate(config, 1, training=False)   # a quantized run to read, not to train
  mesh = sharding.make_mesh((1, 1, 1, 1), jax.devices()[:1])
  program = steps.build(config, mesh)
  quantized = quant.quantize_like(params, program.abstract_state.params)
  stored = quant.to_stored(quantized)
  step_dir = runs.write(epath.Path(out), config, jax.device_get(stored), run.tokenizer,
                        int(run.step_dir.name))
  kernels = quant.kernels(quantized)
  kernel_params = quant.param_count(kernels)
  return {'scheme': scheme, 'group_size': config.quant.group_size, 'out': str(step_dir),
          'kernels': len(kernels), 'kernel_params': kernel_params,
          'kernel_bytes_bfloat16': 2 * kernel_params,
          'kernel_bytes_quantized': quant.stored_bytes(jax.eval_shape(quant.to_stored, kernels)),
          'bytes_before': quant.stored_bytes(params), 'bytes_after': quant.stored_bytes(stored),
          'disk_bytes': sum(f.stat().st_size for f in pathlib.Path(step_dir).rglob('*')
                            if f.is_file())}

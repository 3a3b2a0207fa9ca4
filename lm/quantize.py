"""`python -m lm.quantize --workdir RUN --scheme int8|int4|nf4 [--group_size G] --out DIR`:
a run directory whose Linear kernels (config.quant.targets) are stored quantized
(lm/compress/quant.py):
int8 with a scale per output channel (or per group of G inputs), int4 and NF4 with a scale per
group of G inputs (default 32). `lm.evaluate` and `lm.sample` read it like any run. Prints one
JSON line with the sizes in bytes.
"""
import argparse
import json
import pathlib

import jax
from etils import epath

from lm import cli
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
  config_lib.validate(config, 1)
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


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(prog='python -m lm.quantize', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', required=True, help='run directory or RUN/checkpoints/STEP')
  parser.add_argument('--scheme', required=True, help=', '.join(quant.SCHEMES))
  parser.add_argument('--group_size', type=int, help='inputs per scale (default: int8 per '
                      'channel, 32 for int4 / nf4)')
  parser.add_argument('--out', required=True, help='the new run directory')
  args = parser.parse_args(argv)
  print(json.dumps(quantize_run(args.workdir, args.scheme, args.group_size, args.out)))


if __name__ == '__main__':
  cli.run(main)

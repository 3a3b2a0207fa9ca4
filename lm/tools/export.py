"""A run's checkpoint as a plain run directory, LoRA adapters merged (`python -m lm.export`)."""
import jax
from etils import epath

from lm.config import ConfigError
from lm.training import runs


def export(workdir: str, out: str, merge_lora: bool) -> epath.Path:
  """Writes the plain run directory; returns its checkpoint directory."""
  run = runs.load(workdir, '--workdir')
  if 'lora' in run.variables and not merge_lora:
    raise ConfigError(f'--workdir={workdir} holds LoRA adapters: pass --merge_lora to fold '
                      'them into the base kernels')
  params = runs.merged_params(run)
  config = runs.plain_config(run.config)
  config.quant.scheme = 'none'   # merged_params dequantizes (a QLoRA base, a quantized run)
  config.mesh.shape = (-1, 1, 1, 1)
  return runs.write(epath.Path(out), config, jax.device_get(params), run.tokenizer,
                    int(run.step_dir.name))

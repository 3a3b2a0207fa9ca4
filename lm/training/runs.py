"""A run directory read back for use: its config, tokenizer, model and trained variables (for
sampling, scoring with a reward model, export, and as RL's reward)."""
import dataclasses

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from lm import config as config_lib
from lm.compress import quant
from lm.config import ConfigError, RunDir, objective_traits, rundir
from lm.data import tokenizers
from lm.inference import sampler as sample
from lm.model import lora as peft
from lm.model import transformer as model_lib
from lm.parallel import sharding
from lm.training import checkpoint, checksums, steps


@dataclasses.dataclass
class Run:
  config: ml_collections.ConfigDict
  tokenizer: object
  model_config: model_lib.ModelConfig   # unpipelined, layers in logical order
  model: model_lib.Transformer
  variables: dict                       # {'params'[, 'lora']} for model.apply
  step_dir: epath.Path


def load(run_dir: str, field: str, mesh: jax.sharding.Mesh | None = None) -> Run:
  """The newest checkpoint of a run (or RUN/checkpoints/STEP), on `mesh` (default: one
  device); `field` names the flag or config key in error messages."""
  run, step_dir = RunDir.locate(run_dir, field)
  checkpoint.verified(step_dir, field)
  if not run.config.exists():
    raise ConfigError(f'{field}={run_dir}: no config.json in {run.path}')
  config = config_lib.saved(run.path)
  if objective_traits.of(config).teacher:   # the student alone: no teacher needed to use it
    config.train.objective = objective_traits.NEXT_TOKEN[config.data.format]
  stages = config.mesh.shape[3] if config.mesh.shape[3] > 0 else 1
  config.mesh.shape = (1, 1, 1, 1)
  mesh = mesh or sharding.make_mesh((1, 1, 1, 1), jax.devices()[:1])
  program = steps.build(config, mesh)
  abstract = program.abstract_state.params
  params = quant.from_stored(_restore(step_dir / rundir.STATE, {
      'params': quant.stored_target(abstract)})['params'], abstract)
  program = program.with_frozen(load_frozen(run.path, program, only=('base',)))   # no reference
  # a circular pipeline stored its layers stage-major: put them in logical order once
  stored = dataclasses.replace(program.model_config, pipeline_stages=stages)
  variables = sample.in_logical_order(stored, program.variables(params))
  tokenizer = tokenizers.load(run.tokenizer, config.data.tokenizer)
  return Run(config, tokenizer, program.model_config, program.model, variables, step_dir)


def merged_params(run: Run):
  """The run's parameters as float kernels: quantized ones dequantized, LoRA adapters (if
  any) folded in."""
  params = quant.dequantize(run.variables['params'])
  if 'lora' in run.variables:
    params = peft.merge_lora(params, run.variables['lora'],
                             peft.effective_alpha(run.config.lora), run.config.lora.rank)
  return params


def plain_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` (changed in place) as the config of a loaded run's merged parameters: no LoRA
  adapters (folded in) nor start run, the layers in logical order (as `load` put them). The
  quantization stays as the caller sets it."""
  config.lora.update(rank=0, train_also='')
  config.train.init_from = ''
  config.model.pipeline_repeats = 1
  return config


def write(target: epath.Path, config: ml_collections.ConfigDict, params, tokenizer,
          step: int) -> epath.Path:
  """A plain run directory (config.json, tokenizer, checkpoints/STEP/state with the
  parameters only) that config.train.init_from, `lm.sample` and evaluation read; returns
  the checkpoint's directory."""
  run = RunDir(target)
  if run.checkpoints.exists():
    raise ConfigError(f'{run.path} already holds checkpoints')
  run.path.mkdir(parents=True, exist_ok=True)
  run.config.write_text(config.to_json_best_effort(indent=2))
  tokenizer.save(run.tokenizer)
  step_dir = run.step(step)
  ocp.PyTreeCheckpointer().save(step_dir / rundir.STATE, {'params': params})
  if jax.process_index() == 0:
    checksums.write(step_dir)
  return step_dir


def load_frozen(directory: epath.Path, program: steps.Program, only=None) -> dict:
  """The frozen variables saved in a run directory ({} when the run has none); `only` picks
  entries ('base', 'reference')."""
  target = {k: v for k, v in program.abstract_frozen.items() if only is None or k in only}
  if not target:
    return {}
  path = RunDir(directory).frozen
  if not path.exists():
    raise ConfigError(f'{directory} has no {path.name}/ (the frozen base or reference)')
  checkpoint.verified(path, str(directory))
  return quant.from_stored(_restore(path, quant.stored_target(target)), target)


def save_frozen(directory: epath.Path, frozen: dict) -> None:
  checkpointer = ocp.StandardCheckpointer()
  path = RunDir(directory).frozen
  checkpointer.save(path, quant.to_stored(frozen))   # a QLoRA base quantized
  checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    checksums.write(path)


def _restore(path: epath.Path, target):
  """The entries of `target` (ShapeDtypeStructs with shardings) from an Orbax checkpoint."""
  return ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=True))

"""The config's rules, one function per section, all run by `validate`: once before any I/O
(the vocabulary still unknown, -1) and once after the tokenizer is built, with its size.
Each raises ConfigError naming the field. Sections run in the order of SECTIONS: later ones
divide by values the earlier ones checked."""
import ml_collections

from lm.config import base, objective_traits
from lm.config.checks import ConfigError, one_of

QUANT_SCHEMES = ('none', 'int8', 'int4', 'nf4')
# optimizers whose update per weight is about lr whatever its gradient's scale (Adam's rule of
# muP applies: hidden weights' rate / width multiplier); SGD and Adafactor scale differently
MUP_OPTIMIZERS = ('adamw', 'adam', 'lion')


def validate(c: ml_collections.ConfigDict, device_count: int, vocab_size: int | None = None,
             training: bool = True) -> None:
  """Raises ConfigError for the first bad value of a resolved config. `vocab_size`: the
  tokenizer's, once it is known; `training`: the config is a run to train (not a run directory
  being written, such as a quantized copy)."""
  for check in SECTIONS:
    check(c)
  _mesh(c, device_count)
  if vocab_size is not None:
    _vocabulary(c, vocab_size)
  if training and c.quant.scheme != 'none' and not c.lora.rank:
    raise ConfigError(f'config.quant.scheme={c.quant.scheme!r} trains only LoRA adapters on '
                      'the quantized base (QLoRA): set config.lora.rank > 0')


def _model(c: ml_collections.ConfigDict) -> None:
  m = c.model
  one_of('model.remat', m.remat, base.REMAT_POLICIES)
  one_of('model.attention', m.attention, base.ATTENTION_IMPLEMENTATIONS)
  one_of('model.positions', m.positions, ('learned', 'rope'))
  one_of('model.norm', m.norm, ('layernorm', 'rmsnorm'))
  one_of('model.mlp', m.mlp, ('gelu', 'swiglu'))
  for name in ('n_layers', 'd_model', 'n_heads', 'n_kv_heads', 'd_ff', 'vocab_multiple'):
    if m[name] <= 0:
      raise ConfigError(f'config.model.{name}={m[name]} must be positive')
  if m.d_model % m.n_heads:
    raise ConfigError(f'config.model.d_model={m.d_model} is not divisible by '
                      f'config.model.n_heads={m.n_heads}')
  if m.n_heads % m.n_kv_heads:
    raise ConfigError(f'config.model.n_heads={m.n_heads} is not divisible by '
                      f'config.model.n_kv_heads={m.n_kv_heads}')
  if m.positions == 'rope' and (m.d_model // m.n_heads) % 2:
    raise ConfigError(f'rope needs an even head dimension, got config.model.d_model / n_heads '
                      f'= {m.d_model // m.n_heads}')
  if m.lowrank_rank < 0:
    raise ConfigError(f'config.model.lowrank_rank={m.lowrank_rank} must be >= 0')
  if m.attention_window is not None and (m.attention_window <= 0 or not m.causal):
    raise ConfigError(f'config.model.attention_window={m.attention_window} must be a positive '
                      'number of positions, on a causal model (config.model.causal=True)')
  if m.attention_global_every < 0 or (m.attention_global_every and not m.attention_window):
    raise ConfigError(f'config.model.attention_global_every={m.attention_global_every} must be '
                      '>= 0, and > 0 only with config.model.attention_window')
  if m.attention == 'cudnn' and m.dtype not in ('bfloat16', 'float16'):
    raise ConfigError(f"config.model.attention='cudnn' needs a 16-bit config.model.dtype, "
                      f'got {m.dtype!r}')
  one_of('model.parametrization', m.parametrization, ('sp', 'mup'))
  if m.parametrization == 'mup':
    _mup(c)


def _mup(c: ml_collections.ConfigDict) -> None:
  m = c.model
  if m.mup_base_width <= 0 or m.mup_base_width % m.n_heads:
    raise ConfigError(f"config.model.mup_base_width={m.mup_base_width} must be a positive "
                      f'multiple of config.model.n_heads={m.n_heads} under '
                      "parametrization='mup' (the width where muP equals SP, with whole heads)")
  if c.optim.name not in MUP_OPTIMIZERS:
    raise ConfigError(f"config.model.parametrization='mup' scales the learning rates of Adam-"
                      f'like optimizers ({", ".join(MUP_OPTIMIZERS)}), got config.optim.name='
                      f'{c.optim.name!r}')


def _data(c: ml_collections.ConfigDict) -> None:
  d = c.data
  if not (d.tokenizer.startswith('hf:') and len(d.tokenizer) > 3):
    one_of('data.tokenizer', d.tokenizer, base.TOKENIZERS + ('hf:PATH',))
  one_of('data.packing', d.packing, base.PACKINGS)
  one_of('data.format', d.format, base.DATA_FORMATS)
  one_of('data.overlong', d.overlong, ('truncate', 'error'))
  if d.seq_len > c.model.max_len:
    raise ConfigError(f'config.data.seq_len={d.seq_len} is longer than the model\'s '
                      f'config.model.max_len={c.model.max_len} positions')
  if not sum(d.split_fractions) <= 1.0 + 1e-9 or min(d.split_fractions) <= 0:
    raise ConfigError(f'config.data.split_fractions={tuple(d.split_fractions)} must be three '
                      'positive fractions summing to at most 1')


def _train(c: ml_collections.ConfigDict) -> None:
  t = c.train
  for name in ('steps', 'batch_size', 'grad_accum_steps', 'eval_every', 'checkpoint_every',
               'log_every', 'eval_batch_size', 'keep_checkpoints'):
    if t[name] <= 0:
      raise ConfigError(f'config.train.{name}={t[name]} must be positive')
  if t.batch_size % t.grad_accum_steps:
    raise ConfigError(f'config.train.batch_size={t.batch_size} is not divisible by '
                      f'config.train.grad_accum_steps={t.grad_accum_steps}')


def _optim(c: ml_collections.ConfigDict) -> None:
  o = c.optim
  one_of('optim.name', o.name, base.OPTIMIZERS)
  one_of('optim.schedule', o.schedule, base.SCHEDULES)
  one_of('optim.nonfinite_skip', o.nonfinite_skip, ('auto', 'select', 'branch'))
  if o.name == 'adam' and o.weight_decay:
    raise ConfigError(f"config.optim.name='adam' ignores config.optim.weight_decay="
                      f"{o.weight_decay}: use name='adamw' (decoupled decay) or weight_decay=0")
  if not 0 <= o.warmup_steps < o.decay_steps:
    raise ConfigError(f'config.optim.warmup_steps={o.warmup_steps} must be at least 0 and less '
                      f'than config.optim.decay_steps={o.decay_steps} (0 means train.steps)')


def _objective(c: ml_collections.ConfigDict) -> None:
  """The objective's traits against the data, the model and the runs it reads (mlm, distill)."""
  t, d = c.train, c.data
  traits = objective_traits.of(c)
  if d.format != traits.data_format:
    raise ConfigError(f'config.train.objective={t.objective!r} reads config.data.format='
                      f'{traits.data_format!r}, got {d.format!r}')
  if d.format != 'text' and not d.source.startswith('jsonl:'):
    raise ConfigError(f'config.data.format={d.format!r} needs config.data.source=jsonl:PATH, '
                      f'got {d.source!r}')
  if d.format in ('preference', 'prompt') and d.packing == 'pack':
    raise ConfigError(f"config.data.packing='pack' packs text or sft examples, not "
                      f'{d.format!r} ones (one example per row)')
  if not traits.causal and c.model.causal:
    raise ConfigError(f'config.train.objective={t.objective!r} needs a bidirectional model: '
                      'config.model.causal=False')
  if traits.mask_token and not 0 < c.mlm.rate < 1:
    raise ConfigError(f'config.mlm.rate={c.mlm.rate} must be in (0, 1)')
  if traits.teacher:
    if not c.distill.teacher:
      raise ConfigError(f'config.train.objective={t.objective!r} needs '
                        'config.distill.teacher=RUN_DIR')
    if c.distill.temperature <= 0 or not 0 <= c.distill.kl_weight <= 1:
      raise ConfigError(f'config.distill.temperature={c.distill.temperature} must be > 0 and '
                        f'config.distill.kl_weight={c.distill.kl_weight} in [0, 1]')
  if traits.reference and not t.init_from:
    raise ConfigError(f'config.train.objective={t.objective!r} needs config.train.init_from '
                      '(the run whose model is the policy\'s start and the frozen reference)')


def _lora(c: ml_collections.ConfigDict) -> None:
  lora = c.lora
  if lora.rank < 0 or (lora.rank and lora.alpha <= 0):
    raise ConfigError(f'config.lora.rank={lora.rank} must be >= 0 and config.lora.alpha='
                      f'{lora.alpha} > 0')
  if lora.train_also and (not lora.rank or c.quant.scheme != 'none'):
    raise ConfigError(f'config.lora.train_also={lora.train_also!r} trains parameters beside '
                      'LoRA adapters: it needs config.lora.rank > 0 and no config.quant.scheme '
                      '(the frozen base would hold them quantized)')
  if lora.rank and objective_traits.of(c).scalar_head:
    raise ConfigError(f'config.lora.rank={lora.rank} with config.train.objective='
                      f'{c.train.objective!r}: its scalar head would stay frozen; use full '
                      'training')


def _quant(c: ml_collections.ConfigDict) -> None:
  """Scales group inputs along each kernel's innermost contracted axis: d_model (q, kv, wi),
  head_dim (o) and d_ff (wo); a group size must divide each."""
  q, m = c.quant, c.model
  one_of('quant.scheme', q.scheme, QUANT_SCHEMES)
  if q.group_size < 0:
    raise ConfigError(f'config.quant.group_size={q.group_size} must be >= 0')
  for name, size in (('d_model', m.d_model), ('head_dim', m.d_model // m.n_heads),
                     ('d_ff', m.d_ff)):
    if q.scheme != 'none' and q.group_size and size > 0 and size % q.group_size:
      raise ConfigError(f'config.quant.group_size={q.group_size} does not divide model.{name}='
                        f'{size}, an axis the groups run along')


def _prune(c: ml_collections.ConfigDict) -> None:
  p = c.prune
  one_of('prune.method', p.method, ('none', 'magnitude', 'nm'))
  if p.method == 'none':
    return
  one_of('prune.schedule', p.schedule, ('oneshot', 'gradual'))
  one_of('prune.scope', p.scope, ('layer', 'global'))
  if not 0 <= p.sparsity < 1:
    raise ConfigError(f'config.prune.sparsity={p.sparsity} must be in [0, 1)')
  if p.method == 'nm' and not 0 < p.n < p.m:
    raise ConfigError(f'config.prune.n={p.n} must be in 1 .. config.prune.m - 1 = {p.m - 1}')
  if p.method == 'nm' and p.schedule != 'oneshot':
    raise ConfigError("config.prune.method='nm' prunes one-shot: config.prune.schedule='oneshot'")
  m = c.model   # N:M groups run along each kernel's first input axis
  for name, size in (('d_model', m.d_model), ('n_heads', m.n_heads), ('d_ff', m.d_ff)):
    if p.method == 'nm' and size > 0 and size % p.m:
      raise ConfigError(f'config.prune.m={p.m} does not divide model.{name}={size}, an axis the '
                        'groups run along')
  if c.lora.rank:
    raise ConfigError('config.prune with config.lora.rank > 0: the pruned base would stay frozen')


def _rl(c: ml_collections.ConfigDict) -> None:
  traits, rl, t = objective_traits.of(c), c.rl, c.train
  if not traits.rollouts:
    return
  kind, _, target = rl.reward.partition(':')
  if kind not in ('model', 'python') or not target:
    raise ConfigError(f"config.rl.reward={rl.reward!r} must be 'model:RUN_DIR' or "
                      "'python:module:function'")
  if rl.group_size < 1 or t.batch_size % rl.group_size:
    raise ConfigError(f'config.train.batch_size={t.batch_size} is not a multiple of '
                      f'config.rl.group_size={rl.group_size} (completions per prompt)')
  if traits.group_relative and rl.group_size < 2:
    raise ConfigError(f'config.rl.group_size must be at least 2 for {t.objective!r} '
                      '(advantages are relative to the group)')
  k = rl.updates_per_rollout
  for name in ('steps', 'checkpoint_every'):
    if k < 1 or t[name] % k:
      raise ConfigError(f'config.train.{name}={t[name]} is not a multiple of '
                        f'config.rl.updates_per_rollout={k} (checkpoints fall between rollouts)')
  if rl.max_new_tokens < 1 or rl.max_new_tokens >= c.model.max_len:
    raise ConfigError(f'config.rl.max_new_tokens={rl.max_new_tokens} must be in 1 .. '
                      f'config.model.max_len - 1 = {c.model.max_len - 1}')


def _mesh(c: ml_collections.ConfigDict, device_count: int) -> None:
  """The mesh against the devices, and what it splits: the batches and the model's axes."""
  m, t = c.model, c.train
  if c.mesh.cpu_devices < 0:
    raise ConfigError(f'config.mesh.cpu_devices={c.mesh.cpu_devices} must be 0 (one CPU device) '
                      'or the number of devices to split the CPU into')
  data, fsdp, tensor, stage = base.mesh_shape(c, device_count)
  micro = t.batch_size // t.grad_accum_steps
  if micro % (data * fsdp):
    raise ConfigError(f'global batch (config.train.batch_size={t.batch_size} / grad_accum_steps='
                      f'{t.grad_accum_steps}) is not divisible by data x fsdp = {data * fsdp}')
  if stage > 1:
    _pipeline(c, stage, micro, data * fsdp)
  if t.eval_batch_size % (data * fsdp):
    raise ConfigError(f'config.train.eval_batch_size={t.eval_batch_size} is not divisible by '
                      f'data x fsdp = {data * fsdp}')
  for name in ('n_heads', 'n_kv_heads', 'd_ff', 'vocab_size'):
    if m[name] % tensor and m[name] != -1:   # vocab_size is -1 until the tokenizer is built
      raise ConfigError(f'config.model.{name}={m[name]} is not divisible by the tensor mesh '
                        f'axis ({tensor}); change config.mesh.shape or config.model.{name}'
                        + (' (see vocab_multiple)' if name == 'vocab_size' else ''))
  if m.d_model % fsdp:
    raise ConfigError(f'config.model.d_model={m.d_model} is not divisible by the fsdp mesh axis '
                      f'({fsdp})')


def _pipeline(c: ml_collections.ConfigDict, stages: int, batch: int, batch_shards: int) -> None:
  m = c.model
  if not m.scan_layers:
    raise ConfigError('pipeline stages (config.mesh.shape stage > 1) need '
                      'config.model.scan_layers=True')
  if m.attention_global_every:
    raise ConfigError('config.model.attention_global_every with pipeline stages is not '
                      'supported (the stages apply one layer body)')
  if m.n_layers % (stages * m.pipeline_repeats):
    raise ConfigError(f'config.model.n_layers={m.n_layers} is not divisible by the '
                      f'{stages} pipeline stages of config.mesh.shape x '
                      f'config.model.pipeline_repeats={m.pipeline_repeats}')
  if m.pipeline_repeats > 1 and m.pipeline_microbatches < stages:
    raise ConfigError(f'a circular pipeline (config.model.pipeline_repeats='
                      f'{m.pipeline_repeats}) needs config.model.pipeline_microbatches='
                      f'{m.pipeline_microbatches} >= the {stages} stages')
  micro = m.pipeline_microbatches
  for name, size in (('the batch', batch),
                     ('config.train.eval_batch_size', c.train.eval_batch_size)):
    if micro < 1 or size % micro or (size // micro) % batch_shards:
      raise ConfigError(f'{name} of {size} sequences does not split into '
                        f'config.model.pipeline_microbatches={micro} microbatches divisible by '
                        f'data x fsdp = {batch_shards}')


def _vocabulary(c: ml_collections.ConfigDict, tokenizer_size: int) -> None:
  """The model's vocabulary holds every id of the tokenizer (and [MASK] for masked LM)."""
  mask_token = objective_traits.of(c).mask_token
  needed = tokenizer_size + int(mask_token)
  if c.model.vocab_size < needed:
    raise ConfigError(f'config.model.vocab_size={c.model.vocab_size} is smaller than the '
                      f'{needed} ids of the {c.data.tokenizer!r} tokenizer'
                      + (' and [MASK]' if mask_token else ''))


# train before objective (which reads train.objective's traits), model before data / quant /
# prune / rl / mesh (they divide by or compare with its sizes)
SECTIONS = (_model, _data, _train, _optim, _objective, _lora, _quant, _prune, _rl)

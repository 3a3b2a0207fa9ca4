"""Validation of the post-training and compression sections of the config: objectives and
their data formats, LoRA, RL, quantization and pruning (`lm.config.validate` calls it)."""
import ml_collections

from lm.config import objective_traits
from lm.config.checks import ConfigError, one_of


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for the first bad post-training or compression value."""
  t, d, lora, rl = c.train, c.data, c.lora, c.rl
  traits = objective_traits.of(c)
  wanted = traits.data_format
  if d.format != wanted:
    raise ConfigError(f'config.train.objective={t.objective!r} reads config.data.format='
                      f'{wanted!r}, got {d.format!r}')
  if d.format != 'text' and not d.source.startswith('jsonl:'):
    raise ConfigError(f'config.data.format={d.format!r} needs config.data.source=jsonl:PATH, '
                      f'got {d.source!r}')
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
  if lora.rank < 0 or (lora.rank and lora.alpha <= 0):
    raise ConfigError(f'config.lora.rank={lora.rank} must be >= 0 and config.lora.alpha='
                      f'{lora.alpha} > 0')
  if lora.train_also and (not lora.rank or c.quant.scheme != 'none'):
    raise ConfigError(f'config.lora.train_also={lora.train_also!r} trains parameters beside '
                      'LoRA adapters: it needs config.lora.rank > 0 and no config.quant.scheme '
                      '(the frozen base would hold them quantized)')
  _validate_quant(c)
  _validate_prune(c)
  if lora.rank and traits.scalar_head:
    raise ConfigError(f'config.lora.rank={lora.rank} with config.train.objective='
                      f'{t.objective!r}: its scalar head would stay frozen; use full training')
  if traits.rollouts:
    kind = rl.reward.partition(':')[0]
    if kind not in ('model', 'python') or not rl.reward.partition(':')[2]:
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
  if d.format in ('preference', 'prompt') and d.packing == 'pack':
    raise ConfigError(f"config.data.packing='pack' packs text or sft examples, not "
                      f'{d.format!r} ones (one example per row)')


QUANT_SCHEMES = ('none', 'int8', 'int4', 'nf4')


def _validate_quant(c: ml_collections.ConfigDict) -> None:
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


def _validate_prune(c: ml_collections.ConfigDict) -> None:
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

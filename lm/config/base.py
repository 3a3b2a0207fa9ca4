"""The base config: every value the library reads, with its default.

Experiments start from `get_base_config()` and override numbers. `resolve()` fills the
values derived from others (written as 0 / -1 here) so the saved config states every
number a run used; `lm.config.validation` rejects bad input with one line naming the field,
before anything compiles.
"""
import json
import math
import os

import ml_collections

from lm.config import objective_traits, rundir
from lm.config.checks import ConfigError

MESH_AXES = ('data', 'fsdp', 'tensor', 'stage')
OPTIMIZERS = ('adamw', 'adam', 'adafactor', 'lion', 'sgd')
SCHEDULES = ('cosine', 'wsd', 'constant')
REMAT_POLICIES = ('none', 'full', 'dots', 'dots_no_batch', 'everything', 'save_attention')
ATTENTION_IMPLEMENTATIONS = ('xla', 'xla_bf16', 'cudnn', 'splash', 'reference')
TOKENIZERS = ('char', 'byte', 'spm_bpe', 'spm_unigram')
PACKINGS = ('window', 'pack')
OBJECTIVES = tuple(objective_traits.TRAITS)
DATA_FORMATS = ('text', 'sft', 'preference', 'prompt')
DEFAULT_DATA_DIR = os.path.join(os.path.expanduser('~'), '.cache', 'lm', 'data')


def get_base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict(dict(
      vocab_size=-1,          # -1: taken from the tokenizer
      vocab_multiple=1,       # pad the vocabulary to a multiple of this (for sharding / MXU tiles)
      n_layers=4,
      d_model=128,
      n_heads=4,
      n_kv_heads=0,           # 0: n_heads (multi-head); fewer gives grouped-query attention
      d_ff=0,                 # 0: 4 * d_model
      max_len=0,              # positions the model supports; 0: data.seq_len
      causal=True,            # False: bidirectional encoder (masked-LM)
      positions='learned',    # 'learned' (GPT-2) | 'rope' (Llama)
      rope_theta=10000.0,
      norm='layernorm',       # 'layernorm' | 'rmsnorm'
      norm_eps=1e-5,
      mlp='gelu',             # 'gelu' | 'swiglu'
      use_bias=True,
      tie_embeddings=True,
      init_std=0.02,
      # 'sp': standard parametrization; 'mup': maximal update parametrization (Yang et al.
      # 2022), equal to 'sp' at d_model = mup_base_width, whose best learning rate carries
      # over to wider models (hidden dimensions scaled with d_model, n_heads fixed)
      parametrization='sp',
      mup_base_width=0,       # with 'mup': the width where muP equals SP (a multiple of n_heads)
      dropout=0.0,
      dtype='bfloat16',       # compute dtype; logits and loss are always float32
      param_dtype='float32',
      attention='xla',        # one of ATTENTION_IMPLEMENTATIONS
      # causal sliding-window attention: each query sees this many positions (itself
      # included); None: all earlier positions
      attention_window=ml_collections.config_dict.placeholder(int),
      attention_global_every=0,   # > 0 with a window: every this-many-th layer attends to all
      # > 0: the Linear kernels matching lowrank_targets are factored, kernel = u @ v with
      # rank lowrank_rank (python -m lm.lowrank writes them from a trained run's SVD)
      lowrank_rank=0,
      lowrank_targets='attn/(q|kv|o)|mlp/(wi|wo)',
      remat='none',           # one of REMAT_POLICIES
      scan_layers=True,
      pipeline_microbatches=1,  # microbatches in flight when config.mesh.shape has stages > 1
      pipeline_repeats=1,     # > 1: circular pipeline, each stage holds this many layer chunks
      # True: the architecture (ARCHITECTURE fields) and config.data.tokenizer are those of
      # the run config.train.init_from (fine-tuning an imported model without restating it)
      from_init_from=False,
  ))

  c.data = ml_collections.ConfigDict(dict(
      # 'shakespeare' (shipped with the package), 'text:PATH', 'jsonl:PATH' or 'tfds:NAME'
      source='shakespeare',
      text_key='text',        # field holding the text in JSONL lines and TFDS examples
      split_fractions=(0.9, 0.05, 0.05),  # train / validation / test, for local files
      tfds_splits=('train', 'validation', 'test'),  # split names for tfds:NAME sources
      # where prepared data goes (TFDS array_record files, token files, downloads of tfds:NAME
      # sources); '' : DEFAULT_DATA_DIR. Shared by runs: prepared once per corpus and tokenizer.
      dir='',
      tokenizer='char',       # one of TOKENIZERS, or hf:PATH (a Hugging Face tokenizer.json)
      spm_vocab_size=1024,    # for spm_* tokenizers, trained on the train split
      seq_len=64,
      packing='window',       # 'window': random windows of a token stream; 'pack': streamed docs
      window_stride=1,        # distance between the starts of candidate training windows
      add_eos=False,          # append an end-of-document token after every document
      # what a jsonl:PATH line holds: 'text' (config.data.text_key), 'sft' ({"prompt",
      # "response"} or {"messages": [{"role", "content"}, ...]}), 'preference' ({"prompt",
      # "chosen", "rejected"}) or 'prompt' ({"prompt", ...} for RL); see lm/data/examples.py
      format='text',
      overlong='truncate',    # an example longer than seq_len + 1 tokens: 'truncate' | 'error'
  ))

  c.optim = ml_collections.ConfigDict(dict(
      name='adamw',           # one of OPTIMIZERS
      lr=1e-3,
      min_lr=1e-4,            # floor of the cosine / wsd decay
      schedule='cosine',      # one of SCHEDULES
      warmup_steps=100,
      decay_steps=0,          # 0: train.steps
      wsd_decay_fraction=0.2, # last fraction of decay_steps spent decaying in 'wsd'
      b1=0.9,
      b2=0.99,
      eps=1e-8,
      weight_decay=0.1,
      decay_embeddings=True,  # weight decay on embedding tables (never on biases / norms)
      clip_norm=1.0,          # 0: no clipping
      max_nonfinite_steps=5,  # stop after this many non-finite updates in a row
      # how a non-finite update is skipped: 'select' (element by element), 'branch'
      # (lax.cond), 'auto': a branch on CPU meshes, else a select (lm.training.optim.skip_nonfinite)
      nonfinite_skip='auto',
  ))

  c.train = ml_collections.ConfigDict(dict(
      steps=2000,
      batch_size=12,          # global batch, in sequences
      grad_accum_steps=1,     # microbatches per step (batch_size must divide)
      seed=1337,
      log_every=50,
      eval_every=250,
      eval_batches=100,       # at most this many validation / test batches
      eval_batch_size=12,
      checkpoint_every=500,
      keep_checkpoints=3,
      async_checkpoints=True,
      # RUN_DIR or RUN_DIR/checkpoints/STEP: start from that run's parameters (and tokenizer),
      # not its optimizer state, step or data position; ignored once this run has checkpoints
      init_from='',
      objective='lm',         # a row of lm/config/objective_traits.py: what the loop minimises
  ))

  c.mlm = ml_collections.ConfigDict(dict(
      rate=0.15,              # positions chosen per sequence (80% [MASK], 10% random, 10% kept)
      mask_id=-1,             # -1: the tokenizer's vocabulary size, an id added for [MASK]
  ))

  c.distill = ml_collections.ConfigDict(dict(
      teacher='',             # RUN_DIR (or RUN_DIR/checkpoints/STEP) of the frozen teacher
      temperature=2.0,        # softens both distributions; the KL term is scaled by T^2
      kl_weight=0.5,          # loss = (1 - w) x cross-entropy + w x T^2 x KL(teacher || student)
  ))

  c.lora = ml_collections.ConfigDict(dict(
      rank=0,                 # > 0: train low-rank adapters only; the base stays frozen
      alpha=16.0,             # the update is scaled by alpha / rank
      rslora=False,           # rank-stabilised LoRA (Kalajdzievski 2023): alpha / sqrt(rank)
      # parameters trained in full beside the adapters (PEFT's modules_to_save), a regex
      # searched in parameter paths, e.g. 'embed|head': where the adapters alone cannot reach
      train_also='',
      targets='attn/(q|kv|o)|mlp/(wi|wo)',   # regex searched in module paths, e.g. layers/attn/q
  ))

  # weight-only quantization (python -m lm.quantize writes quantized runs); with
  # config.lora.rank > 0 the frozen base is quantized and the adapters train on it (QLoRA)
  c.quant = ml_collections.ConfigDict(dict(
      scheme='none',          # 'none' | 'int8' | 'int4' | 'nf4'
      group_size=0,           # inputs per scale; 0: int8 one per output channel, 4-bit 32
      targets='attn/(q|kv|o)|mlp/(wi|wo)',   # regex searched in module paths, as lora.targets
  ))

  # pruning while fine-tuning a config.train.init_from run (lm/compress/prune.py)
  c.prune = ml_collections.ConfigDict(dict(
      method='none',          # 'none' | 'magnitude' | 'nm' (N:M structured)
      sparsity=0.5,           # magnitude: the fraction of targeted weights set to zero
      n=2, m=4,               # nm: n weights kept of every m along a kernel's first input axis
      schedule='oneshot',     # 'oneshot' (at the start) | 'gradual' (cubic, Zhu & Gupta 2017)
      scope='layer',          # magnitude: 'layer' (each kernel of each layer) | 'global'
      start_step=0,           # gradual: sparsity rises from 0 at start_step ...
      end_step=0,             # ... to config.prune.sparsity at end_step (0: train.steps)
      update_every=10,        # gradual: masks recomputed every this many steps
      targets=r'(attn/(q|kv|o)|mlp/(wi|wo))/kernel',   # regex searched in parameter paths
  ))

  c.dpo = ml_collections.ConfigDict(dict(
      beta=0.1,               # strength of the implicit KL to the reference
      label_smoothing=0.0,    # assumed probability that a preference label is flipped
      sft_weight=0.0,         # > 0: plus this times the chosen answer's token NLL (RPO)
  ))

  c.rl = ml_collections.ConfigDict(dict(
      # 'model:RUN_DIR' (a reward-model run) or 'python:module:function', called as
      # function(prompt: str, completion: str, example: dict) -> float
      reward='',
      group_size=4,           # completions sampled per prompt (train.batch_size counts them)
      max_new_tokens=32,
      temperature=1.0,
      top_k=0,
      top_p=1.0,
      stop='',                # completions are cut before this string (and at EOS)
      kl_coef=0.04,           # weight of the k3 estimate of KL(policy || reference)
      clip_eps=0.2,           # ratio clipping of the policy loss
      updates_per_rollout=1,  # optimizer steps on each batch of rollouts (PPO epochs)
      gamma=1.0,              # PPO: discount
      gae_lambda=0.95,        # PPO: generalised advantage estimation
      value_coef=0.5,         # PPO: weight of the value loss
      value_clip=0.2,         # PPO: clipping of the value update
  ))

  c.mesh = ml_collections.ConfigDict(dict(
      shape=(-1, 1, 1, 1),    # sizes of MESH_AXES; one may be -1 (all remaining devices)
      # > 0: the commands that train (lm.main, benchmarks/throughput.py) split a host without
      # accelerators into this many XLA:CPU devices, so that the data axis keeps every core
      # busy through the whole step (see lm.cli.split_cpu); 0: JAX's one CPU device
      cpu_devices=0,
      # logical axis -> mesh axes. Parameters: embed, mlp, heads, kv_heads, head_dim, vocab,
      # layers; activations: batch, length, act_embed, act_heads, act_mlp, act_vocab, stage.
      rules=(
          ('batch', ('data', 'fsdp')),
          ('embed', 'fsdp'),
          ('mlp', 'tensor'),
          ('heads', 'tensor'),
          ('kv_heads', 'tensor'),
          ('vocab', 'tensor'),
          ('act_heads', 'tensor'),
          ('act_kv_heads', 'tensor'),
          ('act_mlp', 'tensor'),
          ('act_vocab', 'tensor'),
          ('layers', 'stage'),
          ('stage', 'stage'),
          ('head_dim', None),
          ('length', None),
          ('act_embed', None),
      ),
  ))

  c.sample = ml_collections.ConfigDict(dict(
      num_tokens=200,         # printed at the end of training; 0 to skip
      prompt='\n',
      temperature=0.8,
      top_k=0,                # 0: no top-k filter
      top_p=1.0,
  ))
  return c


def resolve(c: ml_collections.ConfigDict, vocab_size: int | None) -> ml_collections.ConfigDict:
  """Returns a locked copy with every derived value (written 0 / -1 above) filled in; the
  vocabulary size stays -1 until the tokenizer's `vocab_size` is given."""
  c = ml_collections.ConfigDict(c.to_dict())
  m = c.model
  mask_token = objective_traits.of(c).mask_token
  if mask_token and c.mlm.mask_id == -1 and vocab_size is not None:
    c.mlm.mask_id = vocab_size
  if m.vocab_size == -1 and vocab_size is not None:
    m.vocab_size = vocab_size + int(mask_token)   # + [MASK]
  if m.vocab_size > 0:
    m.vocab_size = math.ceil(m.vocab_size / m.vocab_multiple) * m.vocab_multiple
  m.n_kv_heads = m.n_kv_heads or m.n_heads
  m.d_ff = m.d_ff or 4 * m.d_model
  m.max_len = m.max_len or c.data.seq_len
  c.optim.decay_steps = c.optim.decay_steps or c.train.steps
  if c.quant.scheme in ('int4', 'nf4') and c.quant.group_size == 0:
    c.quant.group_size = 32
  c.lock()
  return c


# The config.model fields that make a model's parameters and function, said once: a warm start
# with from_init_from copies them from the start run, and a checkpoint's signature records
# them (lm.training.checkpoint). Each maps to the value that a checkpoint written before the
# field existed implies (such checkpoints resume while the run keeps that value), or to
# EVERY_CHECKPOINT for the fields every checkpoint records.
EVERY_CHECKPOINT = 'recorded by every checkpoint'
ARCHITECTURE = {
    **dict.fromkeys(('vocab_size', 'n_layers', 'd_model', 'n_heads', 'n_kv_heads', 'd_ff',
                     'max_len', 'causal', 'positions', 'rope_theta', 'norm', 'norm_eps', 'mlp',
                     'use_bias', 'tie_embeddings', 'param_dtype'), EVERY_CHECKPOINT),
    'vocab_multiple': 1, 'attention_window': None, 'attention_global_every': 0,
    'lowrank_rank': 0, 'lowrank_targets': 'attn/(q|kv|o)|mlp/(wi|wo)',
    'parametrization': 'sp', 'mup_base_width': 0,
}


def with_architecture_of_init_from(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`c`, with config.model.from_init_from, taking the ARCHITECTURE fields and the tokenizer
  from the run config.train.init_from (a run directory or RUN/checkpoints/STEP)."""
  if not c.model.from_init_from:
    return c
  if not c.train.init_from:
    raise ConfigError('config.model.from_init_from=True needs config.train.init_from')
  given = rundir.absolute(c.train.init_from)
  source = saved(given.parent.parent if (given / rundir.STATE).exists() else given)
  c = ml_collections.ConfigDict(c.to_dict())
  c.model.update({k: source.model[k] for k in ARCHITECTURE if k in source.model})
  c.data.tokenizer = source.data.tokenizer
  return c


def saved(directory) -> ml_collections.ConfigDict:
  """A run directory's config.json over the base config (keys added since it was written
  keep their defaults), with JSON lists back as tuples."""
  as_tuple = lambda v: tuple(as_tuple(x) for x in v) if isinstance(v, list) else v
  config = get_base_config()
  path = rundir.RunDir(directory).config
  if not path.exists():
    raise ConfigError(f'{directory}: no config.json (not a run directory)')
  for section, values in json.loads(path.read_text()).items():
    for key, value in values.items():
      config[section][key] = as_tuple(value)
  return config


def mesh_shape(c: ml_collections.ConfigDict, device_count: int) -> tuple[int, ...]:
  """config.mesh.shape with its -1 resolved against the device count."""
  shape = tuple(int(s) for s in c.mesh.shape)
  if len(shape) != len(MESH_AXES):
    raise ConfigError(f'config.mesh.shape={shape} must have {len(MESH_AXES)} sizes, '
                      f'for {MESH_AXES}')
  if shape.count(-1) > 1:
    raise ConfigError(f'config.mesh.shape={shape} may contain at most one -1')
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if known <= 0 or device_count % known:
      raise ConfigError(f'config.mesh.shape={shape} does not divide the {device_count} devices')
    shape = tuple(device_count // known if s == -1 else s for s in shape)
  if math.prod(shape) != device_count:
    raise ConfigError(f'config.mesh.shape={shape} needs {math.prod(shape)} devices '
                      f'but {device_count} are available')
  return shape

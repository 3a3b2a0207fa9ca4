"""lm's LoRA against Hugging Face PEFT's, step for step: the same base (lm's run exported with
`lm.hf export`), the same adapters at the start (lm's initial `a` copied into PEFT's
`lora_A`, `b` and `lora_B` zero), the same batches in the same order (lm's SFT pipeline, fed
to both), the same optimizer (Adam, lm's schedule, clipping by global norm), the same loss
(cross-entropy on the response tokens). Prints one JSON line per task: both training
curves, their largest relative difference, and both held-out losses.

    python benchmarks/lora_vs_peft.py [--tasks upper_from_copy,upper_from_pretrain,reverse]
        [--steps 400] [--rank 8] [--alpha 16] [--lr 1e-3] [--out runs/lora_vs_peft]

Tasks (the data is written under --out): random 4-letter words, 60 held out:
  upper_from_copy      uppercase `abcd=` -> `ABCD.` from a base SFT-trained to copy words in
                       either case (`abcd=abcd.`, `ABCD=ABCD.`)
  upper_from_pretrain  the same from the base that SFT started from: pretrained 800 steps on
                       the lines `abcd=abcd.` / `ABCD=ABCD.` alone
  reverse              the reverse-digits chain's LoRA stage (experiments/reverse.py), from its
                       pretrained base (GPT-2 style)
PEFT adapts torch modules one for one with lm's Linear modules only where both have the same
shape: lm fuses k with v (`attn/kv`) and SwiGLU's gate with up (`mlp/wi`), and GPT-2 fuses
q, k, v in `c_attn`; those are left out unless --targets says otherwise (they have no PEFT
twin). Needs torch, transformers and peft (the `test` extra).
"""
import importlib.util
import json
import pathlib
import random
import re
import shutil
import subprocess
import sys
import zlib

import numpy as np

from lm.config import arguments

ROOT = pathlib.Path(__file__).resolve().parents[1]
# lm's adapted module -> its twin in transformers (same input and output axes)
TWINS = {'llama': {'attn/q': 'self_attn.q_proj', 'attn/o': 'self_attn.o_proj',
                   'mlp/wo': 'mlp.down_proj'},
         'gpt2': {'attn/o': 'attn.c_proj', 'mlp/wi': 'mlp.c_fc', 'mlp/wo': 'mlp.c_proj'}}
TWIN_TARGETS = {family: '|'.join(twins) for family, twins in TWINS.items()}
# lm's parameters trained in full (lora.train_also) -> the modules PEFT saves
SAVED = {'llama': {'embed': 'embed_tokens', 'head': 'lm_head'},
         'gpt2': {'embed': 'wte', 'head': 'lm_head'}}
WORDS_MODEL = ('--config.model.n_layers=2', '--config.model.d_model=128',
               '--config.model.n_heads=4', '--config.model.n_kv_heads=2',
               '--config.model.d_ff=256', '--config.model.positions=rope',
               '--config.model.norm=rmsnorm', '--config.model.mlp=swiglu',
               '--config.model.use_bias=False', '--config.model.tie_embeddings=False',
               '--config.model.dtype=float32', '--config.model.scan_layers=False',
               '--config.data.tokenizer=char', '--config.data.seq_len=16',
               '--config.train.batch_size=32', '--config.train.eval_batch_size=32',
               '--config.train.log_every=50', '--config.sample.num_tokens=0',
               '--config.optim.name=adam', '--config.optim.weight_decay=0.0',
               '--config.optim.warmup_steps=20', '--config.optim.min_lr=1e-4')
HELD_OUT, TEST = 60, 10
DEFAULT_TARGETS = 'attn/(q|kv|o)|mlp/(wi|wo)'   # lm's config.lora.targets


def words_data(out: pathlib.Path, seed: int = 0, n_train: int = 300, n_pretrain: int = 1200
               ) -> None:
  """pretrain.txt (`w=w.` and `W=W.` lines of n_pretrain words of their own, each once: a base
  predicts the copy only by copying), copy.jsonl (copy in either case) and upper.jsonl (`w=`
  -> `W.`) of n_train other words; the last HELD_OUT + TEST words of the JSONL files are the
  validation and test splits (config.data.split_fractions), never seen in training."""
  rng = random.Random(seed)
  letters = 'abcdefghijklmnopqrstuvwxyz'
  words = set()
  while len(words) < n_pretrain + n_train + HELD_OUT + TEST:
    words.add(''.join(rng.choice(letters) for _ in range(4)))
  words = sorted(words)
  rng.shuffle(words)
  held = HELD_OUT + TEST
  pretrain, train, rest = words[:n_pretrain], words[n_pretrain:-held], words[-held:]
  out.mkdir(parents=True, exist_ok=True)
  lines = ([f'{w}={w}.' for w in pretrain[::2]]
           + [f'{w.upper()}={w.upper()}.' for w in pretrain[1::2]])
  rng.shuffle(lines)
  (out / 'pretrain.txt').write_text('\n'.join(lines) + '\n')
  copy = [(w, w) for w in train] + [(w.upper(), w.upper()) for w in train]
  rng.shuffle(copy)
  copy += [(w, w) for w in rest]
  (out / 'copy.jsonl').write_text(''.join(
      json.dumps({'prompt': f'{p}=', 'response': f'{r}.'}) + '\n' for p, r in copy))
  (out / 'upper.jsonl').write_text(''.join(
      json.dumps({'prompt': f'{w}=', 'response': f'{w.upper()}.'}) + '\n' for w in train + rest))


def split_fractions(n_examples: int) -> str:
  held, test = HELD_OUT / n_examples, TEST / n_examples
  return f'--config.data.split_fractions=({1 - held - test},{held},{test})'


def lm_main(workdir: pathlib.Path, config: str, *flags: str) -> None:
  """A base run (skipped when its workdir holds a finished run)."""
  if (workdir / 'final.json').exists():
    return
  subprocess.run([sys.executable, '-m', 'lm.main', '--config', config, '--workdir',
                  str(workdir), *flags], check=True, cwd=ROOT)


def bases(out: pathlib.Path, tasks: list[str]) -> dict[str, tuple[str, list[str]]]:
  """{task: (base run directory, the LoRA run's config flags)}, training the bases needed."""
  found = {}
  if any(t.startswith('upper') for t in tasks):
    words_data(out / 'data')
    base = ['experiments/shakespeare_char.py', *WORDS_MODEL]
    lm_main(out / 'pretrain', *base, f'--config.data.source=text:{out}/data/pretrain.txt',
            '--config.train.steps=800', '--config.train.eval_every=800',
            '--config.train.checkpoint_every=800', '--config.optim.lr=1e-3')
    sft = ['--config.train.objective=sft', '--config.data.format=sft',
           split_fractions(600 + HELD_OUT + TEST)]
    lm_main(out / 'copy', *base, *sft, f'--config.data.source=jsonl:{out}/data/copy.jsonl',
            f'--config.train.init_from={out}/pretrain', '--config.train.steps=400',
            '--config.train.eval_every=400', '--config.train.checkpoint_every=400',
            '--config.optim.lr=1e-3')
    upper = [*base, '--config.train.objective=sft', '--config.data.format=sft',
             split_fractions(300 + HELD_OUT + TEST),
             f'--config.data.source=jsonl:{out}/data/upper.jsonl']
    found['upper_from_copy'] = (str(out / 'copy'), upper)
    found['upper_from_pretrain'] = (str(out / 'pretrain'), upper)
  if 'reverse' in tasks:
    data, runs = out / 'reverse_data', out / 'reverse_runs'
    if not (data / 'sft.jsonl').exists():
      subprocess.run([sys.executable, '-m', 'lm.tasks.reverse', 'make', '--out', str(data)],
                     check=True, cwd=ROOT)
    config = f'experiments/reverse.py:pretrain,data={data},runs={runs}'
    lm_main(runs / 'pretrain', config)
    found['reverse'] = (str(runs / 'pretrain'), [
        f'experiments/reverse.py:lora_sft,data={data},runs={runs}',
        '--config.data.packing=window'])   # one example per row: transformers has no segments
  return found


def exact_match(logits: np.ndarray, rows: dict) -> np.ndarray:
  """Per example: every response token is the argmax of its logits, which is what greedy
  decoding would produce (teacher forcing equals free running while no token is wrong)."""
  weights = np.asarray(rows['weights'])
  right = (logits.argmax(-1) == np.asarray(rows['targets'])) | (weights == 0)
  return right.all(-1)[weights.sum(-1) > 0]   # padding rows (no response) left out


def compare(base: str, config_flags: list[str], workdir: pathlib.Path, steps: int, rank: int,
            alpha: float, lr: float, targets: str | None = None, peft_options: dict | None = None,
            rslora: bool = False, train_also: str = '') -> dict:
  """Trains lm's LoRA and PEFT's side by side from `base`; both curves and held-out losses.
  With `peft_options` (PEFT's own init, e.g. all linear modules, rsLoRA, modules_to_save)
  the two start apart and only their ends compare. `rslora`: rank-stabilised scaling on both
  sides (lm's lora.rslora, PEFT's use_rslora); `train_also`: lm's lora.train_also ('embed',
  'head' or both), PEFT's modules_to_save (the embedding, the output head)."""
  import jax
  import peft
  import torch
  import transformers

  from lm import config as config_lib
  from lm import objectives
  from lm.config import sweeps
  from lm.interop import hf
  from lm.interop.hf_layout import family_of
  from lm.model import lora as peft_lib
  from lm.training import checkpoint, optim
  from lm.training import loop as train
  from lm.training import start as start_lib

  experiment, *overrides = config_flags
  path, _, variant = experiment.partition(':')
  spec = importlib.util.spec_from_file_location('experiment', ROOT / path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(variant) if variant else module.get_config()
  point, = sweeps.sweep_points([o.removeprefix('--config.') for o in overrides])
  config = sweeps.apply(config, point)
  # the family of the base (a resolved config: n_kv_heads set)
  family = family_of(config_lib.saved(pathlib.Path(base)).model)
  config.train.update(init_from=base, steps=steps, checkpoint_every=10**9, eval_every=10**9)
  config.lora.update(rank=rank, alpha=alpha, targets=targets or TWIN_TARGETS[family])
  config.lora.update(rslora=rslora, train_also=train_also)
  config.optim.update(lr=lr, name='adam', weight_decay=0.0)
  ckpt = checkpoint.Checkpointer(workdir / 'checkpoints', keep=1, async_save=False)
  start = start_lib.resume_or_start(config, workdir, ckpt)
  config, data, program, state = start.config, start.data, start.program, start.state
  initial = jax.device_get(state.params)
  if train_also:
    initial = initial[peft_lib.ADAPTERS]
  batches = [jax.device_get(next(data.train)) for _ in range(steps)]
  held_out = [jax.device_get(b) for b in data.eval['validation']]

  lm_losses = []
  for rows in batches:
    state, metrics = program.train_step(state, train.global_batch(program, rows,
                                                                  config.train.batch_size))
    lm_losses.append(float(metrics['loss']))
  lm_held_out = train.evaluate(program, state.params, held_out, config.train.eval_batch_size)
  apply = jax.jit(lambda params, inputs: program.model.apply(
      objectives.base.policy_variables(params, program.frozen), inputs))
  lm_exact = np.concatenate([exact_match(np.asarray(apply(state.params, rows['inputs'])), rows)
                             for rows in held_out]).mean()

  hf_dir = workdir / 'hf_base'
  hf.export_model(base, str(hf_dir), with_tokenizer=False)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      hf_dir, dtype=torch.float32, attn_implementation='eager')
  twins = {lm_name: hf_name for lm_name, hf_name in TWINS[family].items()
           if any(lm_name in path for path in _adapted(initial))}
  if peft_options is None:
    options = dict(target_modules=sorted({name.split('.')[-1] for name in twins.values()}))
  else:
    options = {'target_modules': 'all-linear', **peft_options}
  if train_also:
    options['modules_to_save'] = [SAVED[family][name] for name in ('embed', 'head')
                                  if re.search(train_also, f'{name}/')]
  model = peft.get_peft_model(model, peft.LoraConfig(
      r=rank, lora_alpha=alpha, lora_dropout=0.0, bias='none', fan_in_fan_out=family == 'gpt2',
      use_rslora=rslora, **options))
  modules = dict(model.named_modules())
  for path, adapter in _adapted(initial).items() if peft_options is None else ():
    layer, module = path.split('/', 1)
    prefix = ('base_model.model.transformer.h' if family == 'gpt2'
              else 'base_model.model.model.layers')
    twin = modules[f'{prefix}.{layer.removeprefix("layers_")}.{twins[module]}']
    a = np.asarray(adapter['a'], np.float32)
    with torch.no_grad():
      twin.lora_A['default'].weight.copy_(torch.from_numpy(a.reshape(-1, rank).T.copy()))
      twin.lora_B['default'].weight.zero_()
  trained = [p for p in model.parameters() if p.requires_grad]
  o = config.optim
  adam = torch.optim.Adam(trained, lr=o.lr, betas=(o.b1, o.b2), eps=o.eps)
  schedule = optim.make_schedule(o)

  def loss_of(rows, logits=None) -> torch.Tensor:
    if logits is None:
      logits = model(input_ids=torch.from_numpy(np.asarray(rows['inputs'], np.int64))).logits
    losses = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), torch.from_numpy(np.asarray(rows['targets'], np.int64)),
        reduction='none')
    weights = torch.from_numpy(np.asarray(rows['weights'], np.float32))
    return (losses * weights).sum(), weights.sum()

  peft_losses = []
  for step, rows in enumerate(batches):
    total, count = loss_of(rows)
    loss = total / count
    adam.zero_grad()
    loss.backward()
    if o.clip_norm > 0:
      torch.nn.utils.clip_grad_norm_(trained, o.clip_norm)
    for group in adam.param_groups:   # optax's count: the update of step n uses schedule(n - 1)
      group['lr'] = float(schedule(step))
    adam.step()
    peft_losses.append(float(loss.detach()))
  with torch.no_grad():
    logits = [model(input_ids=torch.from_numpy(np.asarray(rows['inputs'], np.int64))).logits
              for rows in held_out]
    sums = [loss_of(rows, x) for rows, x in zip(held_out, logits)]
  peft_held_out = float(sum(t for t, _ in sums) / sum(c for _, c in sums))
  peft_exact = np.concatenate([exact_match(x.numpy(), rows)
                               for rows, x in zip(held_out, logits)]).mean()
  lm_curve, peft_curve = np.array(lm_losses), np.array(peft_losses)
  relative = np.abs(lm_curve - peft_curve) / np.abs(peft_curve)
  return {'family': family, 'targets': config.lora.targets, 'rslora': rslora,
          'train_also': train_also,
          'peft': options if peft_options is not None else sorted(twins.values()),
          'rank': rank, 'alpha': alpha, 'lr': lr, 'steps': steps,
          'lm_trainable': sum(np.size(x) for x in jax.tree.leaves(state.params)),
          'peft_trainable': sum(p.numel() for p in trained),
          'max_rel_diff': float(relative.max()),
          'max_rel_diff_first_10': float(relative[:10].max()),
          'lm_final_loss': lm_losses[-1], 'peft_final_loss': peft_losses[-1],
          'lm_held_out_loss': lm_held_out['loss'], 'peft_held_out_loss': peft_held_out,
          'lm_held_out_exact': float(lm_exact), 'peft_held_out_exact': float(peft_exact),
          'lm_curve': lm_losses, 'peft_curve': peft_losses}


def _adapted(lora: dict) -> dict[str, dict]:
  """{'layers_0/attn/q': {'a', 'b'}, ...} from lm's 'lora' collection (unrolled layers)."""
  found = {}

  def walk(tree, path):
    if set(tree) == {'a', 'b'}:
      found['/'.join(path)] = tree
    else:
      for key, value in tree.items():
        walk(value, (*path, key))
  walk(lora, ())
  return found


def main(argv: list[str]) -> None:
  parser = arguments.parser('python benchmarks/lora_vs_peft.py', __doc__)
  parser.add_argument('--tasks', default='upper_from_copy,upper_from_pretrain,reverse',
                      help='the tasks compared, comma-separated')
  parser.add_argument('--steps', type=int, default=400, help='adapter training steps')
  parser.add_argument('--rank', type=int, default=8, help='the adapters\' rank')
  parser.add_argument('--alpha', type=float, default=16.0, help='LoRA alpha (scale alpha / rank)')
  parser.add_argument('--lr', type=float, default=1e-3, help='the adapters\' learning rate')
  parser.add_argument('--targets', help="lm's lora.targets (default: the modules with a twin)")
  parser.add_argument('--out', default='runs/lora_vs_peft',
                      help='where the base runs and the adapters are written')
  parser.add_argument('--peft', help='PEFT on its own instead of step for step: a JSON object '
                      'of LoraConfig options over target_modules="all-linear", e.g. '
                      '\'{"modules_to_save": ["lm_head"]}\'; lm then adapts --targets '
                      '(default: its own default, every projection)')
  parser.add_argument('--rslora', action='store_true',
                      help="rank-stabilised scaling on both sides (lora.rslora, use_rslora)")
  parser.add_argument('--train_also', default='', help="lm's lora.train_also (e.g. 'head', "
                      "'embed|head'), PEFT's modules_to_save")
  parser.add_argument('--curves', action='store_true', help='print the whole curves too')
  args = parser.parse_args(argv)
  out = (ROOT / args.out).resolve()
  tasks = args.tasks.split(',')
  peft_options = json.loads(args.peft) if args.peft else None
  targets = args.targets or (DEFAULT_TARGETS if peft_options is not None else None)
  for task, (base, flags) in bases(out, tasks).items():
    if task not in tasks:
      continue
    name = (f'{task}_r{args.rank}_a{args.alpha:g}_lr{args.lr:g}_{args.steps}'
            f'_{zlib.crc32(repr((targets, args.peft, args.rslora, args.train_also)).encode()):08x}')
    shutil.rmtree(out / 'lora' / name, ignore_errors=True)   # always from the start
    result = compare(base, flags, out / 'lora' / name, args.steps, args.rank, args.alpha,
                     args.lr, targets, peft_options, args.rslora, args.train_also)
    if not args.curves:
      result = {k: v for k, v in result.items() if not k.endswith('_curve')}
    print(json.dumps({'task': task, **result}), flush=True)


if __name__ == '__main__':
  main(sys.argv[1:])

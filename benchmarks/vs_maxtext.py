"""lm beside MaxText on the same TPU compiler: both train steps AOT-compiled for one slice on
this CPU machine (no TPU needed), for the same model, per-chip batch, sequence and remat.

    python benchmarks/vs_maxtext.py [--models llama3_8b,llama3_1b,gpt2_350m]
        [--accountings xla,splash_free,splash_counted] [--maxtext_python PATH] [--install]

Prints one JSON line per model and accounting, then a Markdown table: each side's estimated
step time (XLA's `optimal_seconds`), FLOPs and temporaries per chip, and lm / MaxText.

MaxText runs in its own interpreter: `--maxtext_python`, else this one if it imports
maxtext, else `.venv-maxtext/bin/python`, which `--install` creates (MaxText 0.2.5 with jax
0.12.1 and libtpu 0.0.52, the compiler lm's `tpu` extra pins: 3-4 minutes). Each
measurement is a fresh process: MaxText's through benchmarks/maxtext_compile.py, lm's
through `lm.plan.plan` (layers unrolled: FLOPs and time from lm.plan's loop-free twins,
MaxText compiled with scan_layers=false).

Accountings:
  xla             XLA attention on both sides: MaxText attention=dot_product, lm xla_bf16
                  (the same numerics: bf16 scores, softmax normalised after the values)
  splash_free     splash on both sides, every Pallas kernel's cost estimate dropped, so XLA
                  counts the kernels as free on both (MaxText's default splash, jax.experimental's,
                  carries none anyway)
  splash_counted  splash on both sides, each kernel's estimate counted: MaxText with
                  use_tokamax_splash=true, whose kernel carries one as lm's (tokamax's) does
`kernels_costed` in each line says, per side, whether the kernels lowered carried an estimate.
"""
import importlib
import json
import os
import pathlib
import subprocess
import sys

from lm.config import arguments

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAXTEXT_VENV = ROOT / '.venv-maxtext'
MAXTEXT_PINS = ('maxtext[tpu]==0.2.5', 'jax==0.12.1', 'jaxlib==0.12.1', 'libtpu==0.0.52')

# The same model on both sides: lm's experiment with overrides, MaxText's settings. Per chip:
# the batch and sequence, FSDP over the 4 chips of a v5p-8, every layer rematerialised.
MAXTEXT_COMMON = ('compile_topology=v5p-8', 'compile_topology_num_slices=1',
                  'ici_fsdp_parallelism=4', 'remat_policy=full', 'scan_layers=false',
                  'enable_dropout=false', 'run_name=vs_lm', 'dataset_type=synthetic')
LM_COMMON = ('model.remat=full', 'train.grad_accum_steps=1', 'model.dropout=0.0')
MODELS = {
    'llama3_8b': {
        'lm': ('experiments/llama3_8b_lm1b.py', ('train.batch_size=8',)),
        'maxtext': ('model_name=llama3-8b', 'per_device_batch_size=2',
                    'max_target_length=2048')},
    'llama3_1b': {   # Llama-3.2-1B's shape: tied embeddings, head dim 64
        'lm': ('experiments/llama3_1b_lm1b.py', ('train.batch_size=16',)),
        'maxtext': ('model_name=default', 'decoder_block=llama2', 'base_emb_dim=2048',
                    'base_num_query_heads=32', 'base_num_kv_heads=8', 'head_dim=64',
                    'base_mlp_dim=8192', 'base_num_decoder_layers=16', 'vocab_size=128256',
                    'logits_via_embedding=true', 'rope_max_timescale=500000',
                    'normalization_layer_epsilon=1e-5', 'per_device_batch_size=4',
                    'max_target_length=2048')},
    'gpt2_350m': {   # MaxText's GPT-3 block: learned positions, LayerNorm, GELU, tied
        'lm': ('experiments/gpt2_350m_lm1b.py', ('train.batch_size=64',)),
        'maxtext': ('model_name=default', 'decoder_block=gpt3', 'base_emb_dim=1024',
                    'base_num_query_heads=16', 'base_num_kv_heads=16', 'head_dim=64',
                    'base_mlp_dim=4096', 'base_num_decoder_layers=24', 'vocab_size=50304',
                    'mlp_activations=[gelu]', 'logits_via_embedding=true',
                    'trainable_position_size=1024', 'use_iota_embed=true', 'fused_qkv=true',
                    'per_device_batch_size=16', 'max_target_length=1024')},
}
ACCOUNTINGS = {   # name: (lm attention, MaxText settings, kernels' estimates dropped)
    'xla': ('xla_bf16', ('attention=dot_product',), False),
    'splash_free': ('splash', ('attention=flash',), True),
    'splash_counted': ('splash', ('attention=flash', 'use_tokamax_splash=true'), False),
}


def maxtext_python(given: str | None, install: bool) -> str:
  """The interpreter that imports MaxText (see the module's docstring)."""
  if given:
    return given
  if subprocess.run([sys.executable, '-c', 'import maxtext'], capture_output=True).returncode == 0:
    return sys.executable
  python = MAXTEXT_VENV / 'bin' / 'python'
  if not python.exists():
    if not install:
      sys.exit(f'error: no MaxText found (not importable here, no {python}): pass --install to '
               f'create {MAXTEXT_VENV} with {" ".join(MAXTEXT_PINS)}, or --maxtext_python')
    subprocess.run([sys.executable, '-m', 'venv', str(MAXTEXT_VENV)], check=True)
    subprocess.run([str(python), '-m', 'pip', 'install', '-q', *MAXTEXT_PINS], check=True)
  return str(python)


def _last_json(command: list[str], env: dict) -> dict:
  """Runs a measurement in its own process; its last stdout line is the JSON result."""
  result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
  if result.returncode:
    sys.exit(f'error: {" ".join(command[:4])} ... failed:\n{result.stderr[-3000:]}')
  return json.loads(result.stdout.strip().splitlines()[-1])


def plan_lm(experiment: str, overrides: list[str], kernels_free: bool) -> dict:
  """lm's plan of one config on v5p-8 (run in a fresh process by `main`)."""
  sys.path.insert(0, str(ROOT))
  from benchmarks import maxtext_compile
  seen = maxtext_compile.watch_pallas_cost_estimates(drop=kernels_free)
  import jax
  jax.config.update('jax_platforms', 'cpu')
  from lm.config import sweeps
  from lm.parallel import tpus
  from lm.planning import plan
  config = importlib.import_module(f'experiments.{pathlib.Path(experiment).stem}').get_config()
  point, = sweeps.sweep_points(overrides)
  row = plan.plan(sweeps.apply(config, point), tpus.parse('v5p-8'))
  return {**{k: row[k] for k in ('est_step_s', 'step_flops', 'state_gb', 'temp_gb',
                                 'pallas_kernels', 'est_mfu', 'compile_s')},
          'kernels_costed': maxtext_compile.costed(seen), 'kernels_free': kernels_free,
          'jax': jax.__version__}


def compare(name: str, accounting: str, python: str) -> dict:
  model = MODELS[name]
  attention, maxtext_settings, free = ACCOUNTINGS[accounting]
  # compiles only: libtpu's lock on the TPU (held by any other process that loaded it) is moot
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'ALLOW_MULTIPLE_LIBTPU_LOAD': '1'}
  experiment, lm_overrides = model['lm']
  lm_row = _last_json([sys.executable, __file__, '--plan_lm', experiment, *lm_overrides,
                       *LM_COMMON, f'model.attention={attention}',
                       *(['--kernels_free'] if free else [])], env)
  maxtext_row = _last_json([python, str(ROOT / 'benchmarks' / 'maxtext_compile.py'),
                            *(['--kernels_free'] if free else []), *MAXTEXT_COMMON,
                            *model['maxtext'], *maxtext_settings,
                            f'base_output_directory={ROOT / "runs" / "vs_maxtext"}'], env)
  return {'model': name, 'accounting': accounting, 'lm': lm_row, 'maxtext': maxtext_row,
          'step_ratio': lm_row['est_step_s'] / maxtext_row['est_step_s'],
          'flops_ratio': lm_row['step_flops'] / maxtext_row['step_flops']}


def table(rows: list[dict]) -> str:
  lines = ['| model | accounting | lm step s | MaxText step s | lm / MaxText | lm / MaxText '
           'FLOPs | temp GB lm / MaxText | kernels costed lm / MaxText |',
           '|' + ' --- |' * 8]
  for r in rows:
    lm, mt = r['lm'], r['maxtext']
    lines.append(f'| {r["model"]} | {r["accounting"]} | {lm["est_step_s"]:.4f} | '
                 f'{mt["est_step_s"]:.4f} | {r["step_ratio"]:.3f} | {r["flops_ratio"]:.3f} | '
                 f'{lm["temp_gb"]:.1f} / {mt["temp_gb"]:.1f} | '
                 f'{lm["kernels_costed"]} / {mt["kernels_costed"]} |')
  return '\n'.join(lines)


def main(argv: list[str]) -> None:
  if argv and argv[0] == '--plan_lm':   # one lm measurement (a subprocess)
    args = argv[1:]
    free = '--kernels_free' in args
    args = [a for a in args if a != '--kernels_free']
    print(json.dumps(plan_lm(args[0], args[1:], free)))
    return
  parser = arguments.parser('python benchmarks/vs_maxtext.py', __doc__.split('\n')[0])
  parser.add_argument('--models', default=','.join(MODELS), help='the models compared')
  parser.add_argument('--accountings', default=','.join(ACCOUNTINGS),
                      help='how the kernels are counted')
  parser.add_argument('--maxtext_python', help='an interpreter that imports maxtext')
  parser.add_argument('--install', action='store_true',
                      help=f'create {MAXTEXT_VENV.name} with MaxText if none is found')
  args = parser.parse_args(argv)
  for value, known, flag in ((args.models, MODELS, '--models'),
                             (args.accountings, ACCOUNTINGS, '--accountings')):
    unknown = set(value.split(',')) - set(known)
    if unknown:
      parser.error(f'{flag}: unknown {sorted(unknown)}; known: {", ".join(known)}')
  python = maxtext_python(args.maxtext_python, args.install)
  rows = []
  for name in args.models.split(','):
    for accounting in args.accountings.split(','):
      print(f'compiling {name}, {accounting}: both sides (minutes each)', file=sys.stderr,
            flush=True)
      rows.append(compare(name, accounting, python))
      print(json.dumps(rows[-1]), flush=True)
  print(table(rows))


if __name__ == '__main__':
  main(sys.argv[1:])

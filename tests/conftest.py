"""Every test runs on CPU with 8 virtual devices, set before JAX is imported."""
import os
import tempfile

# launch.local imports the standard library only: JAX is not imported yet
from launch.local import xla_flags_with_cpu_devices

# (jaxlib 0.12 removed --xla_cpu_use_fusion_emitters=false, which the tests passed before: its
# fast-compile preset and LLVM's optimization flags changed nothing over
# jax_disable_most_optimizations, below: test_model 52.6-55.2 s with each, 54.3 without)
os.environ['XLA_FLAGS'] = xla_flags_with_cpu_devices(8, os.environ.get('XLA_FLAGS'))
os.environ['JAX_PLATFORMS'] = 'cpu'
# JAX's persistent compilation cache, shared by the test processes (xdist workers and the
# commands tests run): many compile the same programs. Entries are keyed by the program,
# the compiler and the devices, so a stale one is never used.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), 'lm-tests-jax-cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')

import jax
import numpy as np
import pytest

from lm import config as config_lib
from lm.parallel import sharding
from lm.training import steps


def tiny_config(**model):
  """A small model that every mesh of 8 devices can shard (heads, kv heads, d_ff, vocab)."""
  c = config_lib.get_base_config()
  c.model.update(dict(vocab_size=64, n_layers=2, d_model=32, n_heads=8, n_kv_heads=8,
                      d_ff=64, dtype='float32', dropout=0.0), **model)
  c.data.seq_len = 16
  c.train.update(batch_size=8, eval_batch_size=8, steps=20, seed=0)
  # no warm-up: a learning rate of 0 on the first step would make one-step tests compare the
  # initial parameters with themselves
  c.optim.update(warmup_steps=0, lr=1e-2)
  return c


# Modules that keep LLVM's optimizations: those that compile for TPU and check the compiler's
# estimates (they compile as a user's plan does), and test_scaling, whose fits run 4,500
# L-BFGS solves in one program (its run time dominates: 11 s in all optimized, 20 s without).
OPTIMIZED_MODULES = ('test_plan', 'test_tpu_compile', 'test_scaling')


@pytest.fixture(autouse=True)
def cheap_cpu_compiles(request):
  """Tests compile hundreds of small programs and run each a few times: LLVM optimizing the
  CPU code costs them more than it saves (test_model, test_pipeline, test_optim, test_post and
  test_sample: 1,340 CPU-seconds with it, 655 without). The commands tests start: see
  command_env."""
  cheap = request.module.__name__.rsplit('.', 1)[-1] not in OPTIMIZED_MODULES
  jax.config.update('jax_disable_most_optimizations', cheap)


def command_env(optimized: bool = False, **extra: str) -> dict[str, str]:
  """The environment of a command a test starts: one CPU device, as a user's shell gives it,
  and the tests' compilation cache. Compiled as the tests' own programs are (without LLVM's
  optimizations) unless `optimized`: most commands train a small model for tens of steps,
  where compiling costs more than it saves. The long trainings (the CPU recipe, the
  post-training chain's longer stages) compile as a user's run does."""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  if not optimized:
    env.update(JAX_DISABLE_MOST_OPTIMIZATIONS='1')
  return {**env, **extra}


# Fixtures that train or compile for minutes and are shared by several tests: the tests using
# one run in one xdist worker (`--dist loadgroup` in setup.cfg), which builds it once
SHARED_FIXTURES = ('char_run', 'chain', 'parametric', 'fsdp_plan', 'small_run')


# Tests of a minute or more on 2 cores that share no fixture. xdist hands out the groups
# first (the largest first), then single tests in collection order: these go first among
# those, longest first, so that no worker is left running one at the end while the other
# idles (in order of collection, the CPU recipe ran last in one CI run, alone for minutes)
LONG_TESTS = ('test_shakespeare_char_reaches_nanogpt_validation_loss',
              'test_llama_experiment_with_sentencepiece_end_to_end',
              'test_two_hosts_match_one_and_resume',
              'test_planned_flops_agree_with_the_model_count',
              'test_the_cost_of_all_layers_is_extrapolated_from_twins_of_one_and_two',
              'test_readme_flow_import_sample_lora_sft_export_generate',
              'test_save_attention_remat_runs_neither_projections_nor_forward_kernel_again',
              'test_full_remat_needs_fewer_temporary_bytes_than_none',
              'test_pack_evaluation_and_sample_on_fsdp_hosts_match_one_process',
              'test_killed_run_resumes_bitwise',
              'test_tensor_axis_across_hosts_matches_one_process')


@pytest.hookimpl(tryfirst=True)   # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items):
  position = {name: i for i, name in enumerate(LONG_TESTS)}   # the rest after, in order
  items.sort(key=lambda item: position.get(item.originalname, len(LONG_TESTS)))
  for item in items:
    for name in SHARED_FIXTURES:
      if name in item.fixturenames:
        item.add_marker(pytest.mark.xdist_group(name))
        break


@pytest.fixture(scope='session')
def tfds_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


# the char_run fixture's overrides of the smoke variant
CHAR_RUN_FLAGS = ('--config.train.steps=100', '--config.train.eval_every=100',
                  '--config.train.checkpoint_every=100', '--config.train.eval_batches=4',
                  '--config.sample.num_tokens=0')


@pytest.fixture(scope='session')
def char_run(tmp_path_factory, tfds_dir):
  """The default experiment trained for 100 steps (its smoke variant), once per test process:
  where the compression commands' tests start (they write their runs elsewhere)."""
  from tests.test_train import run_main  # test_train imports this module
  workdir = tmp_path_factory.mktemp('char_run') / 'run'
  run_main(workdir, *CHAR_RUN_FLAGS, f'--config.data.dir={tfds_dir}',
           config='experiments/shakespeare_char.py:smoke')
  return workdir


def build_program(config, shape=(1, 1, 1, 1), devices=None) -> steps.Program:
  """The jitted program of `config` on a mesh of `shape` over the first devices."""
  devices = devices or jax.devices()[:int(np.prod(shape))]
  config = config_lib.resolve(config, None).unlock()
  config.mesh.shape = shape
  # training=False: a quantized model without LoRA is built as a quantized run is read
  config_lib.validate(config, len(devices), training=False)
  return steps.build(config, sharding.make_mesh(shape, devices))


def random_batch(batch_size: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
  tokens = np.random.default_rng(seed).integers(0, 64, (batch_size, seq_len + 1), np.int32)
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]}


def loss_and_grads(program: steps.Program, batch, accum_steps: int = 1, rng=None):
  """Mean loss and gradients of the program's model at its initial parameters, on its mesh."""
  params = program.init(jax.random.PRNGKey(0)).params
  rng = jax.random.PRNGKey(0) if rng is None else rng
  fn = jax.jit(lambda p, b: steps.loss_and_grads(p, {}, b, rng, program.objective,
                                                 accum_steps)[:2])
  return program.in_mesh(fn)(params, jax.device_put(batch, program.batch_sharding))


def flat(tree) -> dict[str, np.ndarray]:
  """'path' -> host array, for leaf-by-leaf comparisons with the path in the message."""
  leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}


def assert_trees_close(actual, expected, rtol, atol=0.0):
  a, e = flat(actual), flat(expected)
  assert a.keys() == e.keys()
  for path in e:
    np.testing.assert_allclose(a[path], e[path], rtol=rtol, atol=atol, err_msg=path)

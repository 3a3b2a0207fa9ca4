"""The train step compiled ahead of time for a TPU topology (libtpu, no TPU needed; the `tpu`
extra): with attention='splash' the Pallas kernel is lowered for TPU (Mosaic custom calls),
not in interpret mode, inside the real FSDP-sharded step, with its cost estimate, and the
remat policies keep its output."""
import functools

from lm import config as config_lib
from lm.parallel import tpus
from lm.planning import plan
from tests.conftest import tiny_config


@functools.cache
def _compiled_train_step(attention: str, window=None, remat='none'):
  config = tiny_config(attention=attention, d_model=256, n_heads=2, n_kv_heads=1,
                       dtype='bfloat16', attention_window=window, remat=remat)
  config.data.seq_len = 512
  config.mesh.shape = (1, 4, 1, 1)   # FSDP over the 4 chips
  config = config_lib.resolve(config, None)
  return plan.compile_train_step(plan.program_on(config, tpus.parse('v5e:2x2').devices()),
                                 config)


def test_splash_attention_compiles_for_a_tpu_topology():
  splash = _compiled_train_step('splash', window=128).as_text()
  # the forward and the (fused) backward kernel, as Mosaic TPU kernels
  assert splash.count('tpu_custom_call') == 2
  assert 'all-gather' in splash   # FSDP's parameter gathers
  assert _compiled_train_step('xla').as_text().count('tpu_custom_call') == 0


def test_splash_kernels_carry_their_cost_to_the_compiler():
  """The kernels come with a cost estimate, so XLA's FLOPs and step estimate (what `lm.plan`
  reports) include the attention as they do with attention='xla'. One 512 x 512 block: no
  masked block is skipped, and the kernels' backward recomputes the scores (5 L x L matmuls
  where XLA's has 4), so splash counts a little more. A kernel without an estimate counts as
  nothing: about half the FLOPs here."""
  flops = {a: _compiled_train_step(a).cost_analysis()['flops'] for a in ('splash', 'xla')}
  assert 1.0 < flops['splash'] / flops['xla'] < 1.15


def test_save_attention_remat_runs_neither_projections_nor_forward_kernel_again():
  """remat='full' recomputes the whole layer in the backward pass, splash's forward kernel
  too; 'save_attention' keeps q, k, v and the kernel's output and log-sum-exp, so its
  recomputation is a fraction of full's (FLOPs beyond remat='none': 0.18 of full's here; 0.46
  when q, k, v are not kept)."""
  compiled = {r: _compiled_train_step('splash', remat=r) for r in ('none', 'full',
                                                                    'save_attention')}
  kernels = {r: c.as_text().count('tpu_custom_call') for r, c in compiled.items()}
  assert kernels == {'none': 2, 'full': 3, 'save_attention': 2}
  # the dots policies keep splash's output too (XLA's dots policies alone miss custom calls)
  assert _compiled_train_step('splash', remat='dots_no_batch').as_text().count(
      'tpu_custom_call') == 2
  flops = {r: c.cost_analysis()['flops'] for r, c in compiled.items()}
  recomputed = lambda r: flops[r] - flops['none']
  assert 0 < recomputed('save_attention') < 0.3 * recomputed('full')


def test_vs_maxtext_can_count_every_kernel_as_free(monkeypatch):
  """benchmarks/vs_maxtext.py's splash_free accounting: the kernels lowered are seen to carry
  an estimate, which is then dropped, so XLA counts them as nothing (as MaxText's default
  splash, which carries none): fewer FLOPs than with the estimate, and a shorter step."""
  from jax._src import tpu_custom_call

  from benchmarks import maxtext_compile
  config = tpu_custom_call.CustomCallBackendConfig
  counted = _compiled_train_step('splash')   # before the estimates are dropped
  monkeypatch.setattr(config, '__post_init__', config.__post_init__)   # restored afterwards
  seen = maxtext_compile.watch_pallas_cost_estimates(drop=True)
  free = _compiled_train_step.__wrapped__('splash')
  assert maxtext_compile.kernels(free.as_text(), seen) == {'pallas_kernels': 2,
                                                           'kernels_costed': 'yes'}
  flops = {name: c.cost_analysis()['flops'] for name, c in (('free', free),
                                                            ('counted', counted))}
  assert flops['free'] < 0.7 * flops['counted']
  assert free.cost_analysis()['optimal_seconds'] < counted.cost_analysis()['optimal_seconds']

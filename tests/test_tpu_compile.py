"""The train step compiled ahead of time for a TPU topology (libtpu, no TPU needed; the `tpu`
extra): with attention='splash' the Pallas kernel is lowered for TPU (Mosaic custom calls),
not in interpret mode, inside the real FSDP-sharded step."""
from lm import config as config_lib
from lm import plan, tpus
from tests.conftest import tiny_config


def _compiled_train_step(attention: str, window=None):
  config = tiny_config(attention=attention, d_model=256, n_heads=2, n_kv_heads=1,
                       dtype='bfloat16', attention_window=window)
  config.data.seq_len = 512
  config.mesh.shape = (1, 4, 1, 1)   # FSDP over the 4 chips
  config = config_lib.resolve(config, None)
  return plan.compile_train_step(plan.program_on(config, tpus.parse('v5e:2x2').devices()),
                                 config)


def test_splash_attention_compiles_for_a_tpu_topology():
  splash = _compiled_train_step('splash', window=128).as_text()
  # forward, and the dq and dkv backward kernels, as Mosaic TPU kernels
  assert splash.count('tpu_custom_call') == 3
  assert 'all-gather' in splash   # FSDP's parameter gathers
  assert _compiled_train_step('xla').as_text().count('tpu_custom_call') == 0

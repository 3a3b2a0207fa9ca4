"""The train step compiled ahead of time for a TPU topology (libtpu, no TPU needed; the `tpu`
extra): with attention='splash' the Pallas kernel is lowered for TPU (Mosaic custom calls),
not in interpret mode, inside the real FSDP-sharded step."""
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import topologies

from lm import config as config_lib
from lm import sharding, steps
from tests.conftest import tiny_config


def _compiled_train_step(attention: str, window=None):
  chips = topologies.get_topology_desc(platform='tpu', topology_name='v5e:2x2').devices
  config = tiny_config(attention=attention, d_model=256, n_heads=2, n_kv_heads=1,
                       dtype='bfloat16', attention_window=window)
  config.data.seq_len = 512
  config = config_lib.resolve(config, None).unlock()
  config.mesh.shape = (1, 4, 1, 1)   # FSDP over the 4 chips
  config_lib.validate(config, len(chips))
  mesh = sharding.make_mesh(config.mesh.shape, chips)
  program = steps.build(config, mesh)
  batch = {k: jax.ShapeDtypeStruct((8, 512), jnp.int32, sharding=program.batch_sharding)
           for k in ('inputs', 'targets')}
  with jax.set_mesh(mesh), nn.logical_axis_rules(program.rules):
    return program.jitted_train_step.__wrapped__.lower(
        program.abstract_state, batch, program.abstract_frozen).compile()


def test_splash_attention_compiles_for_a_tpu_topology():
  splash = _compiled_train_step('splash', window=128).as_text()
  # forward, and the dq and dkv backward kernels, as Mosaic TPU kernels
  assert splash.count('tpu_custom_call') == 3
  assert 'all-gather' in splash   # FSDP's parameter gathers
  assert _compiled_train_step('xla').as_text().count('tpu_custom_call') == 0

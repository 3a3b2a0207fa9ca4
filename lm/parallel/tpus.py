"""Cloud TPU generations and slice names: chips per host, HBM and peak FLOP/s per chip, and the
abstract chips of a slice (libtpu's topology description, no TPU needed) for `lm.plan`."""
import dataclasses
import importlib.util
import math
import os
import re

from lm.config.checks import ConfigError


@dataclasses.dataclass(frozen=True)
class Generation:
  device_kind: str      # jax.Device.device_kind
  hbm_gb: float         # per chip, GB (1e9 bytes)
  peak_flops: float     # dense bf16 FLOP/s per chip
  chips_per_host: int
  counts_cores: bool    # the slice name counts TensorCores (2 per chip), not chips
  dims: int             # torus dimensions (3: v4 / v5p, 2: v5e / v6e)


# Google's data sheets (HBM there in GiB: v6e 32, v5e 16, v5p 95, v4 32).
# In this order, so that device kinds match by substring ('TPU v5 lite' before 'TPU v5').
GENERATIONS = {
    'v6e': Generation('TPU v6 lite', 34.36, 918e12, 4, False, 2),
    'v5e': Generation('TPU v5 lite', 17.18, 197e12, 4, False, 2),
    'v5p': Generation('TPU v5', 102.0, 459e12, 4, True, 3),
    'v4': Generation('TPU v4', 34.36, 275e12, 4, True, 3),
}
ALIASES = {'v5litepod': 'v5e', 'v6litepod': 'v6e'}
_powers = lambda low, high: tuple(2 ** i for i in range(20) if low <= 2 ** i <= high)
# slice sizes in the slice name's unit (cores for v4 / v5p, chips for v5e / v6e)
SIZES = {'v4': _powers(8, 4096), 'v5p': _powers(8, 8192), 'v5e': (1,) + _powers(4, 256),
         'v6e': (1,) + _powers(4, 256)}


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str             # as given: v5p-64, v5litepod-16, or libtpu's v5e:2x2
  generation: str
  shape: tuple[int, ...]

  @property
  def chips(self) -> int:
    return math.prod(self.shape)

  @property
  def spec(self) -> Generation:
    return GENERATIONS[self.generation]

  def devices(self) -> list:
    """The slice's chips as abstract JAX devices (one per chip: megacore on v4 / v5p)."""
    if importlib.util.find_spec('libtpu') is None:
      raise ConfigError("planning for TPU needs libtpu: pip install -e '.[tpu]'")
    from jax.experimental import topologies
    # libtpu takes a lock file against a second process using the same TPU; nothing here
    # runs on one, and several planning processes (test workers) must coexist
    os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
    options = {}
    if self.spec.counts_cores:
      options['chip_config_name'] = 'megacore'
    elif self.chips <= 8:   # v5e-1 .. v5e-8 (and v6e) are one host
      options['chips_per_host_bounds'] = (*self.shape, 1)
    name = f'{self.generation}:{"x".join(map(str, self.shape))}'
    return topologies.get_topology_desc(platform='tpu', topology_name=name, **options).devices


def torus(chips: int, dims: int) -> tuple[int, ...]:
  """The slice shape Cloud TPU gives `chips` chips: grow from 2x2(x1) by doubling the last of
  the smallest dimensions (v5p-64: 2x4x4; v5e-32: 4x8)."""
  if chips == 1:
    return (1,) * dims
  shape = [2, 2] + [1] * (dims - 2)
  while math.prod(shape) < chips:
    smallest = min(shape)
    shape[max(i for i, s in enumerate(shape) if s == smallest)] *= 2
  return tuple(shape)


def known() -> str:
  return (', '.join(f'{g}-{s[0]} .. {g}-{s[-1]}' for g, s in SIZES.items())
          + " (powers of two; v5e-N is also v5litepod-N), or libtpu's GEN:AxB[xC] (v5e:2x2)")


def parse(name: str) -> Topology:
  """A slice name as Cloud TPU writes it (v4-32, v5e-16 / v5litepod-16, v5p-64, v6e-8) or as
  libtpu does (v5e:2x2, v5p:2x2x1)."""
  if match := re.fullmatch(r'(v\w+?):(\d+(?:x\d+)*)', name):
    generation = ALIASES.get(match[1], match[1])
    shape = tuple(int(s) for s in match[2].split('x'))
    if generation in GENERATIONS and len(shape) == GENERATIONS[generation].dims:
      return Topology(name, generation, shape)
  elif match := re.fullmatch(r'(v\w+?)-(\d+)', name):
    generation, size = ALIASES.get(match[1], match[1]), int(match[2])
    if size in SIZES.get(generation, ()):
      spec = GENERATIONS[generation]
      return Topology(name, generation, torus(size // (2 if spec.counts_cores else 1), spec.dims))
  raise ConfigError(f'--topology={name!r} is not a known TPU slice; known: {known()}')

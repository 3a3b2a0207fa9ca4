"""What a run is: the defaults and their choices (`base`), checks of one value (`checks`), the
rules of every section (`validation`) and sweeps (`sweeps`). Experiments import this package
as `from lm import config as config_lib`; its names are `base`'s."""
from lm.config import base, checks, rundir, validation, variants

ConfigError = checks.ConfigError
one_of = checks.one_of
ARCHITECTURE = base.ARCHITECTURE
ATTENTION_IMPLEMENTATIONS = base.ATTENTION_IMPLEMENTATIONS
DATA_FORMATS = base.DATA_FORMATS
DEFAULT_DATA_DIR = base.DEFAULT_DATA_DIR
EVERY_CHECKPOINT = base.EVERY_CHECKPOINT
MESH_AXES = base.MESH_AXES
RunDir = rundir.RunDir
OBJECTIVES = base.OBJECTIVES
OPTIMIZERS = base.OPTIMIZERS
PACKINGS = base.PACKINGS
REMAT_POLICIES = base.REMAT_POLICIES
SCHEDULES = base.SCHEDULES
TOKENIZERS = base.TOKENIZERS
get_base_config = base.get_base_config
mesh_shape = base.mesh_shape
read_variant = variants.read
resolve = base.resolve
saved = base.saved
validate = validation.validate
with_architecture_of_init_from = base.with_architecture_of_init_from


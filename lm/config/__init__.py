"""What a run is: the defaults and their choices (`base`), checks of one value (`checks`), the
post-training sections' rules (`post`) and sweeps (`sweeps`). Experiments import this package
as `from lm import config as config_lib`; its names are `base`'s."""
from lm.config.base import (
                            ARCHITECTURE,
                            ATTENTION_IMPLEMENTATIONS,
                            DATA_FORMATS,
                            DEFAULT_DATA_DIR,
                            MESH_AXES,
                            OBJECTIVES,
                            OPTIMIZERS,
                            PACKINGS,
                            REMAT_POLICIES,
                            SCHEDULES,
                            TOKENIZERS,
                            get_base_config,
                            mesh_shape,
                            resolve,
                            saved,
                            validate,
                            with_architecture_of_init_from,
)
from lm.config.checks import ConfigError, one_of

__all__ = ['ARCHITECTURE', 'ATTENTION_IMPLEMENTATIONS', 'DATA_FORMATS', 'DEFAULT_DATA_DIR',
           'MESH_AXES', 'OBJECTIVES', 'OPTIMIZERS', 'PACKINGS', 'REMAT_POLICIES', 'SCHEDULES',
           'TOKENIZERS', 'ConfigError', 'get_base_config', 'mesh_shape', 'one_of', 'resolve',
           'saved', 'validate', 'with_architecture_of_init_from']

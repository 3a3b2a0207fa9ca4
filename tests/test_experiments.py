"""Every experiment file gives a valid config; the model sizes are the ones they claim."""
import importlib.util
import subprocess
import sys

import pytest
from etils import epath

from lm import config as config_lib
from lm.model import transformer as model_lib

EXPERIMENTS = sorted((epath.Path(__file__).parent.parent / 'experiments').glob('[!_]*.py'))


def _load(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize('path', EXPERIMENTS, ids=lambda p: p.stem)
@pytest.mark.parametrize('devices', [1, 8])
def test_experiment_configs_validate(path, devices):
  config = config_lib.resolve(_load(path).get_config(), 65)
  if config.train.batch_size % devices:
    # a batch that 8 devices cannot split (the CPU recipe's 12) must say so clearly
    with pytest.raises(config_lib.ConfigError, match='not divisible by data x fsdp'):
      config_lib.validate(config, devices)
  else:
    config_lib.validate(config, devices)
  text = path.read_text()
  assert 'python -m lm.main' in text or 'python -m launch.sweep' in text, 'no run command'


# GPT-2's sizes with the vocabulary padded to 50,304 (Hugging Face's counts of the 50,257 are
# 124.44M, 354.82M, 774.03M, 1557.61M); Llama 3.2 1B and Llama 3 8B exactly as published
@pytest.mark.parametrize('name, vocab, millions', [
    ('gpt2_124m_lm1b', 50304, 124.48), ('gpt2_350m_lm1b', 50304, 354.87),
    ('gpt2_774m_lm1b', 50304, 774.09), ('gpt2_1.5b_lm1b', 50304, 1557.69),
    ('llama3_1b_lm1b', 128256, 1235.81), ('llama3_8b_lm1b', 128256, 8030.26),
    ('shakespeare_char', 65, 0.81), ('shakespeare_char_gpu', 65, 10.8)])
def test_model_sizes(name, vocab, millions):
  config = config_lib.resolve(_load(EXPERIMENTS[[p.stem for p in EXPERIMENTS].index(name)])
                              .get_config(), vocab)
  total = model_lib.ModelConfig.from_config(config.model).param_counts()['total']
  assert abs(total / 1e6 - millions) < 0.01, total


def test_an_experiment_importing_a_sibling_loads_from_a_script_anywhere(tmp_path):
  """`python benchmarks/x.py --config experiments/llama3_8b_lm1b.py` (sys.path[0] is the
  script's folder, not the repository) reads the 8B experiment, which imports the 1B one."""
  root = epath.Path(__file__).parent.parent
  script = tmp_path / 'script.py'
  script.write_text('import sys\nfrom lm.config import arguments\n'
                    "parser = arguments.parser('script', None)\narguments.add_config(parser)\n"
                    'print(arguments.parse(parser, sys.argv[1:]).config.model.n_layers)\n')
  result = subprocess.run([sys.executable, str(script), '--config',
                           str(root / 'experiments/llama3_8b_lm1b.py')],
                          capture_output=True, text=True, cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split() == ['32']

"""Bad input gives one clear line naming the field or file, before anything compiles."""
import os
import pathlib
import re
import subprocess
import sys

import pytest
from etils import epath

from lm import config as config_lib
from lm.config import reference
from lm.data import pipeline, sources
from tests.conftest import command_env, tiny_config

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _validate(config, devices=8):
  config_lib.validate(config_lib.resolve(config, None), devices)


@pytest.mark.parametrize('overrides, devices, message', [
    ({'model.d_model': 30}, 8, r'config.model.d_model=30 is not divisible by .*n_heads=8'),
    ({'model.n_kv_heads': 3}, 8, r'config.model.n_heads=8 is not divisible by .*n_kv_heads=3'),
    # the quantization checks divide by n_heads: the model's own checks must come first
    ({'model.n_heads': 0}, 1, r'config.model.n_heads=0 must be positive'),
    ({'mesh.shape': (2, 2, 1, 1)}, 8, r'config.mesh.shape=\(2, 2, 1, 1\) needs 4 devices but 8'),
    ({'mesh.shape': (-1, 3, 1, 1)}, 8, r'does not divide the 8 devices'),
    ({'train.batch_size': 12}, 8, r'global batch .* not divisible by data x fsdp = 8'),
    ({'data.seq_len': 100, 'model.max_len': 64}, 1,
     r'config.data.seq_len=100 is longer than .*max_len=64'),
    ({'optim.name': 'adamww'}, 1, r"optim.name='adamww' is not one of .*did you mean 'adamw'"),
    ({'optim.schedule': 'cosin'}, 1, r"config.optim.schedule='cosin' is not one of"),
    ({'model.remat': 'dot'}, 1, r"config.model.remat='dot' is not one of"),
    ({'model.attention': 'flash'}, 1, r"config.model.attention='flash' is not one of"),
    ({'model.attention': 'cudnn'}, 1, r"attention='cudnn' needs a 16-bit"),
    ({'model.attention_window': 0}, 1, r'config.model.attention_window=0 must be a positive'),
    ({'model.attention_window': 8, 'model.causal': False}, 1,
     r'attention_window=8 must be .* on a causal model'),
    ({'mesh.shape': (1, 1, 8, 1), 'model.n_heads': 4, 'model.n_kv_heads': 4}, 8,
     r'config.model.n_heads=4 is not divisible by the tensor mesh axis \(8\)'),
    ({'optim.warmup_steps': 50, 'train.steps': 20}, 1, r'warmup_steps=50 must be .* less than'),
    ({'train.objective': 'ppo2'}, 1, r"config.train.objective='ppo2' is not one of"),
    ({'train.objective': 'sft'}, 1, r"objective='sft' reads config.data.format='sft', got 'text'"),
    ({'train.objective': 'dpo', 'data.format': 'preference', 'data.source': 'jsonl:p.jsonl'}, 1,
     r"objective='dpo' needs config.train.init_from"),
    ({'train.objective': 'grpo', 'data.format': 'prompt', 'data.source': 'jsonl:p.jsonl',
      'train.init_from': 'runs/sft', 'rl.reward': 'exact_match'}, 1,
     r"config.rl.reward='exact_match' must be 'model:RUN_DIR' or 'python:module:function'"),
    ({'data.format': 'sft'}, 1, r"objective='lm' reads config.data.format='text', got 'sft'"),
    ({'train.objective': 'reward', 'data.format': 'preference', 'data.source': 'jsonl:p.jsonl',
      'lora.rank': 4}, 1, r'config.lora.rank=4 with .*reward'),
    ({'model.parametrization': 'mu'}, 1, r"config.model.parametrization='mu' is not one of"),
    ({'model.parametrization': 'mup'}, 1,
     r'config.model.mup_base_width=0 must be a positive multiple of config.model.n_heads=8'),
    ({'model.parametrization': 'mup', 'model.mup_base_width': 12}, 1,
     r'config.model.mup_base_width=12 must be a positive multiple of config.model.n_heads=8'),
    ({'model.parametrization': 'mup', 'model.mup_base_width': 16, 'optim.name': 'sgd'}, 1,
     r"parametrization='mup' scales the learning rates of Adam-like optimizers .* got "
     r"config.optim.name='sgd'"),
])
def test_bad_config_names_the_field(overrides, devices, message):
  config = tiny_config()
  for key, value in overrides.items():
    section, name = key.split('.')
    config[section][name] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    _validate(config, devices)


def test_tiny_config_is_valid():
  _validate(tiny_config(), 8)


@pytest.mark.parametrize('content, message', [
    (None, 'file not found'), (b'', 'file is empty'), (b'  \n', 'file is empty'),
    (b'hello \xff\xfe world', 'is not UTF-8 text \\(bad byte at offset 6\\)'),
])
def test_bad_corpus_file_names_the_file(tmp_path, content, message):
  path = epath.Path(tmp_path) / 'corpus.txt'
  if content is not None:
    path.write_bytes(content)
  c = tiny_config()
  c.data.source = f'text:{path}'
  with pytest.raises(config_lib.ConfigError, match=f'config.data.source: .*{message}'):
    sources.documents(c.data)


def test_corpus_shorter_than_a_sequence(tmp_path, tfds_dir):
  path = epath.Path(tmp_path) / 'short.txt'
  path.write_text('a few words\n' * 40)
  c = tiny_config()
  c.data.update(source=f'text:{path}', seq_len=64, dir=tfds_dir)
  with pytest.raises(config_lib.ConfigError, match=r'validation split has \d+ tokens, fewer '
                                                   r'than one sequence'):
    pipeline.make_data(c, None)


def test_unknown_source_kind():
  c = tiny_config()
  c.data.source = 'hf:wikitext'
  with pytest.raises(config_lib.ConfigError, match="config.data.source='hf:wikitext' must be"):
    sources.documents(c.data)


def test_main_prints_one_line_and_exits_2(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'lm.main', '--config', 'experiments/shakespeare_char.py',
       '--workdir', str(tmp_path), '--config.model.n_heads=3'],
      capture_output=True, text=True, env=command_env(), cwd=epath.Path(__file__).parent.parent)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      'error: config.model.d_model=128 is not divisible by config.model.n_heads=3')


@pytest.mark.parametrize('arguments, line', [
    (['--config', 'experiments/shakespeare_char.py:smok', '--workdir', 'W'],
     "error: --config=experiments/shakespeare_char.py:smok: unknown variant 'smok' (did you mean "
     "'smoke'?); the variants are 'smoke' or none"),
    (['--config', 'experiments/reverse.py:grpo,dat=x', '--workdir', 'W'],
     "error: --config=experiments/reverse.py:grpo,dat=x: unknown variant option 'dat=x' "
     '(options: data=..., runs=...)'),
    (['--config', 'experiments/gpt2_124m_lm1b.py:smoke', '--workdir', 'W'],
     'error: --config=experiments/gpt2_124m_lm1b.py:smoke: experiments/gpt2_124m_lm1b.py has no '
     'variants (give the file alone)'),
    (['--config', 'experiments/shakespeare_char.py', '--workdri', 'W'],
     'error: unrecognized arguments: --workdri W; did you mean --workdir? (python -m lm.main '
     '--help lists the flags)'),
    (['--workdir', 'W'], 'error: the following arguments are required: --config (python -m '
     'lm.main --help lists the flags)'),
    (['--config', 'experiments/shakespeare_char.py', '--workdir', 'W', 'W2'],
     'error: unrecognized arguments: W2 (python -m lm.main --help lists the flags)'),
    (['--config', 'experiments/shakespeare_char.py'],
     'error: --workdir is required (the run directory; it resumes if it holds checkpoints)'),
    (['--config', 'experiments/shakespeare_char.py', '--workdir', 'W', '--config.train.steps=abc'],
     "error: flag --config.train.steps=abc: invalid literal for int() with base 10: 'abc'"),
])
def test_a_mistyped_command_line_is_one_line_and_exit_2(arguments, line):
  result = subprocess.run([sys.executable, '-m', 'lm.main', *arguments], capture_output=True,
                          text=True, env=command_env(), cwd=epath.Path(__file__).parent.parent)
  assert (result.returncode, result.stderr.strip().splitlines()) == (2, [line])


def test_show_config_prints_every_resolved_key_with_its_meaning():
  result = subprocess.run([sys.executable, '-m', 'lm.main', '--config',
                           'experiments/shakespeare_char.py:smoke', '--show_config',
                           '--config.train.steps=7'], capture_output=True, text=True,
                          env=command_env(), cwd=epath.Path(__file__).parent.parent)
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.splitlines()
  assert 'train.steps = 7' in lines
  assert 'model.d_ff = 512                                   # 0: 4 * d_model' in lines   # resolved
  assert len(lines) == len(reference.comments())   # one line per key


@pytest.mark.parametrize('command', ['lm.main', 'lm.plan', 'lm.sample', 'lm.hf', 'launch.sweep'])
def test_help_exits_0(command):
  result = subprocess.run([sys.executable, '-m', command, '--help'], capture_output=True,
                          text=True, env=command_env(), cwd=epath.Path(__file__).parent.parent)
  assert result.returncode == 0 and '--' in result.stdout, result.stderr[-2000:]


@pytest.mark.parametrize('line, message', [
    ('{"prompt": "a"}', r"p.jsonl:2: missing string field 'response'"),
    ('{"prompt": "a", "response": 3}', r"p.jsonl:2: missing string field 'response'"),
    ('not json', r'p.jsonl:2: not JSON'),
    ('{"messages": [{"role": "user", "content": "hi"}]}', r'p.jsonl:2: .*no "assistant"'),
])
def test_bad_post_training_jsonl_names_file_and_line(tmp_path, line, message):
  from lm.data import examples as post_data
  path = tmp_path / 'p.jsonl'
  path.write_text('{"prompt": "q", "response": "r"}\n' + line + '\n')
  with pytest.raises(config_lib.ConfigError, match=message):
    post_data.read_examples(str(path), 'sft')


def test_overlong_examples_error_or_are_truncated_and_counted():
  from lm.data import examples as post_data
  from lm.data import tokenizers
  examples = [{'prompt': 'abc', 'response': 'defghij'}, {'prompt': 'a', 'response': 'b'}]
  strict = post_data.Truncation('error', 6, 'train')
  with pytest.raises(config_lib.ConfigError, match=r'overlong=error: example 0 of the train '
                     r'split has 11 tokens, more than the 6'):
    post_data.sft_rows(tokenizers.ByteTokenizer(), examples, 5, False, strict)
  lenient = post_data.Truncation('truncate', 6, 'train')
  rows = post_data.sft_rows(tokenizers.ByteTokenizer(), examples, 5, False, lenient)
  assert lenient.count == 1 and rows['weights'][0].sum() == 3   # 'efg' of the response


def test_python_reward_that_cannot_be_imported_names_the_spec():
  from lm.training import rollouts as rl
  with pytest.raises(config_lib.ConfigError,
                     match=r'config.rl.reward=python:lm.tasks.reverse:nope'):
    rl.python_reward('lm.tasks.reverse:nope')


def test_a_checkpoint_signature_records_every_architecture_field_and_reads_old_ones():
  """config.ARCHITECTURE is the one list: changing any of its fields changes the signature
  that resume compares, and a field added later is left out while it keeps the value that
  checkpoints written before it imply (so that they still resume)."""
  import ml_collections

  from lm.training import checkpoint
  base = config_lib.get_base_config()
  plain = checkpoint.signature(config_lib.resolve(base, 65), 'tokenizer', 1)
  for field, before in config_lib.ARCHITECTURE.items():
    assert (f'model.{field}' in plain) == (before == config_lib.EVERY_CHECKPOINT), field
    changed = ml_collections.ConfigDict(base.to_dict())
    value = changed.model[field]
    changed.model[field] = {bool: lambda v: not v, int: lambda v: v + 1, float: lambda v: v * 2,
                            str: lambda v: v + 'x'}.get(type(value), lambda v: 3)(value)
    if field == 'lowrank_targets':   # recorded only where it matters: with a rank
      changed.model.lowrank_rank = plain_rank = 2
      assert checkpoint.differences(
          {**plain, 'model.lowrank_rank': plain_rank},
          checkpoint.signature(config_lib.resolve(changed, 65), 'tokenizer', 1)) == [
              f"config.model.lowrank_targets was '(absent)', now {changed.model[field]!r}"]
      continue
    problems = checkpoint.differences(
        plain, checkpoint.signature(config_lib.resolve(changed, 65), 'tokenizer', 1))
    assert any(f'config.model.{field}' in p for p in problems), (field, problems)


def test_a_run_validates_once_before_any_io_and_once_with_the_vocabulary(tmp_path, monkeypatch):
  from lm.training import loop
  calls, validate = [], config_lib.validate
  workdir = tmp_path / 'run'

  def spy(config, device_count, vocab_size=None, training=True):
    calls.append((vocab_size, workdir.exists()))
    validate(config, device_count, vocab_size, training)
  monkeypatch.setattr(config_lib, 'validate', spy)
  config = tiny_config(vocab_size=-1)
  config.train.update(steps=2, eval_every=2, checkpoint_every=2, eval_batches=1)
  config.sample.num_tokens = 0
  loop.train(config, workdir)
  # the char tokenizer of the embedded Tiny Shakespeare: 65 characters
  assert calls == [(None, False), (65, True)], calls

  calls.clear()   # the tokenizer's ids must fit the model's vocabulary
  config.model.vocab_size = 64
  with pytest.raises(config_lib.ConfigError, match=r"config.model.vocab_size=64 is smaller than "
                     r"the 65 ids of the 'char' tokenizer"):
    loop.train(config, tmp_path / 'small_vocabulary')
  assert [vocab for vocab, _ in calls] == [None, 65]


@pytest.mark.parametrize('devices, expected', [([], 'cpu'), (['/dev/accel0'], None),
                                               (['/dev/nvidia0'], None)])
def test_commands_skip_libtpu_where_the_machine_has_no_accelerator(monkeypatch, devices, expected):
  """Without a TPU or GPU, JAX is told to use the CPU alone: an installed libtpu then never
  starts (and prints its page of warnings); JAX_PLATFORMS, when set, is left alone."""
  from lm import cli
  monkeypatch.delenv('JAX_PLATFORMS')
  monkeypatch.setattr(cli.glob, 'glob', lambda pattern: [d for d in devices if
                                                         d.startswith(pattern.split('*')[0][:9])])
  cli.skip_absent_tpu()
  assert os.environ.get('JAX_PLATFORMS') == expected
  monkeypatch.setenv('JAX_PLATFORMS', 'tpu')
  cli.skip_absent_tpu()
  assert os.environ['JAX_PLATFORMS'] == 'tpu'


COMMANDS = [('lm.main', []), ('lm.plan', []), ('lm.sample', []), ('lm.evaluate', []),
            ('lm.reward', []), ('lm.export', []), ('lm.quantize', []), ('lm.lowrank', []),
            ('lm.compare', []), ('lm.scaling', ['fit']), ('lm.scaling', ['plan']),
            ('lm.hf', ['import']), ('lm.hf', ['export']), ('lm.tasks.reverse', ['make']),
            ('lm.tasks.reverse', ['eval']), ('lm.mup', ['coord_check']), ('lm.mup', ['transfer']),
            ('launch.sweep', []), ('launch.runner', []),
            ('launch.local', []),
            *((f'benchmarks/{path.name}', []) for path in sorted(
                (ROOT / 'benchmarks').glob('*.py')) if path.stem not in (
                    'torch_reference',   # PyTorch's side, which needs nothing of lm
                    'maxtext_compile'))]   # a library of vs_maxtext, no command


def _command(name: str):
  """The module of a command: lm.x, launch.x, or a script in benchmarks/."""
  import importlib
  import importlib.util
  if not name.endswith('.py'):
    return importlib.import_module(name)
  spec = importlib.util.spec_from_file_location(pathlib.Path(name).stem, ROOT / name)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize('command, sub', COMMANDS, ids=[' '.join([c, *s]) for c, s in COMMANDS])
def test_every_flag_of_a_command_has_help(command, sub, capsys):
  """One style (lm.config.arguments.parser) in every command: --help exits 0 and each flag's
  help line says what it is (and its default)."""
  with pytest.raises(SystemExit) as exited:
    _command(command).main([*sub, '--help'])
  assert exited.value.code == 0
  lines = capsys.readouterr().out.splitlines()
  options = lines[next(i for i, line in enumerate(lines) if line.startswith('options')) + 1:]
  bare = [line for i, line in enumerate(options)
          if re.match(r'^  -', line) and '  ' not in line.strip()
          and not (i + 1 < len(options) and re.match(r'^ {10,}\S', options[i + 1]))]
  assert not bare, bare
  assert sum(re.match(r'^  -', line) is not None for line in options) >= 2   # flags were read


@pytest.mark.parametrize('command, sub', COMMANDS, ids=[' '.join([c, *s]) for c, s in COMMANDS])
def test_a_mistyped_flag_is_one_line_naming_the_closest(command, sub, capsys):
  with pytest.raises(SystemExit) as exited:
    _command(command).main([*sub, '--hepl'])
  assert exited.value.code == 2
  error, = capsys.readouterr().err.splitlines()
  # a mistyped flag is named, also where a required flag is missing (it may be the one mistyped)
  assert re.fullmatch(r'error: unrecognized arguments: --hepl; did you mean --help\? '
                      r'\(.* --help lists the flags\)', error), error


def test_a_prefix_of_a_flag_is_not_taken_for_it(capsys):
  from lm import sample
  with pytest.raises(SystemExit) as exited:
    sample.main(['--workdir', 'W', '--prompt', 'x', '--max_new_token', '5'])
  assert exited.value.code == 2
  assert 'unrecognized arguments: --max_new_token 5' in capsys.readouterr().err


def test_a_run_that_fails_to_start_leaves_no_directory_and_one_line(tmp_path):
  """It fails after its workdir was made (the tokenizer is built, then found too large)."""
  workdir = tmp_path / 'run'
  result = subprocess.run(
      [sys.executable, '-m', 'lm.main', '--config', 'experiments/shakespeare_char.py:smoke',
       '--workdir', str(workdir), '--config.model.vocab_size=10'], capture_output=True,
      text=True, env=command_env(), cwd=epath.Path(__file__).parent.parent)
  assert (result.returncode, result.stderr.strip().splitlines()) == (2, [
      "error: config.model.vocab_size=10 is smaller than the 65 ids of the 'char' tokenizer"])
  assert not workdir.exists()

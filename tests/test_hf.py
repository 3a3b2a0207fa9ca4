"""Hugging Face interop without torch: the committed tiny models of tests/fixtures/ (made by
make_hf_fixtures.py) import to the logits transformers computed, export and re-import
bitwise, their tokenizer is a tokenizer kind, and bad input is one line, exit 2."""
import json
import shutil

import jax
import numpy as np
import pytest
import safetensors.numpy
import tokenizers as hf_tokenizers
from etils import epath

from lm import cli
from lm import hf as hf_command
from lm.data import tokenizers
from lm.interop import hf
from lm.tools import lowrank
from lm.training import runs
from tests.conftest import flat

FIXTURES = epath.Path(__file__).parent / 'fixtures'


def logits_of(run, tokens):
  return np.asarray(jax.jit(run.model.apply)(run.variables, tokens))


@pytest.mark.parametrize('name, mesh_shape', [('hf_tiny_llama', (1, 4, 2, 1)),
                                              ('hf_tiny_gpt2', (1, 1, 1, 1))])
def test_fixture_imports_to_the_logits_of_transformers(tmp_path, name, mesh_shape):
  summary = hf.import_model(str(FIXTURES / name), str(tmp_path / 'run'), mesh_shape)
  if mesh_shape != (1, 1, 1, 1):   # read onto the mesh: each device holds its block only
    q = summary['params']['layers']['attn']['q']['kernel']   # layers, embed/fsdp, heads/tensor
    assert q.addressable_shards[0].data.shape == (2, 32 // 4, 4 // 2, 8)
  expected = np.load(FIXTURES / name / 'expected.npz')
  run = runs.load(str(tmp_path / 'run'), 'run')
  np.testing.assert_allclose(logits_of(run, expected['tokens']), expected['logits'], atol=1e-4,
                             rtol=0)


@pytest.mark.parametrize('name, dtype', [('hf_tiny_llama', 'float32'),
                                         ('hf_tiny_gpt2', 'bfloat16')])
def test_export_writes_the_original_tensors_and_reimports_bitwise(tmp_path, name, dtype):
  hf.import_model(str(FIXTURES / name), str(tmp_path / 'a'))
  files = hf.export_model(str(tmp_path / 'a'), str(tmp_path / 'hf'), dtype, max_shard_bytes=50_000)
  assert len(files) > 1 and (tmp_path / 'hf' / hf.INDEX).exists()   # sharded, with an index
  original = safetensors.numpy.load_file(str(FIXTURES / name / 'model.safetensors'))
  exported = {}
  for file in files:
    exported.update(safetensors.numpy.load_file(str(tmp_path / 'hf' / file)))
  original = {k.removeprefix('transformer.'): v for k, v in original.items()}
  exported = {k.removeprefix('transformer.'): v for k, v in exported.items()}
  assert set(exported) == set(original)
  for k, v in original.items():
    assert exported[k].dtype == v.dtype and np.array_equal(exported[k], v), k
  hf.import_model(str(tmp_path / 'hf'), str(tmp_path / 'b'))
  a, b = (flat(runs.load(str(tmp_path / r), 'run').variables) for r in 'ab')
  for k in a:
    assert np.array_equal(a[k], b[k]), k
  config = json.loads((tmp_path / 'hf' / 'config.json').read_text())
  for key in ('vocab_size', 'eos_token_id', 'bos_token_id', 'tie_word_embeddings'):
    assert config[key] == json.loads((FIXTURES / name / 'config.json').read_text())[key], key


def test_low_rank_and_unrolled_runs_export_their_dense_kernels(tmp_path):
  """A full-rank factored run (lm.lowrank) exports the fixture's own tensors (u @ v multiplied
  out), and the same run with unrolled layers exports the same file."""
  hf.import_model(str(FIXTURES / 'hf_tiny_llama'), str(tmp_path / 'a'))
  lowrank.compress(str(tmp_path / 'a'), str(tmp_path / 'r'), 32, None, 'attn/(q|kv|o)|mlp/wi')
  run = runs.load(str(tmp_path / 'r'), 'run')
  config = run.config
  config.model.scan_layers = False
  unrolled = {k: v for k, v in run.variables['params'].items() if k != 'layers'}
  for i in range(config.model.n_layers):
    unrolled[f'layers_{i}'] = jax.tree.map(lambda x, i=i: np.asarray(x[i]),
                                           run.variables['params']['layers'])
  runs.write(tmp_path / 'u', config, unrolled, run.tokenizer, step=0)
  original = safetensors.numpy.load_file(str(FIXTURES / 'hf_tiny_llama' / 'model.safetensors'))
  for name in ('r', 'u'):
    hf.export_model(str(tmp_path / name), str(tmp_path / f'hf_{name}'))
    exported = safetensors.numpy.load_file(str(tmp_path / f'hf_{name}' / 'model.safetensors'))
    assert set(exported) == set(original)
    for k, v in original.items():
      np.testing.assert_allclose(exported[k], v, atol=1e-5, err_msg=k)


def test_hf_tokenizer_is_a_tokenizer_kind_with_its_special_tokens(tmp_path):
  kind = f'hf:{FIXTURES / "hf_tiny_llama"}'
  tokenizer = tokenizers.load_or_build(kind, iter(()), 0, tmp_path / 'tokenizer.json')
  assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id) == (320, 0, 1)
  text = 'Q: 0123 A: 3210\nFirst Citizen!'
  ids = tokenizer.encode(text)
  assert ids.dtype == np.int32 and 0 not in ids
  assert tokenizer.decode(ids) == text
  # a Llama-style post-processor that prepends BOS: examples are encoded without it
  spec = hf_tokenizers.Tokenizer.from_file(str(FIXTURES / 'hf_tiny_llama' / 'tokenizer.json'))
  spec.post_processor = hf_tokenizers.processors.TemplateProcessing(
      single='<s> $A', special_tokens=[('<s>', 0)])
  assert spec.encode(text).ids[0] == 0
  with_bos = tokenizers.HuggingFaceTokenizer(spec.to_str().encode(), tokenizer.special_ids)
  assert np.array_equal(with_bos.encode(text), ids)
  again = tokenizers.load(tmp_path / 'tokenizer.json', 'hf:elsewhere')   # the saved copy
  assert np.array_equal(again.encode(text), ids) and again.fingerprint == tokenizer.fingerprint
  with pytest.raises(tokenizers.ConfigError, match="holds a 'hf' tokenizer"):
    tokenizers.load(tmp_path / 'tokenizer.json', 'char')
  with pytest.raises(tokenizers.ConfigError, match='no tokenizer.json'):
    tokenizers.HuggingFaceTokenizer.from_path(str(tmp_path / 'nowhere'))


def _copy(tmp_path, name='hf_tiny_llama') -> epath.Path:
  target = tmp_path / 'hf'
  shutil.copytree(FIXTURES / name, target)
  return epath.Path(target)


def _edit_config(directory: epath.Path, **changes) -> None:
  config = json.loads((directory / 'config.json').read_text())
  config.update(changes)
  (directory / 'config.json').write_text(json.dumps(config))


def _edit_tensors(directory: epath.Path, edit) -> None:
  tensors = safetensors.numpy.load_file(str(directory / 'model.safetensors'))
  edit(tensors)
  safetensors.numpy.save_file(tensors, str(directory / 'model.safetensors'),
                              metadata={'format': 'pt'})


BAD_INPUT = {
    'no config.json': (lambda d: (d / 'config.json').unlink(), 'no config.json'),
    'no weights': (lambda d: (d / 'model.safetensors').unlink(), 'no model.safetensors'),
    'architecture': (lambda d: _edit_config(d, architectures=['BertModel'], model_type='bert'),
                     "architectures=['BertModel']"),
    'rope scaling': (lambda d: _edit_config(d, rope_parameters={'rope_type': 'linear',
                                                                'factor': 2.0}),
                     'rope_parameters='),
    'head_dim': (lambda d: _edit_config(d, head_dim=16), 'head_dim=16'),
    'biases': (lambda d: _edit_config(d, attention_bias=True), 'attention_bias=True'),
    'missing tensor': (lambda d: _edit_tensors(d, lambda t: t.pop(
        'model.layers.1.self_attn.k_proj.weight')), 'model.layers.1.self_attn.k_proj.weight is'),
    'wrong shape': (lambda d: _edit_tensors(d, lambda t: t.update({
        'model.layers.0.mlp.up_proj.weight': np.zeros((64, 16), np.float32)})),
        'model.layers.0.mlp.up_proj.weight has shape [64, 16], the config implies [64, 32]'),
    'tokenizer vocabulary': (lambda d: _edit_config(d, vocab_size=300),
                             'the tokenizer has 320 tokens, the embedding only 300'),
    'no tokenizer': (lambda d: (d / 'tokenizer.json').unlink(), 'no tokenizer.json'),
}


@pytest.mark.parametrize('case', BAD_INPUT)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, case):
  directory = _copy(tmp_path)
  damage, message = BAD_INPUT[case]
  damage(directory)
  with pytest.raises(SystemExit) as exit_info:
    cli.run(hf_command.main, ['import', '--from', str(directory),
                              '--workdir', str(tmp_path / 'run')])
  err = capsys.readouterr().err
  assert exit_info.value.code == 2 and err.startswith('error: ') and message in err, err
  assert err.count('\n') == 1


def test_gpt2_without_the_transformer_prefix_and_export_refusals(tmp_path, capsys):
  directory = _copy(tmp_path, 'hf_tiny_gpt2')   # as GPT2Model / the original hub checkpoint
  _edit_tensors(directory, lambda t: t.update(
      {k.removeprefix('transformer.'): t.pop(k) for k in list(t)}))
  hf.import_model(str(directory), str(tmp_path / 'run'))
  with pytest.raises(SystemExit):   # a run directory is written once
    cli.run(hf_command.main, ['import', '--from', str(directory),
                              '--workdir', str(tmp_path / 'run')])
  assert 'already holds checkpoints' in capsys.readouterr().err


def test_export_refuses_what_has_no_hugging_face_form(tmp_path, capsys):
  hf.import_model(str(FIXTURES / 'hf_tiny_gpt2'), str(tmp_path / 'run'))
  config = json.loads((tmp_path / 'run' / 'config.json').read_text())
  config['model']['norm'] = 'rmsnorm'   # learned positions with RMSNorm: neither family
  (tmp_path / 'run' / 'config.json').write_text(json.dumps(config))
  with pytest.raises(SystemExit) as exit_info:
    cli.run(hf_command.main, ['export', '--workdir', str(tmp_path / 'run'),
                              '--out', str(tmp_path / 'out')])
  err = capsys.readouterr().err
  assert exit_info.value.code == 2 and 'is neither GPT-2' in err and err.count('\n') == 1, err

  config['model']['norm'] = 'layernorm'
  config['data']['tokenizer'] = 'byte'
  (tmp_path / 'run' / 'config.json').write_text(json.dumps(config))
  (tmp_path / 'run' / 'tokenizer.json').write_text(json.dumps({'kind': 'byte'}))
  with pytest.raises(SystemExit):
    cli.run(hf_command.main, ['export', '--workdir', str(tmp_path / 'run'),
                              '--out', str(tmp_path / 'out')])
  assert "'byte' tokenizer has no tokenizer.json form" in capsys.readouterr().err
  cli.run(hf_command.main, ['export', '--workdir', str(tmp_path / 'run'),
                            '--out', str(tmp_path / 'out'), '--no_tokenizer'])
  assert (tmp_path / 'out' / 'model.safetensors').exists()
  assert not (tmp_path / 'out' / 'tokenizer.json').exists()

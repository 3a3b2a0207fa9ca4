"""Hugging Face interop against transformers itself (torch CPU, the test extra): random GPT-2
and Llama models with every parameter re-randomised, grouped-query attention, eager attention
and sequences long enough for RoPE mistakes to show; imported on one device and on an
FSDP x tensor mesh of 8; exported and reloaded by transformers; greedy decoding token for
token against `generate`."""
import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers

from lm.inference import sampler as sample
from lm.interop import hf
from lm.parallel import sharding
from lm.training import runs
from tests.conftest import command_env
from tests.fixtures.make_hf_fixtures import randomise
from tests.test_hf import FIXTURES
from tests.test_train import ROOT, read_metrics

LENGTH, NEW_TOKENS = 160, 20
CONFIGS = {
    'gpt2': lambda: transformers.GPT2Config(
        vocab_size=320, n_embd=64, n_layer=3, n_head=4, n_positions=256, bos_token_id=0,
        eos_token_id=0, layer_norm_epsilon=1e-5),
    'llama': lambda: transformers.LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
        rope_theta=1000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=0,
        eos_token_id=1),
}


def hf_model(family: str, directory, dtype=torch.float32):
  """A random model saved with save_pretrained (and the fixture's tokenizer) in `directory`;
  returns it in float32 as transformers reloads it."""
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(CONFIGS[family](),
                                                        attn_implementation='eager')
  randomise(model, seed=1)
  model.to(dtype).save_pretrained(directory)
  tokenizer = 'hf_tiny_gpt2' if family == 'gpt2' else 'hf_tiny_llama'
  for name in ('tokenizer.json', 'tokenizer_config.json'):
    shutil.copy(FIXTURES / tokenizer / name, directory / name)
  return load_hf(directory)


def load_hf(directory):
  return transformers.AutoModelForCausalLM.from_pretrained(
      directory, dtype=torch.float32, attn_implementation='eager').eval()


def torch_logits(model, tokens) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


@pytest.mark.parametrize('family, mesh_shape, dtype', [
    ('gpt2', (1, 1, 1, 1), torch.float32),
    ('llama', (1, 1, 1, 1), torch.float32),
    ('gpt2', (1, 4, 2, 1), torch.float16),
    ('llama', (1, 4, 2, 1), torch.bfloat16),
])
def test_import_export_and_greedy_decoding_match_transformers(tmp_path, family, mesh_shape,
                                                              dtype):
  model = hf_model(family, tmp_path / 'hf', dtype)
  tokens = np.random.default_rng(0).integers(0, 320, (2, LENGTH)).astype(np.int32)
  expected = torch_logits(model, tokens)

  summary = hf.import_model(str(tmp_path / 'hf'), str(tmp_path / 'run'), mesh_shape)
  run = runs.load(str(tmp_path / 'run'), 'run')
  mesh = sharding.make_mesh(mesh_shape, jax.devices()[:int(np.prod(mesh_shape))])
  variables = {'params': summary['params']}   # as read onto the mesh
  logits = np.asarray(jax.jit(run.model.apply)(variables, tokens))
  np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)

  # greedy decoding with the KV cache, on the mesh, token for token as generate
  prompt = tokens[0, :LENGTH - NEW_TOKENS - 10]
  sampler = sample.Sampler(run.model_config, mesh, (), 320)
  ours = sampler(variables, [prompt], jax.random.PRNGKey(0),
                 sample.Settings(NEW_TOKENS, greedy=True))[1][0]
  with torch.no_grad():
    ids = torch.tensor(prompt[None])   # an explicit mask: pad_token_id 0 occurs in the prompt
    theirs = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                            min_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                            pad_token_id=0)[0, len(prompt):].numpy()
  np.testing.assert_array_equal(np.asarray(ours)[:NEW_TOKENS], theirs)

  hf.export_model(str(tmp_path / 'run'), str(tmp_path / 'out'))
  np.testing.assert_allclose(torch_logits(load_hf(tmp_path / 'out'), tokens), expected,
                             atol=1e-5, rtol=0)
  tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / 'out')
  text = 'First Citizen: 0123'
  assert tokenizer(text, add_special_tokens=False)['input_ids'] == list(
      run.tokenizer.encode(text))


def _command(module: str, *args: str, cwd) -> str:
  env = command_env(PYTHONPATH=str(ROOT))
  result = subprocess.run([sys.executable, '-m', module, *args], capture_output=True,
                          text=True, env=env, cwd=cwd)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def _generate(directory, prompt: str, new_tokens: int) -> str:
  """transformers' greedy completion, up to EOS."""
  tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
  ids = tokenizer(prompt, return_tensors='pt', add_special_tokens=False)['input_ids']
  with torch.no_grad():
    out = load_hf(directory).generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=new_tokens,
                                      eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.eos_token_id)
  return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _sample(run_dir, prompt: str, new_tokens: int, cwd) -> str:
  """lm.sample's greedy completion, up to EOS."""
  _command('lm.sample', '--workdir', str(run_dir), '--prompt', prompt, '--max_new_tokens',
           str(new_tokens), '--greedy', '--out', 'sampled.jsonl', cwd=cwd)
  return json.loads((cwd / 'sampled.jsonl').read_text())['completion']


def test_readme_flow_import_sample_lora_sft_export_generate(tmp_path):
  """The README's commands: sampling from the import is transformers' generation from the
  original; LoRA-SFT on the task trains; the export (adapters merged) generates in
  transformers what lm.sample generates from the fine-tuned run."""
  base, tuned = tmp_path / 'runs' / 'hf' / 'base', tmp_path / 'runs' / 'hf' / 'lora_sft'
  _command('lm.hf', 'import', '--from', str(FIXTURES / 'hf_tiny_llama'), '--workdir',
           str(base), cwd=tmp_path)
  assert (_sample(base, 'First Citizen:', 12, tmp_path) ==
          _generate(FIXTURES / 'hf_tiny_llama', 'First Citizen:', 12))
  _command('lm.tasks.reverse', 'make', '--out', 'data/reverse', cwd=tmp_path)
  _command('lm.main', '--config', str(ROOT / 'experiments' / 'hf.py:lora_sft'), '--workdir',
           str(tuned), '--config.train.steps=60', '--config.train.eval_every=60',
           '--config.train.checkpoint_every=60', cwd=tmp_path)
  losses = [m['loss'] for m in read_metrics(tuned) if 'loss' in m]
  assert losses[-1] < losses[0] - 0.5, losses
  # lm.evaluate (adapters merged) gives the loss the run measured on its own test split
  evaluated = json.loads(_command('lm.evaluate', '--workdir', str(tuned), '--split', 'test',
                                  cwd=tmp_path))
  final = json.loads((tuned / 'final.json').read_text())
  np.testing.assert_allclose(evaluated['test_loss'], final['test_loss'], rtol=1e-5)
  np.testing.assert_allclose(evaluated['perplexity'], np.exp(final['test_loss']), rtol=1e-5)
  _command('lm.hf', 'export', '--workdir', str(tuned), '--out', 'exports/hf_lora_sft',
           cwd=tmp_path)
  ours = _sample(tuned, 'Q: 1234 A: ', 6, tmp_path)
  assert ours and ours == _generate(tmp_path / 'exports' / 'hf_lora_sft', 'Q: 1234 A: ', 6)

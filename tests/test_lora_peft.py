"""lm's LoRA step for step against Hugging Face PEFT's (torch, the test extra), through
benchmarks/lora_vs_peft.py: the same base exported with `lm.hf export`, the same initial
adapters, batches, optimizer and loss; a Llama-style base, a GPT-2-style one with
rank-stabilised scaling (lora.rslora against PEFT's use_rslora), and the Llama with its
embedding and head trained beside the adapters (lora.train_also against modules_to_save)."""
import json
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import lora_vs_peft
from tests.conftest import command_env
from tests.test_train import ROOT

GPT2_MODEL = ('--config.model.n_layers=2', '--config.model.d_model=64',
              '--config.model.n_heads=4', '--config.model.d_ff=128',
              '--config.model.dtype=float32', '--config.model.scan_layers=False',
              '--config.data.tokenizer=char', '--config.data.seq_len=16',
              '--config.train.batch_size=16', '--config.train.eval_batch_size=32',
              '--config.sample.num_tokens=0', '--config.optim.warmup_steps=5')
LLAMA_MODEL = (*lora_vs_peft.WORDS_MODEL, '--config.train.batch_size=16',
               '--config.optim.warmup_steps=5')


@pytest.fixture(scope='module')
def words(tmp_path_factory):
  out = tmp_path_factory.mktemp('words')
  lora_vs_peft.words_data(out)
  return out


@pytest.mark.parametrize('family, model, rslora, train_also', [
    ('llama', LLAMA_MODEL, False, ''), ('gpt2', GPT2_MODEL, True, ''),
    ('llama', LLAMA_MODEL, False, 'embed|head')])
def test_lm_lora_trains_as_peft_does_step_for_step(words, tmp_path, family, model, rslora,
                                                   train_also):
  base = tmp_path / 'base'   # a few steps of pretraining: the base need not be good
  subprocess.run([sys.executable, '-m', 'lm.main', '--config', 'experiments/shakespeare_char.py',
                  '--workdir', str(base), *model, f'--config.data.source=text:{words}/pretrain.txt',
                  '--config.train.steps=20', '--config.train.eval_every=20',
                  '--config.train.checkpoint_every=20', '--config.train.eval_batches=1',
                  '--config.optim.warmup_steps=5'],
                 check=True, capture_output=True, cwd=ROOT, env=command_env())
  flags = ['experiments/shakespeare_char.py', *model, '--config.train.objective=sft',
           '--config.data.format=sft', lora_vs_peft.split_fractions(300 + 70),
           f'--config.data.source=jsonl:{words}/upper.jsonl']
  # rank 4, alpha 32 (scale 8; rsLoRA: 16 / sqrt(4)) and lr 1e-2: large updates, so that a
  # wrong scale, schedule or optimizer setting shows within the steps
  result = lora_vs_peft.compare(str(base), flags, tmp_path / 'lora', steps=15, rank=4,
                                alpha=32.0 if not rslora else 16.0, lr=1e-2, rslora=rslora,
                                train_also=train_also)
  assert result['family'] == family
  assert len(result['peft']) == 3 and result['lm_trainable'] == result['peft_trainable']
  if train_also:   # the embedding and the head trained in full beside the adapters
    assert result['lm_trainable'] > 2 * 55 * 128
  print(json.dumps({k: v for k, v in result.items() if not k.endswith('_curve')}))
  # float32 on both sides, different kernels: measured 1.4e-7 (llama), 4.0e-7 (gpt2)
  np.testing.assert_allclose(result['lm_curve'], result['peft_curve'], rtol=1e-4)
  assert result['lm_curve'][-1] < 0.95 * result['lm_curve'][0]   # it learned something
  np.testing.assert_allclose(result['lm_held_out_loss'], result['peft_held_out_loss'], rtol=1e-4)
  assert result['lm_held_out_exact'] == result['peft_held_out_exact']


def test_parameters_trained_beside_the_adapters_reach_export_and_evaluation(words, tmp_path):
  """lora.train_also: the head trained in full is saved, restored by `runs.load` over the
  frozen base, merged by `lm.export --merge_lora`, and evaluates the same before and after."""
  from lm.training import runs
  common = ['--config', 'experiments/shakespeare_char.py', *LLAMA_MODEL,
            '--config.train.eval_batches=1']
  base, tuned, exported = tmp_path / 'base', tmp_path / 'tuned', tmp_path / 'exported'
  run = lambda *args: subprocess.run([sys.executable, '-m', *args], check=True,
                                     capture_output=True, text=True, cwd=ROOT, env=command_env())
  run('lm.main', *common, '--workdir', str(base), '--config.train.steps=10',
      f'--config.data.source=text:{words}/pretrain.txt')
  run('lm.main', *common, '--workdir', str(tuned), '--config.train.steps=10',
      '--config.train.objective=sft', '--config.data.format=sft',
      lora_vs_peft.split_fractions(370), f'--config.data.source=jsonl:{words}/upper.jsonl',
      f'--config.train.init_from={base}', '--config.lora.rank=4', '--config.lora.train_also=head',
      '--config.optim.lr=1e-2')
  trained = runs.load(str(tuned), '--workdir')
  original = runs.load(str(base), '--workdir')
  head = lambda r: np.asarray(r.variables['params']['head'])
  assert not np.allclose(head(trained), head(original))   # trained, and restored as trained
  np.testing.assert_array_equal(np.asarray(trained.variables['params']['embed']['embedding']),
                                np.asarray(original.variables['params']['embed']['embedding']))
  run('lm.export', '--workdir', str(tuned), '--out', str(exported), '--merge_lora')
  losses = [json.loads(run('lm.evaluate', '--workdir', str(d), '--split', 'validation').stdout)
            for d in (tuned, exported)]
  np.testing.assert_allclose(losses[0]['val_loss'], losses[1]['val_loss'], rtol=1e-5)

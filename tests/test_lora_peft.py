"""lm's LoRA step for step against Hugging Face PEFT's (torch, the test extra), through
benchmarks/lora_vs_peft.py: the same base exported with `lm.hf export`, the same initial
adapters, batches, optimizer and loss; a Llama-style base, and a GPT-2-style one with
rank-stabilised scaling (lora.rslora against PEFT's use_rslora)."""
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


@pytest.mark.parametrize('family, model, rslora', [('llama', LLAMA_MODEL, False),
                                                   ('gpt2', GPT2_MODEL, True)])
def test_lm_lora_trains_as_peft_does_step_for_step(words, tmp_path, family, model, rslora):
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
                                alpha=32.0 if not rslora else 16.0, lr=1e-2, rslora=rslora)
  assert result['family'] == family
  assert len(result['peft']) == 3 and result['lm_trainable'] == result['peft_trainable']
  print(json.dumps({k: v for k, v in result.items() if not k.endswith('_curve')}))
  # float32 on both sides, different kernels: measured 1.4e-7 (llama), 4.0e-7 (gpt2)
  np.testing.assert_allclose(result['lm_curve'], result['peft_curve'], rtol=1e-4)
  assert result['lm_curve'][-1] < 0.95 * result['lm_curve'][0]   # it learned something
  np.testing.assert_allclose(result['lm_held_out_loss'], result['peft_held_out_loss'], rtol=1e-4)
  assert result['lm_held_out_exact'] == result['peft_held_out_exact']

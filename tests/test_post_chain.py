"""The post-training chain of experiments/reverse.py, run as a user runs it (each stage a
`python -m lm.main` process on one device) and measured on held-out prompts: SFT learns the
task, the reward model ranks held-out pairs, DPO and GRPO raise the rate of right answers
the model samples, PPO runs against the reward model, and LoRA-SFT comes close to full SFT
while training under 5% of the parameters."""
import json
import re
import shutil
import subprocess
import sys

import pytest

from lm.tasks import reverse as tasks
from tests.conftest import command_env
from tests.test_train import ROOT, read_metrics, run_main

# stages of one wave depend only on earlier waves: they run side by side
WAVES = (('pretrain',), ('sft', 'lora_sft', 'qlora_sft'), ('reward', 'dpo', 'grpo'), ('ppo',))
# stages of 400-600 steps compile with LLVM's optimizations; dpo, grpo and ppo (40-60 steps)
# without, as they are faster so (36-41 s of CPU each against 47-50; reward: 131 against 72)
OPTIMIZED = ('pretrain', 'sft', 'lora_sft', 'qlora_sft', 'reward')


@pytest.fixture(scope='module')
def chain(tmp_path_factory, tfds_dir):
  """{stage: (workdir, stdout)} after running every stage, and the data directory."""
  root = tmp_path_factory.mktemp('reverse')
  data, runs = root / 'data', root / 'runs'
  tasks.make(str(data))
  out = {}
  for wave in WAVES:
    started = {}
    for stage in wave:
      extra = ['--config.train.log_every=1'] if stage in ('grpo', 'ppo') else []
      started[stage] = subprocess.Popen(
          [sys.executable, '-m', 'lm.main', '--config',
           f'experiments/reverse.py:{stage},data={data},runs={runs}', '--workdir',
           str(runs / stage), f'--config.data.dir={tfds_dir}', *extra],
          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
          env=command_env(optimized=stage in OPTIMIZED))
    for stage, process in started.items():
      stdout, stderr = process.communicate()
      assert process.returncode == 0, f'{stage}: exit {process.returncode}\n{stderr[-3000:]}'
      out[stage] = (runs / stage, stdout)
  return out, str(data)


@pytest.fixture(scope='module')
def held_out(chain):
  """Exact-match rates (greedy and sampled) of every stage on the test prompts."""
  runs, data = chain
  examples = tasks.heldout(data, 'test')
  return {stage: tasks.evaluate(str(runs[stage][0]), examples) for stage in runs
          if stage != 'reward'}


def _final(runs, stage) -> dict:
  return json.loads((runs[stage][0] / 'final.json').read_text())


def test_sft_learns_what_pretraining_did_not(held_out):
  assert held_out['pretrain']['exact_match'] < 0.05
  assert held_out['sft']['exact_match'] > 0.9


def test_reward_model_ranks_held_out_pairs(chain):
  runs, _ = chain
  assert _final(runs, 'reward')['test_accuracy'] >= 0.9


@pytest.mark.parametrize('stage', ['dpo', 'grpo', 'ppo'])
def test_preference_tuning_raises_the_rate_of_right_answers(held_out, stage):
  """SFT learned from demonstrations of which 30% are wrong and samples wrong answers often;
  DPO (preference pairs), GRPO (exact-match reward) and PPO (the reward model) make it
  sample right ones."""
  before, after = held_out['sft']['sampled_exact_match'], held_out[stage]['sampled_exact_match']
  assert after > before + 0.15, (before, after)
  assert held_out[stage]['exact_match'] >= held_out['sft']['exact_match'] - 0.02


def test_rl_first_update_is_on_policy_and_logs_its_metrics(chain):
  runs, _ = chain
  for stage in ('grpo', 'ppo'):
    first = next(m for m in read_metrics(runs[stage][0]) if m['step'] == 1 and 'loss' in m)
    assert abs(first['ratio'] - 1) < 1e-5 and abs(first['kl']) < 1e-6, (stage, first)
    for key in ('reward', 'entropy', 'response_length', 'clip_fraction'):
      assert key in first, (stage, key)
  assert 'value_loss' in first
  assert _final(runs, 'ppo')['test_reward'] > 0   # the reward model's score, greedy answers


def test_lora_sft_comes_close_to_full_sft_with_few_parameters(chain, held_out):
  runs, _ = chain
  trained, total, percent = re.search(r'trainable parameters ([\d,]+) of ([\d,]+) \(([\d.]+)%\)',
                                      runs['lora_sft'][1]).groups()
  assert float(percent) < 5
  assert int(trained.replace(',', '')) < 0.05 * int(total.replace(',', ''))
  assert held_out['lora_sft']['exact_match'] >= held_out['sft']['exact_match'] - 0.05


def test_qlora_sft_on_an_nf4_base_comes_close_to_lora_sft(chain, held_out):
  """Adapters (rank 16 where LoRA-SFT's are 4) trained on the base stored in NF4 (read back
  from frozen/ when evaluated): the quantized base kernels take under 30% of their bfloat16
  bytes."""
  runs, _ = chain
  stored, percent, bf16 = (float(x.replace(',', '')) for x in re.search(
      r'quantized base kernels ([\d,]+) bytes stored \(([\d.]+)% of their ([\d,]+) bfloat16 '
      r'bytes\)', runs['qlora_sft'][1]).groups())
  assert percent <= 30 and stored <= 0.3 * bf16
  assert held_out['qlora_sft']['exact_match'] >= held_out['lora_sft']['exact_match'] - 0.05
  frozen_bytes = {stage: sum(f.stat().st_size for f in (runs[stage][0] / 'frozen').rglob('*')
                             if f.is_file()) for stage in ('lora_sft', 'qlora_sft')}
  assert frozen_bytes['qlora_sft'] < 0.4 * frozen_bytes['lora_sft'], frozen_bytes


def _command(module: str, *args: str):
  env = command_env()
  return subprocess.run([sys.executable, '-m', module, *map(str, args)], capture_output=True,
                        text=True, env=env, cwd=ROOT)


def test_sample_reward_and_export_commands(chain, held_out, tmp_path):
  runs, data = chain
  examples = tasks.heldout(data, 'test')[:20]
  prompts = tmp_path / 'prompts.jsonl'
  prompts.write_text(''.join(json.dumps({'prompt': ex['prompt']}) + '\n' for ex in examples))
  out = tmp_path / 'completions.jsonl'
  sampled = _command('lm.sample', '--workdir', runs['sft'][0], '--prompts_file', prompts,
                     '--greedy', '--max_new_tokens', 5, '--stop', '\n', '--out', out)
  assert sampled.returncode == 0, sampled.stderr[-2000:]
  lines = [json.loads(line) for line in out.read_text().splitlines()]
  assert [line['prompt'] for line in lines] == [ex['prompt'] for ex in examples]
  assert sum(line['completion'] == ex['answer'] for line, ex in zip(lines, examples)) >= 18

  pairs = tmp_path / 'pairs.jsonl'
  pairs.write_text(''.join(json.dumps({'prompt': ex['prompt'], 'response': answer + '\n'}) + '\n'
                           for ex in examples for answer in (ex['answer'], ex['prompt'][3:7])))
  scored = _command('lm.reward', '--workdir', runs['reward'][0], '--prompts_file', pairs)
  assert scored.returncode == 0, scored.stderr[-2000:]
  scores = [float(x) for x in scored.stdout.split()]
  assert len(scores) == 40   # right answer, then the digits copied unreversed
  assert sum(right > copied for right, copied in zip(scores[::2], scores[1::2])) >= 18

  refused = _command('lm.export', '--workdir', runs['lora_sft'][0], '--out', tmp_path / 'x')
  assert refused.returncode == 2 and '--merge_lora' in refused.stderr
  merged = tmp_path / 'merged'
  exported = _command('lm.export', '--workdir', runs['lora_sft'][0], '--out', merged,
                      '--merge_lora')
  assert exported.returncode == 0, exported.stderr[-2000:]
  assert tasks.evaluate(str(merged), tasks.heldout(data, 'test')) == held_out['lora_sft']
  # QLoRA: the adapters fold into the dequantized NF4 base, a plain float run
  exported = _command('lm.export', '--workdir', runs['qlora_sft'][0], '--out', tmp_path / 'q',
                      '--merge_lora')
  assert exported.returncode == 0, exported.stderr[-2000:]
  assert json.loads((tmp_path / 'q' / 'config.json').read_text())['quant']['scheme'] == 'none'
  assert tasks.evaluate(str(tmp_path / 'q'), tasks.heldout(data, 'test')) == held_out['qlora_sft']


def test_rl_refuses_a_reward_model_of_another_vocabulary(chain, tfds_dir, tmp_path):
  runs, data = chain
  other = tmp_path / 'other_reward'
  shutil.copytree(runs['reward'][0], other)
  saved = json.loads((other / 'tokenizer.json').read_text())
  (other / 'tokenizer.json').write_text(json.dumps({**saved, 'chars': saved['chars'] + 'z'}))
  result = run_main(tmp_path / 'ppo', f'--config.data.dir={tfds_dir}',
                    f'--config.rl.reward=model:{other}', check=False,
                    config=f'experiments/reverse.py:ppo,data={data},runs={runs["sft"][0].parent}')
  assert result.returncode == 2
  assert re.search(r'error: config.rl.reward=model:.*other_reward: its vocabulary .* differs '
                   r"from the policy's", result.stderr.strip().splitlines()[-1])

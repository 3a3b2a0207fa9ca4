"""The post-training chain of experiments/reverse.py, run as a user runs it (each stage a
`python -m lm.main` process on one device) and measured on held-out prompts: SFT learns the
task, the reward model ranks held-out pairs, DPO and GRPO raise the rate of right answers
the model samples, PPO runs against the reward model, and LoRA-SFT comes close to full SFT
while training under 5% of the parameters."""
import json
import re

import pytest

from lm.post import tasks
from tests.test_train import read_metrics, run_main

STAGES = ('pretrain', 'sft', 'lora_sft', 'reward', 'dpo', 'grpo', 'ppo')


@pytest.fixture(scope='module')
def chain(tmp_path_factory, tfds_dir):
  """{stage: (workdir, stdout)} after running every stage, and the data directory."""
  root = tmp_path_factory.mktemp('reverse')
  data, runs = root / 'data', root / 'runs'
  tasks.make(str(data))
  out = {}
  for stage in STAGES:
    extra = ['--config.train.log_every=1'] if stage in ('grpo', 'ppo') else []
    result = run_main(runs / stage, f'--config.data.dir={tfds_dir}', *extra,
                      config=f'experiments/reverse.py:{stage},data={data},runs={runs}')
    out[stage] = (runs / stage, result.stdout)
  return out, str(data)


@pytest.fixture(scope='module')
def held_out(chain):
  """Exact-match rates (greedy and sampled) of every stage on the test prompts."""
  runs, data = chain
  examples = tasks.heldout(data, 'test')
  return {stage: tasks.evaluate(str(runs[stage][0]), examples) for stage in runs}


def _final(runs, stage) -> dict:
  return json.loads((runs[stage][0] / 'final.json').read_text())


def test_sft_learns_what_pretraining_did_not(held_out):
  assert held_out['pretrain']['exact_match'] < 0.05
  assert held_out['sft']['exact_match'] > 0.9


def test_reward_model_ranks_held_out_pairs(chain):
  runs, _ = chain
  assert _final(runs, 'reward')['test_accuracy'] >= 0.9


@pytest.mark.parametrize('stage', ['dpo', 'grpo'])
def test_preference_tuning_raises_the_rate_of_right_answers(held_out, stage):
  """SFT learned from demonstrations of which 30% are wrong and samples wrong answers often;
  DPO (preference pairs) and GRPO (exact-match reward) make it sample right ones."""
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

"""The one table of objectives: what each needs and does, read wherever a run's behaviour
depends on its objective. Nothing outside this table and `lm.objectives.BUILDERS` compares an
objective's name (`tests/test_layout.py` checks). Adding an objective: a row here, a builder
in `lm/objectives/` (docs/architecture.md)."""
import dataclasses

import ml_collections

from lm.config.checks import one_of


@dataclasses.dataclass(frozen=True)
class Traits:
  data_format: str               # the config.data.format it reads: text, sft, preference, prompt
  causal: bool = True            # False: a bidirectional model (config.model.causal=False)
  mask_token: bool = False       # one more token id, [MASK], after the tokenizer's
  teacher: bool = False          # a frozen teacher run (config.distill.teacher)
  reference: bool = False        # the start (config.train.init_from) kept frozen as reference
  scalar_head: bool = False      # a scalar head on the model (reward, PPO's values): no LoRA
  rollouts: bool = False         # batches sampled from the policy and scored (config.rl)
  group_relative: bool = False   # advantages within each prompt's group: group_size >= 2
  perplexity: bool = False       # the loss is next-token cross-entropy: report its exp


TRAITS = {
    'lm': Traits('text', perplexity=True),
    'sft': Traits('sft', perplexity=True),
    'reward': Traits('preference', scalar_head=True),
    'dpo': Traits('preference', reference=True),
    'grpo': Traits('prompt', reference=True, rollouts=True, group_relative=True),
    'ppo': Traits('prompt', reference=True, rollouts=True, scalar_head=True),
    'mlm': Traits('text', causal=False, mask_token=True),
    'distill': Traits('text', teacher=True),
}

# the next-token objective of each text format (`lm.evaluate` scores any causal run by it)
NEXT_TOKEN = {'text': 'lm', 'sft': 'sft'}


def of(config: ml_collections.ConfigDict) -> Traits:
  """The traits of the run's config.train.objective (ConfigError for a name not in the table)."""
  one_of('train.objective', config.train.objective, TRAITS)
  return TRAITS[config.train.objective]

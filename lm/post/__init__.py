"""Post-training: data formats (sft, preference, prompt), the reward, DPO and RL objectives,
and RL rollouts. Each objective runs in the one train loop of `lm.train`."""

"""Other libraries' names over Lampo's API (docs/compat.md).

- `aliases`: the config-key names of TRL-classic, lm_ppo and PaddleNLP that Lampo's config accepts.
- `value_head`: `AutoModelForCausalLMWithValueHead`, a policy with a value head (TRL-classic's class).
- `trl`: what TRL-classic's `PPOTrainer` added over Lampo's (the dataloader, `log_stats`, generation keywords).
- `lm_ppo`: `GPT2HeadWithValueModel`, `respond_to_batch` and `PPOTrainer(model, ref_model, **ppo_config)`.
- `paddlenlp`: PaddleNLP argument files (`python -m lampo.ppo_vllm --config grpo_argument.json`).

Everything here translates names and calling conventions only; the training is Lampo's learner.
This package's `__init__` imports nothing, so `lampo.config` can read the alias table cheaply.
"""

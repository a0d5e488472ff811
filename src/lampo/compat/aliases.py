"""Other libraries' names for Lampo's config keys, accepted wherever a key is (Python, YAML, CLI).

An alias is a mapping at construction: `PPOConfig(init_kl_coef=0.2)` sets `kl_coef`, and an
error about the value names the key as it was written (`'init_kl_coef' (Lampo's 'kl_coef')`).
Keys whose names Lampo already shares (TRL-classic's `cliprange`, `vf_coef`, `gamma`, `lam`,
PaddleNLP's `max_prompt_len`, `logging_steps`, ...) need no alias. The table is also searched
for the nearest-key hint of an unknown key, so a misspelt alias points at the key it stands for.

Sources: TRL-classic is TRL's `PPOConfig` before 0.12 (the API the TRL study note uses);
lm_ppo is lm_ppo's `PPOTrainer` parameters; PaddleNLP is the argument list of its PPO/GRPO page
(design document 002). The other keys PaddleNLP's argument files hold (`kl_coeff`,
`clip_range_ratio`, `rl_algorithm`, ...) are read in argument files only (lampo.compat.paddlenlp):
names as generic as `kl_coeff` would hide typos of Lampo's keys elsewhere. docs/compat.md lists
every mapping.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Alias:
    """Another library's name for Lampo's config key `key`."""

    key: str
    """Lampo's key."""
    source: str
    """Whose name it is (shown in hints and in docs/compat.md)."""
    meaning: str = ""
    """What the mapping does when it is more than a rename (docs/compat.md)."""
    convert: Callable[[Any], Any] | None = None
    """Turns the other library's value into Lampo's (None: the value is used as it is)."""


def _as_list(value: Any) -> Any:
    # TRL's log_with names one tracker (or None); Lampo's report_to is a list of them
    if value is None:
        return []
    return [value] if isinstance(value, str) else value


TRL = "TRL-classic"
LM_PPO = "lm_ppo"
PADDLE = "PaddleNLP"

ALIASES: dict[str, Alias] = {
    # TRL-classic PPOConfig (and lm_ppo's parameters of the same names)
    "model_name": Alias("model_name_or_path", TRL),
    "init_kl_coef": Alias("kl_coef", f"{TRL}, {LM_PPO}", "the KL coefficient (initial value when adaptive)"),
    "adap_kl_ctrl": Alias("adaptive_kl", f"{TRL}, {LM_PPO}"),
    "target": Alias("kl_target", f"{TRL}, {LM_PPO}", "the adaptive controller's target KL"),
    "horizon": Alias("kl_horizon", f"{TRL}, {LM_PPO}", "the adaptive controller's horizon"),
    "log_with": Alias("report_to", TRL, "one tracker name becomes a list of one", _as_list),
    # PaddleNLP argument files (llm/config/*/ppo_argument.json, grpo_argument.json)
    "actor_model_name_or_path": Alias("model_name_or_path", PADDLE, "the policy; the reference is its frozen copy"),
    "max_dec_len": Alias("max_new_tokens", PADDLE),
    "min_dec_len": Alias("min_new_tokens", PADDLE),
    "num_return_sequences": Alias("num_generations", PADDLE),
    "per_device_prompt_batch_size": Alias("batch_size", PADDLE, "prompts per step and process"),
    "per_device_eval_batch_size": Alias("eval_batch_size", PADDLE),
    "max_evaluate_steps": Alias("eval_batches", PADDLE, "batches of the test split per evaluation"),
    "recompute": Alias("gradient_checkpointing", PADDLE, "recomputation of activations, policy and critic"),
    "save_steps": Alias("save_step", PADDLE),
}
"""Another library's key name -> the Lampo key it sets."""


# ---------------------------------------------------------------------------------------------
# PaddleNLP argument files only (lampo.compat.paddlenlp); listed here so that hints can name them
# ---------------------------------------------------------------------------------------------

ESTIMATORS = {"ppo": "gae", "grpo": "grpo", "reinforce_plus_plus": "reinforce_pp", "rloo": "rloo"}
"""PaddleNLP's `rl_algorithm` values and Lampo's estimators."""

FILE_NAMES: dict[str, tuple[str, Callable[[Any], Any] | None]] = {
    "kl_coeff": ("kl_coef", None),
    "kl_loss_coeff": ("kl_coef", None),
    "clip_range_ratio": ("cliprange", None),
    "clip_range_value": ("cliprange_value", None),
    "normalize_reward": ("whiten_rewards", None),
    "normalize_advantage": ("whiten_advantages", None),
    "update_iters": ("ppo_epochs", None),
    "rollout_n": ("num_generations", None),
    "rl_algorithm": ("estimator", lambda v: ESTIMATORS.get(v, v)),
    "reward_server": ("reward_model", None),
    "disable_tqdm": ("progress", lambda v: not bool(v)),
    "ptx_coeff": ("ptx_coef", None),
}
"""Argument-file names of Lampo keys (read in argument files only), with a value conversion."""

NO_MEANING: dict[str, str] = {
    "use_fusemt": "PaddleNLP's fused generation kernels; Lampo generates with vLLM or transformers (engine)",
    "use_flash_attention": "transformers chooses the attention kernels (attn_implementation)",
    "fp16_opt_level": "Paddle's AMP level; Lampo keeps fp32 weights under bf16/fp16 autocast",
    "recompute_granularity": "gradient_checkpointing (recompute) recomputes whole layers",
    "critic_recompute_granularity": "gradient_checkpointing (recompute) recomputes whole layers",
    "critic_recompute": "recompute (gradient_checkpointing) covers the critic as well as the policy",
    "recompute_use_reentrant": "Lampo's gradient checkpointing is non-reentrant",
    "logging_dir": "TensorBoard files go to output_dir/tensorboard",
    "num_train_epochs": "max_steps (or total_episodes) sets the run's length; prompts are reused as needed",
    "dataloader_drop_last": "every step draws exactly per_device_prompt_batch_size prompts",
    "ignore_save_lr_and_optim": "checkpoints keep the optimiser state, needed to resume exactly",
    "eval_mode": "evaluation rolls out the test split with the training settings",
    "use_fused_head_and_loss_fn": "a Paddle fused kernel",
    "fused_linear": "a Paddle fused kernel",
    "offload_level": "Paddle's offloading; Lampo offloads through DeepSpeed (configs/ds_z2_offload_config.json)",
    "release_grads": "a Paddle memory setting",
    "sharding": "Paddle's sharding; Lampo runs data-parallel through accelerate (and DeepSpeed)",
    "sharding_parallel_degree": "Paddle's sharding; Lampo runs data-parallel through accelerate",
    "tensor_parallel_degree": "no tensor parallelism in Lampo's learner",
    "tensor_parallel_output": "no tensor parallelism in Lampo's learner",
    "pipeline_parallel_degree": "no pipeline parallelism in Lampo's learner",
    "pipeline_parallel_config": "no pipeline parallelism in Lampo's learner",
    "sequence_parallel": "no sequence parallelism in Lampo's learner",
    "autotuner_benchmark": "a Paddle profiling switch",
    "skip_profile_timer": "a Paddle profiling switch; Lampo always times its phases (time/*)",
    "adam_beta1": "not supported: Lampo's AdamW keeps torch's betas (0.9, 0.999)",
    "adam_beta2": "not supported: Lampo's AdamW keeps torch's betas (0.9, 0.999)",
    "clip_range_score": "not supported: Lampo does not clip scores",
}
"""Keys accepted without effect, each with why; `translate` prints one line per key present."""

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

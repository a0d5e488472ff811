"""Lampo: reinforcement-learning fine-tuning of language models (PPO and GRPO-family)."""

from lampo.config import LampoConfig, PPOConfig, load_config

__version__ = "0.1.0"
__all__ = ["AutoModelForCausalLMWithValueHead", "LampoConfig", "PPOConfig", "PPOTrainer", "load_config"]


def __getattr__(name: str):
    # These pull in torch/transformers; import them lazily so `lampo.config` stays light.
    if name == "PPOTrainer":
        from lampo.optimize.ppo_trainer import PPOTrainer

        return PPOTrainer
    if name == "AutoModelForCausalLMWithValueHead":  # TRL-classic's name (docs/compat.md)
        from lampo.compat.value_head import AutoModelForCausalLMWithValueHead

        return AutoModelForCausalLMWithValueHead
    raise AttributeError(f"module 'lampo' has no attribute {name!r}")

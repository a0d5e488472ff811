"""Lampo: reinforcement-learning fine-tuning of language models (PPO and GRPO-family)."""

from lampo.config import LampoConfig, PPOConfig, load_config

__version__ = "0.1.0"
__all__ = ["LampoConfig", "PPOConfig", "PPOTrainer", "load_config"]


def __getattr__(name: str):
    # PPOTrainer pulls in torch/transformers; import it lazily so `lampo.config` stays light.
    if name == "PPOTrainer":
        from lampo.optimize.ppo_trainer import PPOTrainer

        return PPOTrainer
    raise AttributeError(f"module 'lampo' has no attribute {name!r}")

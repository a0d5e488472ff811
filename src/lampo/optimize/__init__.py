"""Optimisation phase: PPO/GRPO maths (pure functions), models, the learner, the library PPOTrainer."""

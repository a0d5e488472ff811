"""Rollout phase: generation engines (vLLM, transformers) and multi-step rollouts."""

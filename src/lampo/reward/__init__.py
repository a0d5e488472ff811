"""Reward phase: the reward-server client, the in-process runner, shipped reward models."""

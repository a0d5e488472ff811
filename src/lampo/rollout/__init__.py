"""Rollout phase: generation engines (vLLM, transformers) and multi-step rollouts."""

from lampo.rollout.batch import RolloutBatch
from lampo.rollout.engines import Generation, HFEngine, SamplingSettings, VLLMEngine, make_engine
from lampo.rollout.multistep import PromptTooLongError, rollout
from lampo.rollout.weight_sync import engine_weights

__all__ = [
    "Generation",
    "HFEngine",
    "PromptTooLongError",
    "RolloutBatch",
    "SamplingSettings",
    "VLLMEngine",
    "engine_weights",
    "make_engine",
    "rollout",
]

"""Reward phase: the reward-server client, the in-process runner, shipped reward models.

The trainer uses one call: ``scorer = make_scorer(cfg.reward, model_config)``, then
``scorer.check_available()``, ``scorer.score(messages)`` each step, ``scorer.stats()`` when
logging, ``scorer.cancel(reason)`` when a stop is requested and ``scorer.close()`` at the end.
Shipped reward models live in ``lampo.reward.rules`` (rule-based and verifiable maths),
``lampo.reward.hf_classifier`` and ``lampo.reward.embedding``.
"""

from lampo.reward.client import RewardCancelled, RewardClient, RewardError, RewardUnavailable
from lampo.reward.scorer import HTTPScorer, InProcessScorer, Scorer, make_scorer

__all__ = [
    "HTTPScorer",
    "InProcessScorer",
    "RewardCancelled",
    "RewardClient",
    "RewardError",
    "RewardUnavailable",
    "Scorer",
    "make_scorer",
]

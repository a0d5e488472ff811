"""Reward models used by the benchmarks (in-process, or behind `python -m lampo.reward_server`).

- VowelShare: the share of letters in the last response that are vowels (trivial, microseconds).
- SlowVowelShare: the same score after sleeping `sleep_s` seconds per call (default 0.2 s), a
  stand-in for a reward model whose latency dominates (issue 6, item 3).
The plain function `vowel_share` is what TRL's reward function calls, so both frameworks are
scored by the same code.
"""

from __future__ import annotations

import asyncio

from lampo.reward_model import RewardModelTemplate

VOWELS = frozenset("aeiouAEIOU")


def vowel_share(text: str) -> float:
    """'Hello' -> 0.4 (2 vowels among 5 letters); no letters -> 0.0."""
    letters = [c for c in text if c.isalpha()]
    return sum(c in VOWELS for c in letters) / len(letters) if letters else 0.0


class VowelShare(RewardModelTemplate):
    async def compute(self, messages):
        return [vowel_share(conversation[-1]) for conversation in messages]


class SlowVowelShare(RewardModelTemplate):
    def __init__(self, config=None):
        super().__init__(config)
        self.sleep_s = float((self.config or {}).get("reward_model_config", {}).get("sleep_s", 0.2))

    async def compute(self, messages):
        await asyncio.sleep(self.sleep_s)  # one call, one delay, whatever the batch size
        return [vowel_share(conversation[-1]) for conversation in messages]

"""Metrics the trainer derives from a batch's scores, worked by hand."""

from __future__ import annotations

import pytest

from lampo.trainer import _correct_rate


def test_the_verifiable_correct_rate_is_the_share_of_conversations_scored_one():
    # a verifiable reward scores 1 (correct) or 0; anything below 1 is not correct
    assert _correct_rate([1.0, 0.0, 0.5, 1.0]) == pytest.approx(2 / 4)
    # per-turn scores: the conversation's last turn decides; no turns counts as not correct
    assert _correct_rate([[0.0, 1.0], [1.0, 0.0], []]) == pytest.approx(1 / 3)
    assert _correct_rate([]) == 0.0

"""Shipped rule-based reward models, with hand-worked scores."""

from __future__ import annotations

import asyncio
from fractions import Fraction

import pytest

from lampo.reward.rules import (
    ExactAnswerReward,
    FormatReward,
    KeywordReward,
    LengthReward,
    VowelReward,
    final_answer,
    parse_number,
)


def run(model, messages):
    return asyncio.run(model.compute(messages))


def test_vowel_reward_hand_numbers():
    # "banana!": letters b,a,n,a,n,a -> 3/6 = 0.5; "AEIOU" -> 1.0; "xyz 123" -> 0/3 = 0.0; "" -> no letters -> 0.0
    scores = run(VowelReward({}), [["q", "banana!"], ["q", "AEIOU"], ["q", "xyz 123"], ["q", ""]])
    assert scores == [0.5, 1.0, 0.0, 0.0]


def test_vowel_reward_scores_the_last_turn_or_each_turn():
    conv = [["u1", "aa", "u2", "bb"]]
    assert run(VowelReward({}), conv) == [0.0]  # last assistant turn "bb"
    assert run(VowelReward({"vowel_per_turn": True}), conv) == [[1.0, 0.0]]
    # set through reward_model_config would reach the model merged, as the server and make_scorer do


def test_vowel_reward_rejects_a_conversation_without_assistant_turn():
    with pytest.raises(ValueError, match="conversation 1 has 1 text"):
        run(VowelReward({}), [["u", "a"], ["only user"]])


def test_length_reward():
    # target 10 words: 5 words -> 1 - 5/10 = 0.5; 10 -> 1.0; 25 -> max(0, 1 - 15/10) = 0.0
    model = LengthReward({"length_target": 10})
    texts = [" ".join(["w"] * n) for n in (5, 10, 25)]
    assert run(model, [["q", t] for t in texts]) == [0.5, 1.0, 0.0]
    # chars: target 4, "abcdef" (6) -> 1 - 2/4 = 0.5
    assert run(LengthReward({"length_target": 4, "length_unit": "chars"}), [["q", "abcdef"]]) == [0.5]
    with pytest.raises(ValueError, match="length_unit"):
        LengthReward({"length_unit": "tokens"})


def test_keyword_reward_whole_words():
    model = KeywordReward({"keywords": ["cat", "dog"]})
    # "A Cat sat." -> cat found (case-insensitive), dog not -> 1/2; "category" is not "cat" -> 0
    assert run(model, [["q", "A Cat sat."], ["q", "category dogma"], ["q", "dog and cat"]]) == [0.5, 0.0, 1.0]
    assert run(KeywordReward({"keywords": ["Cat"], "keyword_case_sensitive": True}), [["q", "cat"]]) == [0.0]
    with pytest.raises(ValueError, match="needs setting 'keywords'"):
        KeywordReward({})


def test_format_reward_default_think_answer():
    model = FormatReward({})
    good = "<think>2+2 is 4</think> <answer>4</answer>"
    assert run(model, [["q", good], ["q", "4"], ["q", good + " extra"]]) == [1.0, 0.0, 0.0]
    assert run(FormatReward({"format_pattern": r"^\d+$"}), [["q", "42"], ["q", "4 2"]]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="not a valid regex"):
        FormatReward({"format_pattern": "("})


@pytest.mark.parametrize(
    ("text", "value"),
    [("42", Fraction(42)), ("-3/4", Fraction(-3, 4)), ("1,234.5", Fraction(2469, 2)), ("0.1", Fraction(1, 10)),
     ("2e3", Fraction(2000)), (".5", Fraction(1, 2)), ("$7", Fraction(7)), ("7.", Fraction(7)),
     ("1/0", None), ("abc", None), ("2+2", None), ("__import__('os')", None)],
)
def test_parse_number_without_eval(text, value):
    assert parse_number(text) == value


def test_final_answer_prefers_markers():
    assert final_answer("3 + 4 = 7, so the answer is 7.") == 7
    assert final_answer("first \\boxed{12}, later 5") == 12
    assert final_answer("#### 1,000") == 1000
    assert final_answer("no number here") is None


def test_exact_answer_reward_sources_of_the_expected_answer():
    model = ExactAnswerReward({"answers": {"What is 6*7?": 42}, "expected_answer": "5"})
    assert model.verifiable is True
    messages = [
        ["What is 6*7?", "It is 42."],  # from `answers` -> 1
        ["What is 1/2? #### 0.5", "1/2"],  # marker in the user turn; 1/2 == 0.5 exactly -> 1
        ["Compute 3+4. Answer: 7", "I think 8"],  # marker 7, response 8 -> 0
        ["anything else", "5"],  # expected_answer default -> 1
        ["anything else", "no idea"],  # no number -> 0
    ]
    assert run(model, messages) == [1.0, 1.0, 0.0, 1.0, 0.0]


def test_exact_answer_reward_without_expected_answer_is_an_error_not_zero():
    with pytest.raises(ValueError, match="conversation 0 has no expected answer"):
        run(ExactAnswerReward({}), [["What is 2+2?", "4"]])
    with pytest.raises(ValueError, match="'expected_answer' = 'lots' is not a number"):
        ExactAnswerReward({"expected_answer": "lots"})

"""Rule-based reward models that ship with Lampo (each a RewardModelTemplate).

Each reads its settings from the config dict (top-level keys of the YAML file, or the
`reward_model_config` mapping). Scores are computed on the last assistant turn of each
conversation (`[user_1, assistant_1, ..., user_n, assistant_n]`) unless said otherwise.

| class | scores | settings |
|---|---|---|
| `VowelReward` | share of letters that are vowels, in [0, 1] | `vowel_per_turn` |
| `LengthReward` | 1 - |n - target| / target, clipped to [0, 1] | `length_target`, `length_unit` |
| `KeywordReward` | share of `keywords` present, in [0, 1] | `keywords`, `keyword_case_sensitive` |
| `FormatReward` | 1 if the response matches `format_pattern`, else 0 | `format_pattern` |
| `ExactAnswerReward` | 1 if the final number equals the expected answer, else 0 (verifiable) | `answers`, `expected_answer` |

Run any of them in the server (`python -m lampo.reward_server --model lampo.reward.rules.VowelReward`)
or in-process (`reward_model: lampo.reward.rules.VowelReward`).
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

from lampo.reward_model import RewardModelTemplate, Score


def assistant_turns(conversation: list[str], index: int = 0) -> list[str]:
    """The assistant turns of `[user_1, assistant_1, ...]`; a conversation without one is an error."""
    turns = conversation[1::2]
    if not turns:
        raise ValueError(
            f"conversation {index} has {len(conversation)} text(s) and no assistant turn; expected "
            "[user_1, assistant_1, ...]"
        )
    return turns


def _setting(config: dict[str, Any], key: str, default: Any, kind: type | tuple[type, ...]) -> Any:
    value = config.get(key, default)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ValueError(f"reward model setting '{key}' = {value!r} has the wrong type; see lampo.reward.rules")
    return value


class VowelReward(RewardModelTemplate):
    """Share of the letters in a response that are vowels (a, e, i, o, u; any case), in [0, 1].

    A dense, easy signal: even a randomly initialised tiny model finds tokens that raise it within a
    few PPO steps, which is what the demo needs. A response without letters scores 0 (that is its
    true score, not a failure). With `vowel_per_turn: true` each assistant turn gets its own score.
    Hand example: "banana!" has letters b,a,n,a,n,a -> 3 vowels / 6 letters = 0.5.
    """

    VOWELS = frozenset("aeiouAEIOU")

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        super().__init__(config)
        self.per_turn = _setting(self.config, "vowel_per_turn", False, bool)
        self.load()

    @classmethod
    def share(cls, text: str) -> float:
        letters = [c for c in text if c.isalpha()]
        if not letters:
            return 0.0
        return sum(c in cls.VOWELS for c in letters) / len(letters)

    async def compute(self, messages: list[list[str]]) -> list[Score]:
        out: list[Score] = []
        for i, conversation in enumerate(messages):
            turns = assistant_turns(conversation, i)
            out.append([self.share(t) for t in turns] if self.per_turn else self.share(turns[-1]))
        return out


class LengthReward(RewardModelTemplate):
    """Closeness of the response length to `length_target` (default 50) `length_unit`s (words or chars).

    score = max(0, 1 - |n - target| / target); e.g. target 10 words, 5 words -> 1 - 5/10 = 0.5.
    """

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        super().__init__(config)
        self.target = _setting(self.config, "length_target", 50, int)
        self.unit = _setting(self.config, "length_unit", "words", str)
        if self.target < 1:
            raise ValueError(f"reward model setting 'length_target' = {self.target} must be >= 1")
        if self.unit not in ("words", "chars"):
            raise ValueError(f"reward model setting 'length_unit' = {self.unit!r} must be 'words' or 'chars'")
        self.load()

    async def compute(self, messages: list[list[str]]) -> list[Score]:
        out: list[Score] = []
        for i, conversation in enumerate(messages):
            text = assistant_turns(conversation, i)[-1]
            n = len(text.split()) if self.unit == "words" else len(text)
            out.append(max(0.0, 1.0 - abs(n - self.target) / self.target))
        return out


class KeywordReward(RewardModelTemplate):
    """Share of `keywords` that appear as whole words in the response.

    keywords [cat, dog], "A cat sat." -> 1/2 = 0.5 ("category" does not count as "cat").
    """

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        super().__init__(config)
        keywords = self.config.get("keywords")
        if not isinstance(keywords, list) or not keywords or not all(isinstance(k, str) and k for k in keywords):
            raise ValueError(
                f"KeywordReward needs setting 'keywords': a non-empty list of words (got {keywords!r}); "
                "put e.g. `reward_model_config: {keywords: [cat, dog]}` in the config"
            )
        flags = 0 if _setting(self.config, "keyword_case_sensitive", False, bool) else re.IGNORECASE
        self.patterns = [re.compile(rf"(?<!\w){re.escape(k)}(?!\w)", flags) for k in keywords]
        self.load()

    async def compute(self, messages: list[list[str]]) -> list[Score]:
        out: list[Score] = []
        for i, conversation in enumerate(messages):
            text = assistant_turns(conversation, i)[-1]
            out.append(sum(bool(p.search(text)) for p in self.patterns) / len(self.patterns))
        return out


class FormatReward(RewardModelTemplate):
    """1.0 when the response matches the regular expression `format_pattern` (re.search), else 0.0.

    The default asks for reasoning then an answer, as in DeepSeek-R1's format reward:
    `<think>...</think>` followed by `<answer>...</answer>` and nothing else.
    """

    DEFAULT_PATTERN = r"(?s)^\s*<think>.+?</think>\s*<answer>.+?</answer>\s*$"

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        super().__init__(config)
        pattern = _setting(self.config, "format_pattern", self.DEFAULT_PATTERN, str)
        try:
            self.pattern = re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"reward model setting 'format_pattern' = {pattern!r} is not a valid regex: {exc}") from exc
        self.load()

    async def compute(self, messages: list[list[str]]) -> list[Score]:
        return [
            1.0 if self.pattern.search(assistant_turns(c, i)[-1]) else 0.0 for i, c in enumerate(messages)
        ]


# A number as people write it in answers: sign, thousands separators, decimals, a fraction, an exponent.
_NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+(?:\.\d+)?)?(?:[eE][-+]?\d+)?|[-+]?\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
# Where a response or prompt states its final answer, strongest marker first.
_ANSWER_MARKERS = [
    re.compile(r"\\boxed\{\s*\$?\s*(" + _NUMBER + r")"),
    re.compile(r"####\s*\$?\s*(" + _NUMBER + r")"),
    re.compile(r"(?i)answer(?:\s+is)?\s*[:=]?\s*\$?\s*(" + _NUMBER + r")"),
]


def parse_number(text: str) -> Fraction | None:
    """An exact rational from '1,234.5', '-3/4', '2e3', '.5'; None when it is not one number.

    Parsed with `fractions.Fraction` (exact, no `eval`): '0.1' and '1/10' are equal, '3' and '3.0' too.
    """
    text = text.strip().rstrip(".").replace(",", "").lstrip("$")
    if not re.fullmatch(_NUMBER, text):
        return None
    try:
        if "/" in text:
            num, den = text.split("/")
            if Fraction(den) == 0:
                return None
            return Fraction(num) / Fraction(den)
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def marked_answer(text: str) -> Fraction | None:
    """The number after the last `\\boxed{..}`, `#### ..` or `Answer: ..` marker (strongest marker wins)."""
    for marker in _ANSWER_MARKERS:
        found = marker.findall(text)
        if found:
            return parse_number(found[-1])
    return None


def final_answer(text: str) -> Fraction | None:
    """A response's answer: a marked answer if there is one, else the last number in the text."""
    marked = marked_answer(text)
    if marked is not None:
        return marked
    numbers = _NUMBER_RE.findall(text)
    return parse_number(numbers[-1]) if numbers else None


class ExactAnswerReward(RewardModelTemplate):
    """Verifiable maths reward: 1.0 when the response's final number equals the expected answer, else 0.0.

    The expected answer of a conversation comes from, in order:
    1. `answers`: a mapping from the first user turn (stripped) to its answer, in the config;
    2. a `#### 42` or `Answer: 42` marker in a user turn (the last user turn that has one);
       the policy sees that text, so this suits tests and demos, not real training;
    3. `expected_answer`: one answer for every conversation, in the config.
    A conversation with no expected answer is an error (never a silent 0). The response's answer
    is its last `\\boxed{}`, `####` or `answer is` number, else its last number; numbers are
    compared exactly as fractions (e.g. "0.5" equals "1/2"; "1,000" equals "1000").
    """

    verifiable = True

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        super().__init__(config)
        answers = self.config.get("answers") or {}
        if not isinstance(answers, dict):
            raise ValueError(f"reward model setting 'answers' must map prompt text to answer, got {answers!r}")
        self.answers = {str(k).strip(): self._expected(v, f"answers[{k!r}]") for k, v in answers.items()}
        default = self.config.get("expected_answer")
        self.default = None if default is None else self._expected(default, "expected_answer")
        self.load()

    @staticmethod
    def _expected(value: Any, key: str) -> Fraction:
        number = parse_number(str(value))
        if number is None:
            raise ValueError(f"reward model setting '{key}' = {value!r} is not a number")
        return number

    def expected(self, conversation: list[str], index: int) -> Fraction:
        if conversation and conversation[0].strip() in self.answers:
            return self.answers[conversation[0].strip()]
        for user_turn in reversed(conversation[0::2]):
            for marker in _ANSWER_MARKERS[1:]:  # `#### 42` or `Answer: 42`
                found = marker.findall(user_turn)
                if found and parse_number(found[-1]) is not None:
                    return parse_number(found[-1])  # type: ignore[return-value]
        if self.default is not None:
            return self.default
        raise ValueError(
            f"conversation {index} has no expected answer: add '#### <number>' to its user turn, or set "
            "'answers' (prompt -> answer) or 'expected_answer' in the reward model config"
        )

    async def compute(self, messages: list[list[str]]) -> list[Score]:
        out: list[Score] = []
        for i, conversation in enumerate(messages):
            expected = self.expected(conversation, i)
            got = final_answer(assistant_turns(conversation, i)[-1])
            out.append(1.0 if got is not None and got == expected else 0.0)
        return out

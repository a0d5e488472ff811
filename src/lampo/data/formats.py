"""The three prompt formats, read into one row type.

- Multi-step (the design documents): columns `text`, `text1`, ..., `textN`, one user-side
  segment per step. A cell is chat-templated (it contains the template's special tokens, used
  verbatim) or plain text (the rollout applies the tokenizer's chat template). An empty or
  missing later cell ends that row's conversation early; a filled cell after an empty one is an
  error (the conversation would skip a step).
- PaddleNLP: `src` (user turns) and `tgt` (the given assistant turns except the last,
  `len(tgt) == len(src) - 1`). The history is fixed; only the last turn is generated.
- Conversational: `messages`, a list of `{"role", "content"}` dicts (optional system message
  first, then user/assistant alternating) ending with a user turn, which is generated.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

Format = Literal["multistep", "paddlenlp", "messages"]
_TEXT_COLUMN = re.compile(r"^text(\d*)$")


class DataFormatError(ValueError):
    """A dataset row that does not fit its format; the message names the row and column."""


@dataclass(frozen=True)
class PromptRow:
    """One conversation to roll out.

    index: the row's position in its split (becomes `prompt_index` in the rollout batch).
    steps: the user-side segment of each generated step, in order; step i's prompt is the
        conversation so far plus `steps[i]`. A segment containing the chat template's special
        tokens is used verbatim; plain text is templated as a user turn by the rollout.
    history: fixed `(role, content)` turns before `steps[0]` (a system message, the PaddleNLP
        `tgt` history, the earlier turns of `messages`), templated by the rollout.
    format: the dataset format the row came from.
    origin: where the row came from, for messages: `<file>, line <n>` or `<source>, split '<name>',
        row <n>` (1-based); empty for rows made in code.
    """

    index: int
    steps: tuple[str, ...]
    history: tuple[tuple[str, str], ...] = ()
    format: Format = "multistep"
    origin: str = ""

    def where(self, split: str) -> str:
        """The row for a message: its file and line (and split), or its index in the split."""
        return f"{self.origin} ({split} split)" if self.origin else f"{split} row {self.index}"


def detect_format(columns: Iterable[str]) -> Format:
    """The format a set of column names describes; an error lists what was found."""
    cols = list(columns)
    if "text" in cols:
        return "multistep"
    if "src" in cols:
        return "paddlenlp"
    if "messages" in cols:
        return "messages"
    raise DataFormatError(
        f"dataset columns {cols} match no prompt format: expected `text, text1, ..., textN` (multi-step), "
        "`src` + `tgt` (PaddleNLP) or `messages` (list of role/content dicts)"
    )


def text_columns(columns: Iterable[str]) -> list[str]:
    """`text`, `text1`, ..., `textN` in step order; a gap in the numbering is an error."""
    numbered = []
    for col in columns:
        m = _TEXT_COLUMN.match(col)
        if m:
            numbered.append((int(m.group(1)) if m.group(1) else 0, col))
    numbered.sort()
    for expected, (number, col) in enumerate(numbered):
        if number != expected:
            missing = "text" if expected == 0 else f"text{expected}"
            raise DataFormatError(
                f"column '{col}' found but '{missing}' is missing: multi-step columns must be "
                "text, text1, text2, ... without gaps"
            )
    return [col for _, col in numbered]


def parse_rows(records: Iterable[Mapping[str, Any]], columns: list[str], split: str = "train",
               origins: list[str] | None = None) -> list[PromptRow]:
    """Read the records of one split into `PromptRow`s, checking every row. `origins`: where each
    record came from (`<file>, line <n>`), named by the errors and kept on the rows."""
    fmt = detect_format(columns)
    cols = text_columns(columns) if fmt == "multistep" else []
    out = []
    for i, rec in enumerate(records):
        origin = origins[i] if origins is not None else ""
        if fmt == "multistep":
            row = _multistep_row(i, rec, cols, split, origin)
        elif fmt == "paddlenlp":
            row = _paddle_row(i, rec, split, origin)
        else:
            row = _messages_row(i, rec, split, origin)
        out.append(row)
    return out


def _where(split: str, i: int, col: str, origin: str = "") -> str:
    return f"{PromptRow(i, (), origin=origin).where(split)}, column '{col}'"


def _multistep_row(i: int, rec: Mapping[str, Any], cols: list[str], split: str, origin: str = "") -> PromptRow:
    steps: list[str] = []
    ended_at = None
    for col in cols:
        cell = rec.get(col)
        if cell is not None and not isinstance(cell, str):
            raise DataFormatError(f"{_where(split, i, col, origin)}: expected a string, found {type(cell).__name__} {cell!r:.80}")
        empty = cell is None or not cell.strip()
        if empty:
            if col == "text":
                raise DataFormatError(f"{_where(split, i, col, origin)}: the first step is empty; every row needs a prompt")
            ended_at = ended_at or col
            continue
        if ended_at is not None:
            raise DataFormatError(
                f"{_where(split, i, col, origin)}: filled after the empty cell '{ended_at}'; a conversation ends at its "
                "first empty cell, so move the later turns left or remove them"
            )
        steps.append(cell)
    return PromptRow(index=i, steps=tuple(steps), format="multistep", origin=origin)


def _str_list(value: Any, where: str, what: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)):
        raise DataFormatError(f"{where}: expected a list of strings ({what}), found {type(value).__name__} {value!r:.80}")
    for k, item in enumerate(value):
        if not isinstance(item, str):
            raise DataFormatError(f"{where}[{k}]: expected a string, found {type(item).__name__} {item!r:.80}")
    return list(value)


def _paddle_row(i: int, rec: Mapping[str, Any], split: str, origin: str = "") -> PromptRow:
    src = _str_list(rec.get("src"), _where(split, i, "src", origin), "user turns")
    tgt_raw = rec.get("tgt")
    tgt = [] if tgt_raw is None else _str_list(tgt_raw, _where(split, i, "tgt", origin), "assistant turns")
    if not src:
        raise DataFormatError(f"{_where(split, i, 'src', origin)}: empty; PaddleNLP rows need at least one user turn")
    if len(tgt) != len(src) - 1:
        raise DataFormatError(
            f"{_where(split, i, 'tgt', origin)}: has {len(tgt)} turns but 'src' has {len(src)}; the PaddleNLP protocol "
            "needs len(tgt) == len(src) - 1 (the last assistant turn is the one generated)"
        )
    history: list[tuple[str, str]] = []
    for user, assistant in zip(src[:-1], tgt, strict=True):
        history += [("user", user), ("assistant", assistant)]
    return PromptRow(index=i, steps=(src[-1],), history=tuple(history), format="paddlenlp", origin=origin)


def _messages_row(i: int, rec: Mapping[str, Any], split: str, origin: str = "") -> PromptRow:
    where = _where(split, i, "messages", origin)
    msgs = rec.get("messages")
    if not isinstance(msgs, (list, tuple)) or not msgs:
        raise DataFormatError(f"{where}: expected a non-empty list of role/content dicts, found {msgs!r:.80}")
    turns: list[tuple[str, str]] = []
    for k, m in enumerate(msgs):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataFormatError(f"{where}[{k}]: expected {{'role': str, 'content': str}}, found {m!r:.80}")
        role = m["role"]
        expected = "user" if not turns or turns[-1][0] in ("system", "assistant") else "assistant"
        if role == "system" and k == 0:
            pass
        elif role != expected:
            raise DataFormatError(
                f"{where}[{k}]: role '{role}' where '{expected}' was expected; messages are an optional system "
                "message, then user and assistant turns alternating"
            )
        turns.append((role, m["content"]))
    if turns[-1][0] != "user":
        raise DataFormatError(f"{where}: the last message has role '{turns[-1][0]}'; it must be the user turn to answer")
    return PromptRow(index=i, steps=(turns[-1][1],), history=tuple(turns[:-1]), format="messages", origin=origin)

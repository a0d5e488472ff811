"""What the rollout needs to know about a tokenizer's chat template.

Everything is read off the template by rendering small probe conversations, so any template
works (ChatML, Llama 3, ...), not only the one the tiny test model ships.
"""

from __future__ import annotations

import re
from typing import Any

from lampo.data.formats import PromptRow

_ROLE = re.compile(r"^(system|user|assistant)(?:\s+|$)(.*)$", re.DOTALL)
_PROBE_USER, _PROBE_ASSISTANT = "Lampo probe question", "Lampo probe answer"


class ChatFormat:
    """Template facts for one tokenizer.

    end_of_turn_id: the token that ends an assistant turn (`<|im_end|>` for ChatML, `<|eot_id|>`
        for Llama 3, else eos); the default stop token.
    separator: the text the template writes between that token and the next turn (`"\\n"` in
        ChatML: `...<|im_end|>\\n<|im_start|>user`). The model stops AT the end-of-turn token, so
        the rollout inserts the separator itself before the next user segment; the history
        then reads exactly as the chat template would have written it.
    markers: the special tokens whose presence marks a cell as already templated.
    """

    def __init__(self, tokenizer: Any, system_prompt: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        vocab = tokenizer.get_vocab()
        pad = tokenizer.pad_token
        specials = {str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if getattr(t, "special", True)}
        specials |= set(getattr(tokenizer, "all_special_tokens", []))
        self.markers = tuple(sorted((s for s in specials if s and s != pad), key=len, reverse=True))
        self._split = re.compile("|".join(re.escape(m) for m in self.markers)) if self.markers else None
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        # The end-of-turn token is the special token the template writes right after an
        # assistant message; what follows it, before the next turn, is the separator.
        self.end_of_turn, self.separator = None, ""
        self._probe_text: str | None = None
        if self.has_template:
            text = self.render([("user", _PROBE_USER), ("assistant", _PROBE_ASSISTANT)], False)
            after = text[text.rfind(_PROBE_ASSISTANT) + len(_PROBE_ASSISTANT) :]
            marker = next((m for m in self.markers if after.startswith(m) and m in vocab), None)
            if marker is not None:
                self.end_of_turn, self.separator = marker, after[len(marker) :]
        if self.end_of_turn is None:
            self.end_of_turn = next((t for t in ("<|im_end|>", "<|eot_id|>", "<|end|>") if t in vocab), tokenizer.eos_token)
        if self.end_of_turn is None:
            raise ValueError("the tokenizer has no end-of-turn or eos token; set stop_token to a string")
        self.end_of_turn_id = vocab[self.end_of_turn]

    # --- rendering ---------------------------------------------------------------------------
    def render(self, turns: list[tuple[str, str]], generation_prompt: bool) -> str:
        """The template's text of `turns` ((role, content) pairs), with the generation prompt or not."""
        if not self.has_template:
            raise ValueError(
                "the tokenizer has no chat template, so plain-text cells cannot be templated; "
                "give chat-templated cells in the dataset or use a tokenizer with a chat_template"
            )
        msgs = [{"role": r, "content": c} for r, c in turns]
        return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    def is_templated(self, cell: str) -> bool:
        """A cell holding any of the template's special tokens is already templated (used verbatim)."""
        return any(m in cell for m in self.markers)

    def first_prompt(self, row: PromptRow) -> str:
        """Text of step 0's prompt: the templated cell verbatim, or history + user turn templated."""
        first = row.steps[0]
        if not row.history and self.is_templated(first):
            return first
        turns = list(row.history)
        if self.system_prompt and not any(r == "system" for r, _ in turns):
            turns.insert(0, ("system", self.system_prompt))
        return self.render(turns + [("user", first)], True)

    def next_segment(self, cell: str) -> str:
        """Text appended (after the separator) for a later step: the cell verbatim, or its user turn.

        A plain cell becomes what the template writes for one more user turn plus the generation
        prompt, read as the difference between renders with and without that turn.
        """
        if self.is_templated(cell):
            return cell.removeprefix(self.separator) if self.separator else cell
        probe = [("user", _PROBE_USER), ("assistant", _PROBE_ASSISTANT)]
        if self._probe_text is None:
            self._probe_text = self.render(probe, False)
        before = self._probe_text
        after = self.render(probe + [("user", cell)], True)
        if not after.startswith(before):
            raise ValueError("the chat template does not extend a conversation by appending text; "
                             "give chat-templated cells in the dataset instead of plain text")
        return after[len(before) :]

    def user_text(self, cell: str) -> str:
        """The plain user text of a cell: markup, role headers, system and assistant parts removed."""
        if not self.is_templated(cell) or self._split is None:
            return cell
        role, users, loose = None, [], []
        for piece in self._split.split(cell):
            m = _ROLE.match(piece.strip())
            if m:
                role, content = m.group(1), m.group(2).strip()
            else:
                content = piece.strip()
            if not content:
                continue
            if role == "user":
                users.append(content)
            elif role is None:
                loose.append(content)
        return "\n\n".join(users or loose)

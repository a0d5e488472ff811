"""The rollout batch: the contract between the rollout, reward and optimisation phases."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def left_pad(sequences: Sequence[Sequence[int] | torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [B, W] of token sequences left-padded to the longest: every
    row's last token sits in the last column, where generation continues from (open-instruct's
    implementation detail 1)."""
    width = max((len(seq) for seq in sequences), default=0)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if len(seq):
            ids[i, width - len(seq) :] = torch.as_tensor(seq, dtype=torch.long)
            mask[i, width - len(seq) :] = 1
    return ids, mask


@dataclass
class RolloutBatch:
    """B whole conversations the policy answered, right-padded to length T for training.

    Token-aligned tensors are indexed by token position: entry t describes token t of
    `input_ids` (its log-prob comes from the logits at position t - 1).

    Attributes:
        input_ids: LongTensor [B, T]. Prompt, every assistant turn (with its end-of-turn token
            when it stopped) and the user turns between them; `pad_token_id` after the end.
        attention_mask: LongTensor [B, T]. 1 on real tokens, 0 on padding.
        action_mask: BoolTensor [B, T]. True on tokens the policy generated (all assistant
            turns). Only these are trained, penalised with KL and enter GAE.
        engine_logprobs: FloatTensor [B, T]. Log-prob the engine reported when sampling each
            action token (0 elsewhere); compared with the learner's as `val/engine_logprob_diff`.
        turn_spans: per conversation, [start, end) token positions of each assistant turn.
        finish_reasons: per conversation, per assistant turn: "stop" or "length".
        messages: per conversation, the plain-text turns [user_1, assistant_1, ...] sent to the
            reward model (chat-template markup stripped).
        prompt_index: LongTensor [B]. Dataset row of each conversation; the conversations of
            one prompt share it (the group of grpo/rloo/dr_grpo), and groups are contiguous.
        policy_version: version of the policy weights that generated the batch (the oldest, when
            its conversations come from several: `versions`).
        versions: LongTensor [B] or None. The version that generated each conversation, where the
            conversations of one batch come from several (rollout workers that were re-synced at
            different times); None: all from `policy_version`.
        skipped_rows: dataset rows dropped by `truncation: skip` while building this batch.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    action_mask: torch.Tensor
    engine_logprobs: torch.Tensor
    turn_spans: list[list[tuple[int, int]]]
    finish_reasons: list[list[str]]
    messages: list[list[str]]
    prompt_index: torch.Tensor
    policy_version: int = 0
    versions: torch.Tensor | None = None
    skipped_rows: int = 0
    cut_at_max_prompt_len: int = 0
    """Conversations that ended before a later step because its prompt would exceed max_prompt_len."""

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def version_per_row(self) -> torch.Tensor:
        """LongTensor [B]: the policy version that generated each conversation."""
        if self.versions is not None:
            return self.versions
        return torch.full((len(self),), self.policy_version, dtype=torch.long)

    def select(self, rows: Sequence[int]) -> RolloutBatch:
        """The conversations `rows`, in that order (their padding kept)."""
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        versions = None if self.versions is None else self.versions[idx]
        return RolloutBatch(
            input_ids=self.input_ids[idx], attention_mask=self.attention_mask[idx], action_mask=self.action_mask[idx],
            engine_logprobs=self.engine_logprobs[idx], turn_spans=[self.turn_spans[i] for i in rows],
            finish_reasons=[self.finish_reasons[i] for i in rows], messages=[self.messages[i] for i in rows],
            prompt_index=self.prompt_index[idx],
            policy_version=int(versions.min()) if versions is not None and len(idx) else self.policy_version,
            versions=versions,
            skipped_rows=self.skipped_rows, cut_at_max_prompt_len=self.cut_at_max_prompt_len,
        )

    @staticmethod
    def concat(batches: Sequence[RolloutBatch], pad_id: int) -> RolloutBatch:
        """The batches' conversations one after the other, right-padded to the longest; counters summed."""
        width = max(b.input_ids.shape[1] for b in batches)
        versions = torch.cat([b.version_per_row() for b in batches])
        mixed = bool(len(versions)) and bool((versions != versions[0]).any())

        def cat(name: str, fill) -> torch.Tensor:
            parts = [getattr(b, name) for b in batches]
            return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=fill) for t in parts])

        return RolloutBatch(
            input_ids=cat("input_ids", pad_id), attention_mask=cat("attention_mask", 0),
            action_mask=cat("action_mask", False), engine_logprobs=cat("engine_logprobs", 0.0),
            turn_spans=[s for b in batches for s in b.turn_spans],
            finish_reasons=[r for b in batches for r in b.finish_reasons],
            messages=[m for b in batches for m in b.messages],
            prompt_index=torch.cat([b.prompt_index for b in batches]),
            policy_version=int(versions.min()) if len(versions) else batches[0].policy_version,
            versions=versions if mixed else None,
            skipped_rows=sum(b.skipped_rows for b in batches),
            cut_at_max_prompt_len=sum(b.cut_at_max_prompt_len for b in batches),
        )

    TENSORS = ("input_ids", "attention_mask", "action_mask", "engine_logprobs", "prompt_index")
    COUNTS = ("policy_version", "skipped_rows", "cut_at_max_prompt_len")

    def to_state(self) -> dict:
        """The batch as tensors, lists, strings and ints only: what a checkpoint stores, and what
        torch's safe loader (`weights_only=True`) reads back without unpickling any object."""
        state: dict = {name: getattr(self, name) for name in self.TENSORS}
        state["turn_spans"] = [[[int(start), int(end)] for start, end in spans] for spans in self.turn_spans]
        state["finish_reasons"] = [list(reasons) for reasons in self.finish_reasons]
        state["messages"] = [list(turns) for turns in self.messages]
        state.update({name: int(getattr(self, name)) for name in self.COUNTS})
        if self.versions is not None:
            state["versions"] = self.versions
        return state

    @classmethod
    def from_state(cls, state: dict) -> RolloutBatch:
        """The batch `to_state` gave; a field missing or of the wrong kind is a ValueError naming it."""
        def need(name: str, ok) -> object:
            if name not in state or not ok(state[name]):
                raise ValueError(f"rollout batch state: field '{name}' is missing or malformed")
            return state[name]

        def nested(depth: int, leaf):
            def ok(value, d=depth):
                return leaf(value) if d == 0 else isinstance(value, list) and all(ok(v, d - 1) for v in value)
            return ok

        tensors = {name: need(name, lambda v: isinstance(v, torch.Tensor)) for name in cls.TENSORS}
        if "versions" in state:  # only where the batch mixes policy versions
            tensors["versions"] = need("versions", lambda v: isinstance(v, torch.Tensor))
        spans = need("turn_spans", nested(3, lambda v: isinstance(v, int)))
        if any(len(span) != 2 for spans_ in spans for span in spans_):
            raise ValueError("rollout batch state: field 'turn_spans' holds a span that is not [start, end]")
        return cls(
            **tensors,
            turn_spans=[[(start, end) for start, end in spans_] for spans_ in spans],
            finish_reasons=need("finish_reasons", nested(2, lambda v: isinstance(v, str))),
            messages=need("messages", nested(2, lambda v: isinstance(v, str))),
            **{name: need(name, lambda v: isinstance(v, int)) for name in cls.COUNTS},
        )

    @property
    def stopped(self) -> torch.Tensor:
        """BoolTensor [B]: every assistant turn of the conversation ended with the stop token."""
        return torch.tensor([all(r == "stop" for r in reasons) for reasons in self.finish_reasons])

    @property
    def turn_ends(self) -> list[list[int]]:
        """Per conversation, the position of the last token of each assistant turn."""
        return [[end - 1 for _, end in spans] for spans in self.turn_spans]

    @property
    def num_generated_tokens(self) -> int:
        return int(self.action_mask.sum())

"""The rollout batch: the contract between the rollout, reward and optimisation phases."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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
        policy_version: version of the policy weights that generated the batch.
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
    skipped_rows: int = 0
    extras: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

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

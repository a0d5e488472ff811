"""The optimisation phase's contracts: what the learner trains on, and what its forward phase gives.

`build_train_batch` is the one place a `TrainBatch` is made, for the application (from a
`RolloutBatch` and the reward model's scores) and for the library's `PPOTrainer` (from queries,
responses and scores) alike: scores placed on their turns, the non-stop penalty applied.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lampo.optimize import maths as M


@dataclass(frozen=True)
class Sampling:
    """How a batch's tokens were drawn: temperature, then top-k, then top-p (0 and 1.0 disable them).

    The learner computes its log-probs under the same distribution (`maths.logprobs_and_entropy`),
    so that pi / pi_old and the engine's log-probs compare what was sampled from.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


@dataclass
class TrainBatch:
    """What the learner trains on: B conversations, right-padded to T tokens.

    Attributes:
        input_ids: LongTensor [B, T].
        attention_mask: LongTensor [B, T].
        action_mask: BoolTensor [B, T], True on generated (trained) tokens.
        placed_scores: FloatTensor [B, T], each score on the last token of its turn.
        seq_scores: FloatTensor [B], the conversation's total score (after the non-stop penalty).
        stopped: BoolTensor [B], every turn ended with the stop token.
        group_size: samples per prompt; groups are contiguous (grpo, rloo, dr_grpo).
        engine_logprobs: optional FloatTensor [B, T], the engine's sampling log-probs.
        sampling: how the batch was sampled; None: the config's temperature, top_k and top_p.
        policy_version_lag: policy updates between the weights that sampled the batch and the
            learner's now (0 in synchronous mode, 1 in asynchronous mode).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    action_mask: torch.Tensor
    placed_scores: torch.Tensor
    seq_scores: torch.Tensor
    stopped: torch.Tensor
    group_size: int = 1
    engine_logprobs: torch.Tensor | None = None
    sampling: Sampling | None = None
    policy_version_lag: int = 0

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> TrainBatch:
        """The batch with its tensors on `device` (itself when they are there already)."""
        device = torch.device(device)
        if self.input_ids.device == device:
            return self
        moved = {name: (None if t is None else t.to(device)) for name, t in (
            ("input_ids", self.input_ids), ("attention_mask", self.attention_mask), ("action_mask", self.action_mask),
            ("placed_scores", self.placed_scores), ("seq_scores", self.seq_scores), ("stopped", self.stopped),
            ("engine_logprobs", self.engine_logprobs))}
        return dataclasses.replace(self, **moved)

    def select(self, idx: torch.Tensor) -> TrainBatch:
        """Rows `idx`, trimmed to their longest sequence (right padding makes that safe)."""
        length = int(self.attention_mask[idx].sum(1).max().item()) if len(idx) else 1
        return TrainBatch(
            input_ids=self.input_ids[idx, :length],
            attention_mask=self.attention_mask[idx, :length],
            action_mask=self.action_mask[idx, :length],
            placed_scores=self.placed_scores[idx, :length],
            seq_scores=self.seq_scores[idx],
            stopped=self.stopped[idx],
            group_size=self.group_size,
            engine_logprobs=None if self.engine_logprobs is None else self.engine_logprobs[idx, :length],
            sampling=self.sampling,
            policy_version_lag=self.policy_version_lag,
        )


@dataclass
class Forwarded:
    """The forward phase's per-token tensors [B, T], aligned with the tokens, computed without gradients.

    old_logprobs: log pi_old; None when the first training pass provides them (one epoch, one
        minibatch, nothing else needs them: `Passes.fuses_old_logprobs`).
    ref_logprobs: log pi_ref; None when no reference is used (kl_coef 0): the KL is then exactly 0.
    values: the critic's values; None without a critic.
    sampling_logprobs: log-probs under the weights that sampled a batch one update old (asynchronous
        runs; `Learner.keep_sampling_weights`); None otherwise. For a batch of the current weights
        they are `old_logprobs`.
    """

    old_logprobs: torch.Tensor | None
    ref_logprobs: torch.Tensor | None
    values: torch.Tensor | None
    sampling_logprobs: torch.Tensor | None = None


def build_train_batch(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    action_mask: torch.Tensor,
    scores: Sequence[float | list[float]],
    turn_ends: Sequence[Sequence[int]],
    stopped: torch.Tensor,
    *,
    given_turns: Sequence[int] | None = None,
    non_stop_penalty: float | None = None,
    overlong: tuple[int, int, float] | None = None,
    turn_lengths: Sequence[Sequence[int]] | None = None,
    group_size: int = 1,
    engine_logprobs: torch.Tensor | None = None,
    sampling: Sampling | None = None,
    policy_version_lag: int = 0,
) -> TrainBatch:
    """Place each conversation's score(s) on its turns and apply the non-stop penalty.

    scores: per conversation a float, placed on the last token of the last turn (Ziegler et al.
        2019), or a list with one score per assistant turn the reward model read: `given_turns[i]`
        turns the dataset gave (PaddleNLP `tgt`, earlier `messages` turns) first, then one per
        generated turn, each placed on the last token of its turn (docs/reward-server.md).
    turn_ends: per conversation, the position of each generated turn's last token (none: nothing
        was generated; the score still counts in `seq_scores`, for its group's baseline).
    non_stop_penalty: the score given instead to a conversation that did not stop (open-instruct's
        `--penalty_reward_value`); None leaves scores as they are.
    overlong: (max_new_tokens, buffer_len, factor) of DAPO's overlong shaping: each generated turn
        of `turn_lengths` tokens adds `maths.overlong_penalty` at its last token. It applies to
        conversations that stopped; one that did not gets the non-stop penalty instead, which
        replaces its whole score (docs/algorithms.md).
    """
    if not (len(scores) == len(turn_ends) == len(stopped)):
        raise ValueError(f"{len(scores)} scores for {len(turn_ends)} conversations and {len(stopped)} stop flags")
    flat = [x for score in scores for x in (score if isinstance(score, list) else [score])]
    if not all(math.isfinite(x) for x in flat):
        raise ValueError(f"scores must be finite numbers, got {list(scores)}")
    per_turn, positions, totals = [], [], []
    for i, (score, ends) in enumerate(zip(scores, turn_ends, strict=True)):
        if not ends:  # nothing generated: the score counts in its group's statistics, placed nowhere
            penalised = non_stop_penalty is not None and not bool(stopped[i])
            total = non_stop_penalty if penalised else (0.0 if isinstance(score, list) else float(score))
            per_turn.append([]), positions.append([]), totals.append(total)
            continue
        if isinstance(score, list):
            given = given_turns[i] if given_turns is not None else 0
            if len(score) != given + len(ends):
                raise ValueError(f"conversation {i}: the reward model gave {len(score)} per-turn scores for "
                                 f"{given + len(ends)} assistant turns ({given} given, {len(ends)} generated)")
            turn_scores, turn_pos = [float(x) for x in score[given:]], list(ends)
        else:
            turn_scores, turn_pos = [float(score)], [ends[-1]]
        if non_stop_penalty is not None and not bool(stopped[i]):
            turn_scores, turn_pos = [non_stop_penalty], [ends[-1]]
        elif overlong is not None and turn_lengths is not None:
            max_len, buffer_len, factor = overlong
            shaping = M.overlong_penalty(torch.tensor(turn_lengths[i]), max_len, buffer_len, factor).tolist()
            turn_scores, turn_pos = turn_scores + shaping, turn_pos + list(ends)
        per_turn.append(turn_scores)
        positions.append(turn_pos)
        totals.append(sum(turn_scores))
    return TrainBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        action_mask=action_mask,
        placed_scores=M.place_scores(per_turn, positions, tuple(input_ids.shape)),
        seq_scores=torch.tensor(totals, dtype=torch.float32),
        stopped=stopped,
        group_size=group_size,
        engine_logprobs=engine_logprobs,
        sampling=sampling,
        policy_version_lag=policy_version_lag,
    )

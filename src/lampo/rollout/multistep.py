"""The multi-step rollout: dataset rows in, answered conversations (a `RolloutBatch`) out.

As the design documents describe it, step 0's prompt is the row's first segment; after the
model answers, step i's prompt is step i-1's prompt + the response (ending with its end-of-turn
token) + the row's segment i. Generation is batched per step across the whole batch:

    for step in range(max steps):
        prompts = [conversation so far + glue + segment `step`]   # every live conversation
        responses = engine.generate(prompts)                       # one call per step
        append each response; conversations that ended drop out of later steps

The glue between a response and the next segment is what the chat template writes there: the
end-of-turn token (the model generated it when it stopped at that token; otherwise it is added
as a template token) and the template's separator after it (`"\\n"` for ChatML). Only tokens
the engine generated are actions (`action_mask`); glue, user and template tokens are not.

A conversation ends early when its next cell is empty or when its next prompt would exceed
`max_prompt_len`. A turn that hits `max_new_tokens` without the stop token (finish reason
"length") is closed with the end-of-turn token, as the template writes it, and the conversation
goes on (`truncated_turn: continue`, the default), so the reward model receives every turn of the
row and the later turns are trained; the non-stop penalty still applies to the conversation.
With `truncated_turn: end` the conversation ends at the cut turn.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from lampo.data.formats import PromptRow
from lampo.rollout.batch import RolloutBatch
from lampo.rollout.chat import ChatFormat
from lampo.rollout.engines import Generation, SamplingSettings

log = logging.getLogger(__name__)

_FORMAT_CACHE: dict[tuple[int, str | None], ChatFormat] = {}


class PromptTooLongError(ValueError):
    """A prompt longer than `max_prompt_len` with `truncation: error`."""


@dataclass
class _Conversation:
    """One conversation being rolled out (a row and one of its samples)."""

    row: PromptRow
    ids: list[int]
    actions: list[bool]
    logprobs: list[float]
    position: int = 0
    """Its place in the whole batch (row position x samples + sample): later turns' seeds."""
    spans: list[tuple[int, int]] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    done: bool = False


def chat_format(tokenizer: Any, system_prompt: str | None = None) -> ChatFormat:
    """The (cached) template facts of a tokenizer."""
    key = (id(tokenizer), system_prompt)
    fmt = _FORMAT_CACHE.get(key)
    if fmt is None or fmt.tokenizer is not tokenizer:
        fmt = _FORMAT_CACHE[key] = ChatFormat(tokenizer, system_prompt)
    return fmt


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Token ids that end a turn: the end-of-turn token and eos (a stop string adds to these)."""
    fmt = chat_format(tokenizer)
    ids = [fmt.end_of_turn_id]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def sampling_settings(tokenizer: Any, generation_cfg: Any, n: int = 1, seed: int | None = None,
                      seeds: list[int] | None = None) -> SamplingSettings:
    g = generation_cfg
    return SamplingSettings(
        temperature=g.temperature,
        top_p=g.top_p,
        top_k=g.top_k,
        repetition_penalty=g.repetition_penalty,
        max_new_tokens=g.max_new_tokens,
        min_new_tokens=g.min_new_tokens,
        stop_token_ids=stop_token_ids(tokenizer),
        n=n,
        seed=seed,
        seeds=seeds,
        logprobs=g.engine_logprobs,
    )


def rollout(
    engine: Any,
    tokenizer: Any,
    rows: list[PromptRow],
    generation_cfg: Any,
    data_cfg: Any,
    policy_version: int,
    seed: int | None = None,
    first_row: int = 0,
) -> RolloutBatch:
    """Generate every step of every row, `num_generations` samples per row (contiguous groups).

    seed: the batch's sampling seed. Each request's seed follows from it and from the position of
    its row in the batch (`first_row`: the position of `rows[0]`, when `rows` is one part of a
    batch rolled out in several calls), so a vLLM engine samples a conversation the same way
    whether its batch went out in one call or in parts to several workers.
    """
    fmt = chat_format(tokenizer, data_cfg.system_prompt)
    n = generation_cfg.num_generations
    max_len = data_cfg.max_prompt_len
    stop_string = generation_cfg.stop_token or None

    # 1. Step-0 prompts, with the truncation policy.
    firsts: list[tuple[PromptRow, list[int]]] = []
    row_positions: list[int] = []
    skipped = 0
    encoded = _encode(tokenizer, [fmt.first_prompt(row) for row in rows])
    for position, (row, ids) in enumerate(zip(rows, encoded, strict=True), start=first_row):
        if len(ids) > max_len:
            if data_cfg.truncation == "error":
                origin = f" ({row.origin})" if row.origin else ""
                raise PromptTooLongError(
                    f"row {row.index}{origin}: the step-0 prompt has {len(ids)} tokens, more than max_prompt_len={max_len}; "
                    "raise max_prompt_len or set truncation: left (keep the end) or skip (drop such rows)"
                )
            if data_cfg.truncation == "skip":
                skipped += 1
                continue
            ids = ids[-max_len:]
        firsts.append((row, ids))
        row_positions.append(position)
    if skipped:
        log.info("rollout: skipped %d of %d rows longer than max_prompt_len=%d", skipped, len(rows), max_len)

    # 2. Step 0: one request per row with n samples, so engines can share the prompt's prefix.
    convs: list[_Conversation] = []
    gens: list[Generation] = []
    seeds = None if seed is None else [seed + position * n for position in row_positions]
    results = engine.generate([ids for _, ids in firsts], sampling_settings(tokenizer, generation_cfg, n, seed, seeds))
    for (row, ids), position, samples in zip(firsts, row_positions, results, strict=True):
        if len(samples) != n:
            raise RuntimeError(f"engine returned {len(samples)} samples for row {row.index}, expected {n}")
        user = fmt.user_text(row.steps[0])
        for k, gen in enumerate(samples):
            c = _Conversation(row=row, ids=list(ids), actions=[False] * len(ids), logprobs=[0.0] * len(ids),
                              position=position * n + k)
            # The reward model sees the fixed history too (PaddleNLP `tgt`, earlier `messages`).
            c.messages += [content for role, content in row.history if role != "system"]
            c.messages.append(user)
            convs.append(c)
            gens.append(gen)
    _append_responses(convs, gens, tokenizer, stop_string)

    # 3. Later steps: every live conversation gets its next segment, then one batched call.
    cut_by_length = 0
    num_steps = max((len(r.steps) for r, _ in firsts), default=0)
    for step in range(1, num_steps):
        going: list[_Conversation] = []
        for c in convs:
            if c.done:
                continue
            cut_ends = c.reasons[-1] != "stop" and generation_cfg.truncated_turn == "end"
            if step >= len(c.row.steps) or cut_ends:
                c.done = True  # no later cell, or a cut-off answer with truncated_turn: end
                continue
            going.append(c)
        segments = _encode(tokenizer, [fmt.separator + fmt.next_segment(c.row.steps[step]) for c in going])
        live: list[tuple[_Conversation, list[int]]] = []
        for c, segment in zip(going, segments, strict=True):
            # The model wrote the end-of-turn token when it stopped at it; else it is added here.
            glue = ([] if c.ids[-1] == fmt.end_of_turn_id else [fmt.end_of_turn_id]) + segment
            if len(c.ids) + len(glue) > max_len:
                c.done = True
                cut_by_length += 1
                continue
            live.append((c, glue))
        if not live:
            break
        step_seed = None if seed is None else seed + 7919 * step
        prompts = [c.ids + glue for c, glue in live]
        seeds = None if step_seed is None else [step_seed + c.position for c, _ in live]
        results = engine.generate(prompts, sampling_settings(tokenizer, generation_cfg, 1, step_seed, seeds))
        for (c, glue), _samples in zip(live, results, strict=True):
            c.ids += glue
            c.actions += [False] * len(glue)
            c.logprobs += [0.0] * len(glue)
            c.messages.append(fmt.user_text(c.row.steps[step]))
        _append_responses([c for c, _ in live], [samples[0] for samples in results], tokenizer, stop_string)

    batch = _to_batch(convs, tokenizer, policy_version, skipped)
    batch.cut_at_max_prompt_len = cut_by_length
    return batch


def check_prompt_lengths(tokenizer: Any, rows: list[PromptRow], data_cfg: Any, split: str) -> None:
    """Under `truncation: error`, stop at load, not at the step that meets it, when a row's
    step-0 prompt (exactly as `rollout` builds it) is longer than `max_prompt_len`. The error
    names the row's file and line, its length, the key, and how many other rows are too long."""
    if data_cfg.truncation != "error" or not rows:
        return
    fmt = chat_format(tokenizer, data_cfg.system_prompt)
    max_len = data_cfg.max_prompt_len
    too_long: list[tuple[PromptRow, int]] = []
    for start in range(0, len(rows), 512):  # batched tokenizer calls, bounded memory
        chunk = rows[start : start + 512]
        encoded = _encode(tokenizer, [fmt.first_prompt(row) for row in chunk])
        too_long += [(row, len(ids)) for row, ids in zip(chunk, encoded, strict=True) if len(ids) > max_len]
    if too_long:
        row, length = too_long[0]
        more = f"; {len(too_long) - 1} more rows of the {split} split are too long as well" if len(too_long) > 1 else ""
        raise PromptTooLongError(
            f"query_dataset {row.where(split)}: the step-0 prompt has {length} tokens, more than "
            f"max_prompt_len = {max_len} (truncation: error){more}. Raise max_prompt_len, shorten the row, or set "
            "truncation: left (keep the end) or skip (drop such rows)"
        )


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, in one batched tokenizer call.

    The template text carries every special token it needs (BOS included when it has one).
    """
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _append_responses(convs: list[_Conversation], gens: list[Generation], tokenizer: Any, stop: str | None) -> None:
    """Append one engine response to each conversation (stop string cut, then one batched decode)."""
    cut: list[tuple[list[int], list[float], str]] = []
    for gen in gens:
        tokens, logprobs, reason = list(gen.token_ids), list(gen.logprobs), gen.finish_reason
        if len(logprobs) != len(tokens):
            raise RuntimeError(f"engine returned {len(logprobs)} log-probs for {len(tokens)} tokens")
        if stop:
            k = _stop_string_cut(tokens, tokenizer, stop)
            if k is not None:
                tokens, logprobs, reason = tokens[:k], logprobs[:k], "stop"
        cut.append((tokens, logprobs, reason))
    texts = tokenizer.batch_decode([t for t, _, _ in cut], skip_special_tokens=True) if cut else []
    for c, (tokens, logprobs, reason), text in zip(convs, cut, texts, strict=True):
        if stop and stop in text:  # the stop string and anything after it are not the answer
            text = text[: text.find(stop)]
        start = len(c.ids)
        c.ids += tokens
        c.actions += [True] * len(tokens)
        c.logprobs += logprobs
        c.spans.append((start, len(c.ids)))
        c.reasons.append(reason)
        c.messages.append(text)


def _stop_string_cut(tokens: list[int], tokenizer: Any, stop: str) -> int | None:
    """Number of tokens up to the one that completes the first occurrence of `stop` (None: absent)."""
    if stop not in tokenizer.decode(tokens, skip_special_tokens=False):
        return None
    for k in range(1, len(tokens) + 1):  # the first prefix whose text contains the stop string
        if stop in tokenizer.decode(tokens[:k], skip_special_tokens=False):
            return k
    return None


def _to_batch(convs: list[_Conversation], tokenizer: Any, policy_version: int, skipped: int) -> RolloutBatch:
    """Right-pad the conversations into the batch tensors."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max((len(c.ids) for c in convs), default=0)
    # Pad as Python lists and convert once (one tensor per field, not one per conversation).
    input_ids = torch.tensor([c.ids + [pad] * (width - len(c.ids)) for c in convs], dtype=torch.long)
    attention = torch.tensor([[1] * len(c.ids) + [0] * (width - len(c.ids)) for c in convs], dtype=torch.long)
    actions = torch.tensor([c.actions + [False] * (width - len(c.ids)) for c in convs], dtype=torch.bool)
    logprobs = torch.tensor([c.logprobs + [0.0] * (width - len(c.ids)) for c in convs], dtype=torch.float32)
    if not convs:
        input_ids, attention, actions, logprobs = (t.reshape(0, 0) for t in (input_ids, attention, actions, logprobs))
    return RolloutBatch(
        input_ids=input_ids,
        attention_mask=attention,
        action_mask=actions,
        engine_logprobs=logprobs,
        turn_spans=[c.spans for c in convs],
        finish_reasons=[c.reasons for c in convs],
        messages=[c.messages for c in convs],
        prompt_index=torch.tensor([c.row.index for c in convs], dtype=torch.long),
        policy_version=policy_version,
        skipped_rows=skipped,
    )

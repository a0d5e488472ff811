"""PPO-ptx's supervised data (InstructGPT, Ouyang et al. 2022): conversations whose assistant turns
the policy learns to predict, beside the RL objective (`ptx_dataset`, `ptx_coef`).

Loaded like the prompt datasets (a hub id, a `save_to_disk` folder, a folder of data files or one
jsonl/json/csv/parquet file; its train split), in one of three row formats:
- `prompt` and `response`: one user turn and its answer;
- `messages`: role/content dicts, an optional system message, user and assistant alternating,
  ending with an assistant turn;
- PaddleNLP's `src` and `tgt`, with as many assistant turns (`tgt`) as user turns (`src`).
Each row is written with the tokenizer's chat template; the trained tokens are every assistant
turn's text and its end-of-turn token, as the rollout trains a generated turn.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from lampo.data.formats import DataFormatError
from lampo.data.loading import Records, load_split_records
from lampo.data.task_config import mix, read_task_file
from lampo.optimize.batch import Sampling, TrainBatch
from lampo.rollout.chat import ChatFormat

log = logging.getLogger(__name__)


def ptx_batch(config: Any, tokenizer: Any) -> TrainBatch | None:
    """PPO-ptx's batch for a run's config (`ptx_dataset` or `ptx_task_config`), each example cut at
    the longest conversation the run can roll out; None without ptx data."""
    d = config.data
    max_len = d.max_prompt_len + config.generation.max_new_tokens
    if d.ptx_task_config:
        return load_ptx(d.ptx_task_config, tokenizer, max_len, records=task_records(d.ptx_task_config))
    return load_ptx(d.ptx_dataset, tokenizer, max_len) if d.ptx_dataset else None


def task_records(path: str, split: str = "train") -> Records:
    """The records of every data file a PaddleNLP task file names, mixed by their weights as the
    prompt datasets' task files are (`lampo.data.task_config.mix`)."""
    parts, columns = [], set()
    for file, weight in read_task_file(path, "ptx_task_config"):
        splits = load_split_records(str(file))
        records = splits.get(split) or splits.get("train") or next(iter(splits.values()))
        if not records.rows:
            raise DataFormatError(f"config key 'ptx_task_config': data file '{file}' has no rows")
        parts.append((list(zip(records.rows, records.origins, strict=True)), weight))
        columns.update(records.columns)
    mixed = mix(parts)
    return Records([row for row, _ in mixed], sorted(columns), [origin for _, origin in mixed], f"task file '{path}'")


def load_ptx(source: str, tokenizer: Any, max_len: int, split: str = "train",
             records: Records | None = None) -> TrainBatch:
    """The supervised examples of `source` (or the `records` read from it) as one right-padded batch,
    each cut at `max_len` tokens."""
    if records is None:
        splits = load_split_records(source)
        if split not in splits:
            raise DataFormatError(f"ptx_dataset '{source}' has no split '{split}' (found {sorted(splits)})")
        records = splits[split]
    if not records.rows:
        raise DataFormatError(f"ptx_dataset '{source}': split '{split}' ({records.where}) has no rows")
    fmt = ChatFormat(tokenizer)
    examples, cut = [], 0
    for i, (record, origin) in enumerate(zip(records.rows, records.origins, strict=True)):
        ids, trained = example_tokens(conversation(record, i, source, origin), fmt, tokenizer)
        if len(ids) > max_len:
            ids, trained, cut = ids[:max_len], trained[:max_len], cut + 1
        examples.append((ids, trained))
    if cut:
        log.warning("ptx_dataset '%s': %d of %d examples cut at %d tokens", source, cut, len(examples), max_len)
    width = max(len(ids) for ids, _ in examples)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in examples], dtype=torch.long)
    attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in examples], dtype=torch.long)
    action = torch.tensor([t + [False] * (width - len(t)) for _, t in examples], dtype=torch.bool)
    B = len(examples)
    # the language-modelling likelihood: temperature 1, the whole vocabulary
    return TrainBatch(input_ids=input_ids, attention_mask=attention, action_mask=action,
                      placed_scores=torch.zeros(B, width), seq_scores=torch.zeros(B),
                      stopped=torch.ones(B, dtype=torch.bool), sampling=Sampling())


def conversation(record: Mapping[str, Any], index: int, source: str, origin: str = "") -> list[tuple[str, str]]:
    """A row's (role, content) turns; the error names the row (its file and line, given `origin`)
    and says what was expected."""
    where = f"ptx_dataset {origin}" if origin else f"ptx_dataset '{source}', row {index}"
    if isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str):
        return [("user", record["prompt"]), ("assistant", record["response"])]
    if isinstance(record.get("messages"), list):
        turns = []
        for k, m in enumerate(record["messages"]):
            if not (isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise DataFormatError(f"{where}, messages[{k}]: expected {{'role': str, 'content': str}}, found {m!r:.80}")
            turns.append((m["role"], m["content"]))
        if not turns or turns[-1][0] != "assistant":
            raise DataFormatError(f"{where}: the last message must be the assistant's (the text to learn)")
        return turns
    src, tgt = record.get("src"), record.get("tgt")
    if src is not None and tgt is not None:
        src, tgt = ([src] if isinstance(src, str) else src), ([tgt] if isinstance(tgt, str) else tgt)
        if len(src) != len(tgt) or not src:
            raise DataFormatError(f"{where}: PaddleNLP rows for PPO-ptx need one tgt per src, got {len(src)} and "
                                  f"{len(tgt)}")
        return [turn for user, answer in zip(src, tgt, strict=True) for turn in (("user", user), ("assistant", answer))]
    raise DataFormatError(f"{where}: expected `prompt` and `response`, `messages` ending with the assistant, or "
                          f"PaddleNLP `src` and `tgt`; found columns {sorted(record)}")


def example_tokens(turns: list[tuple[str, str]], fmt: ChatFormat, tokenizer: Any) -> tuple[list[int], list[bool]]:
    """Token ids of the templated conversation and, per token, whether it is trained.

    The text is built turn by turn as the template writes it: up to each assistant turn's
    generation prompt (not trained), the turn up to and including its end-of-turn token (trained),
    then the template's separator (not trained).
    """
    ids: list[int] = []
    trained: list[bool] = []
    done = ""

    def add(text: str, train: bool) -> None:
        new = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        ids.extend(new)
        trained.extend([train] * len(new))

    for k, (role, _content) in enumerate(turns):
        if role != "assistant":
            continue
        prompt = fmt.render(turns[:k], generation_prompt=True)
        full = fmt.render(turns[: k + 1], generation_prompt=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ValueError("the chat template does not extend a conversation by appending text; "
                             "PPO-ptx needs one that does")
        answer = full[len(prompt):]
        end = answer.find(fmt.end_of_turn)
        end = len(answer) if end < 0 else end + len(fmt.end_of_turn)
        add(prompt[len(done):], False)
        add(answer[:end], True)
        add(answer[end:], False)
        done = full
    return ids, trained

"""What TRL-classic's `PPOTrainer` offered beyond Lampo's generate/step/save_model.

`lampo.PPOTrainer` calls these when it is used the TRL way (docs/compat.md):

    ppo_trainer = PPOTrainer(model=model, config=config, train_dataset=dataset, tokenizer=tokenizer)
    for batch in ppo_trainer.dataloader:                      # batches of config.batch_size rows
        responses = ppo_trainer.generate(batch["input_ids"], **generation_kwargs)
        stats = ppo_trainer.step(batch["input_ids"], responses, rewards)
        ppo_trainer.log_stats(stats, batch, rewards)

- the dataloader: the dataset's rows in shuffled batches (seeded by `seed`), every column as a
  list, `input_ids` as a list of 1-D LongTensors (TRL's collator); the last batch may be short
  (TRL dropped it, which made a dataset smaller than one batch yield nothing);
- generation keywords: transformers' names (`min_length`, `top_k` as TRL wrote it, `0.0`,
  `pad_token_id`, `eos_token_id`, ...), TRL's `return_prompt`, `batch_size` and `length_sampler`;
  the temperature, top-k and top-p they set are what `step` recomputes its log-probs under;
- `log_stats`: the step's metrics to the configured trackers and a query/response/reward table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

TRL_GENERATE_KEYS = ("return_prompt", "batch_size", "length_sampler", "remove_padding", "generate_ref_response")
"""TRL's own `generate` arguments (the rest are transformers' generation keywords)."""


CLASSIC_SETTINGS = {"value_model": "head", "non_stop_penalty": False}
"""What a model with a value head (TRL-classic's class) implies, for keys the config leaves at their
defaults: the head is the critic, and `step` trains on the rewards it is given (TRL-classic had no
non-stop penalty; Lampo's would replace the reward of every response cut at max_new_tokens)."""


def classic_settings(config: Any) -> Any:
    """`config` with CLASSIC_SETTINGS for the keys it does not set itself."""
    changes = {k: v for k, v in CLASSIC_SETTINGS.items()
               if k not in config.explicit_keys and getattr(config, k) != v}
    return config.replace(**changes) if changes else config


def collator(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """TRL's collator: every column as a list; `input_ids` as 1-D LongTensors."""
    batch = {key: [row[key] for row in rows] for key in rows[0]}
    if "input_ids" in batch:
        batch["input_ids"] = [torch.as_tensor(ids, dtype=torch.long).reshape(-1) for ids in batch["input_ids"]]
    return batch


def make_dataloader(dataset: Any, batch_size: int, seed: int, data_collator: Callable | None = None):
    """Shuffled batches of `batch_size` rows (the last may be shorter), reproducible from `seed`."""
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=data_collator or collator,
                      drop_last=False, generator=torch.Generator().manual_seed(seed))


@dataclass
class GenerateCall:
    """One `PPOTrainer.generate` call's settings, after TRL's and transformers' keywords are read."""

    hf_kwargs: dict[str, Any]
    """Keywords for transformers' `generate` (sampling settings and any other generation keyword)."""
    temperature: float
    pad_token_id: int
    stop_token_id: int
    return_prompt: bool = False
    chunk: int | None = None
    """Queries per `generate` call (TRL's batch_size); None: all at once."""
    length_sampler: Callable[[], int] | None = None
    top_k: int = 0
    top_p: float = 1.0


def generate_call(generation_cfg: Any, pad_token_id: int, stop_token_id: int, overrides: dict[str, Any]) -> GenerateCall:
    """The settings of a `generate` call: the config's, overridden by the call's keywords."""
    g = generation_cfg
    kw = dict(overrides)
    if not kw.pop("remove_padding", True):
        raise TypeError("generate(remove_padding=False) is not supported: responses never carry padding")
    if kw.pop("generate_ref_response", False):
        raise TypeError("generate(generate_ref_response=True) is not supported: generate with the reference "
                        "model yourself")
    temperature = float(kw.pop("temperature", g.temperature))
    top_k = int(kw.pop("top_k", g.top_k) or 0)  # TRL's examples write top_k=0.0
    top_p = float(kw.pop("top_p", g.top_p))
    # transformers' max_length (prompt included) replaces the config's max_new_tokens when given alone
    max_new = kw.pop("max_new_tokens", None if "max_length" in kw else g.max_new_tokens)
    call = GenerateCall(
        hf_kwargs=dict(
            max_new_tokens=max_new,
            min_new_tokens=kw.pop("min_new_tokens", g.min_new_tokens),
            do_sample=kw.pop("do_sample", True),
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=kw.pop("repetition_penalty", g.repetition_penalty),
        ),
        temperature=temperature,
        pad_token_id=int(kw.pop("pad_token_id", pad_token_id)),
        stop_token_id=int(kw.pop("eos_token_id", stop_token_id)),
        return_prompt=bool(kw.pop("return_prompt", False)),
        chunk=kw.pop("batch_size", None),
        length_sampler=kw.pop("length_sampler", None),
        top_k=top_k,
        top_p=top_p,
    )
    # transformers' min_length counts the prompt; TRL's examples write -1 for "no minimum"
    min_length = kw.pop("min_length", None)
    if min_length is not None and min_length > 0:
        call.hf_kwargs["min_length"] = min_length
    call.hf_kwargs.update(kw)  # any other generation keyword: transformers checks it
    return call


def log_stats(trainer: Any, stats: dict[str, Any], batch: dict[str, Any], rewards: Any,
              columns_to_log: tuple[str, ...] = ("query", "response")) -> None:
    """The step's metrics, and a table of the batch's `columns_to_log` with each reward, to the trackers."""
    from lampo.tracking import Tracker

    if trainer.tracker is None:
        steps = len(trainer.dataloader) if trainer.dataloader is not None else trainer.config.num_steps
        trainer.tracker = Tracker(trainer.config, trainer.config.to_dict(), total_steps=steps)
    step = max(trainer.learner.global_step, 1)
    numbers = {k: float(v) for k, v in stats.items() if _is_number(v)}
    trainer.tracker.log(step, numbers)
    scores = [float(r) for r in rewards]
    present = [c for c in columns_to_log if c in batch]
    rows = [{**{c: _text(batch[c][i]) for c in present}, "reward": scores[i]} for i in range(len(scores))]
    trainer.tracker.log_table(step, rows)


def _is_number(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() == 1
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _text(value: Any) -> Any:
    return value.tolist() if isinstance(value, torch.Tensor) else value

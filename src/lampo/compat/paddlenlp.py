"""PaddleNLP PPO/GRPO argument files: `python -m lampo.ppo_vllm --config grpo_argument.json`.

A JSON config file is read as PaddleNLP writes its argument files (`llm/config/*/ppo_argument.json`,
`grpo_argument.json`; design document 002 lists the keys). Every key is either

- Lampo's own key under the same name (`learning_rate`, `max_prompt_len`, `logging_steps`, `bf16`, ...)
  or an alias of one (lampo.compat.aliases: `max_dec_len` -> `max_new_tokens`, ...);
- read here (FILE_NAMES and `translate`): argument-file names too generic to be aliases everywhere
  (`kl_coeff`), and keys that set more than one Lampo key (`reward_model_name_or_path`,
  `per_device_train_batch_size`, `do_eval`, ...);
- checked here (`max_seq_len`, `max_length`: prompt plus decode must fit);
- without meaning in Lampo (NO_MEANING): accepted, with one printed line each saying why;
- or unknown: an error naming the key, with the nearest known name.
PaddleNLP writes booleans as 0/1; they become false/true for Lampo's boolean keys. Command-line
overrides (`--max_steps 2`) apply after the file, in Lampo's names or the aliases.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lampo.compat.aliases import ALIASES, ESTIMATORS, FILE_NAMES, NO_MEANING  # noqa: F401 (re-exported)
from lampo.config import _FIELD_TYPES, ConfigError, LampoConfig

HF_CLASSIFIER = "lampo.reward.hf_classifier.HFSequenceClassifierReward"
"""The in-process reward model `reward_model_name_or_path` names (any sequence classifier)."""

CHECKED = ("max_seq_len", "max_length")
"""Longest sequence: max_prompt_len + max_new_tokens must not exceed it (checked, then dropped)."""

HANDLED = ("reward_model_name_or_path", "use_rm_server", "ptx_task_config", "ptx_datasets",
           "per_device_train_batch_size", "do_eval", "evaluation_strategy", "eval_strategy", "save_strategy",
           "train_datasets", "eval_datasets")
"""Keys `translate` reads because they set more than one Lampo key or need a decision."""


def load_argument_file(path: str | Path, overrides: dict[str, Any] | None = None,
                       echo: Callable[[str], None] = print) -> LampoConfig:
    """The validated config of a PaddleNLP argument file, with command-line `overrides` applied."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ConfigError(f"config file '{path}' is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"config file '{path}' must be a JSON object of keys and values")
    # the command line speaks the file's language too, and replaces the file's key of the same meaning
    overrides = dict(overrides or {})
    overridden = {_lampo_key(k) for k in overrides}
    merged = {**{k: v for k, v in raw.items() if _lampo_key(k) not in overridden}, **overrides}
    values, limits = translate(merged, echo)
    cfg = LampoConfig(values)
    check_lengths(cfg, limits)
    return cfg


def translate(raw: dict[str, Any], echo: Callable[[str], None] = print) -> tuple[dict[str, Any], dict[str, int]]:
    """(Lampo keys and aliases with their values, the length limits to check) of an argument file."""
    values = dict(raw)
    out: dict[str, Any] = {}
    for key in [k for k in values if k in NO_MEANING]:
        echo(f"lampo: PaddleNLP key '{key}' = {values.pop(key)!r} has no effect here: {NO_MEANING[key]}")
    limits = {key: values.pop(key) for key in CHECKED if key in values}

    # PPO-ptx's data (an SFT loss beside PPO's): a task file, as for the prompts
    if values.get("ptx_task_config"):
        out["ptx_task_config"] = values.pop("ptx_task_config")
    values.pop("ptx_task_config", None)
    if values.pop("ptx_datasets", ""):
        raise ConfigError(f"config key 'ptx_datasets' = {raw['ptx_datasets']!r}: name PPO-ptx's data in a task file "
                          "with 'ptx_task_config' (docs/compat.md), or give one dataset with ptx_dataset")
    for key in ("train_datasets", "eval_datasets"):
        if values.get(key):
            task = key.replace("datasets", "task_config")
            raise ConfigError(f"config key '{key}' = {values[key]!r}: name the data in a task file with "
                              f"'{task}' (docs/compat.md), or give one dataset with query_dataset")
        values.pop(key, None)

    # the reward: a reward server, or a sequence classifier in-process; the critic starts from it
    reward_path = values.pop("reward_model_name_or_path", "") or ""
    use_server = bool(values.pop("use_rm_server", False))
    if use_server and not values.get("reward_server") and "reward_model" not in values:
        raise ConfigError("config key 'use_rm_server' is set but 'reward_server' (the server's URL) is missing")
    if not use_server and "reward_server" in values:
        echo(f"lampo: PaddleNLP key 'reward_server' = {values.pop('reward_server')!r} has no effect here: "
             "use_rm_server is not set")
    if reward_path:
        out["value_model_name_or_path"] = values.pop("value_model_name_or_path", reward_path)
        if not use_server and "reward_model" not in values:
            out["reward_model"] = HF_CLASSIFIER
            out["reward_model_config"] = {**(values.pop("reward_model_config", None) or {}),
                                          "hf_reward_model": reward_path}

    # training minibatch = per_device_train_batch_size x gradient_accumulation_steps (PaddleNLP's micro-batches)
    per_device = values.pop("per_device_train_batch_size", None)
    if per_device is not None and "mini_batch_size" not in values:
        out["mini_batch_size"] = int(per_device) * int(values.get("gradient_accumulation_steps", 1))

    # when to evaluate and save
    strategy = values.pop("evaluation_strategy", None) or values.pop("eval_strategy", None)
    values.pop("eval_strategy", None)
    do_eval = values.pop("do_eval", None)
    if strategy == "no" or (do_eval is not None and not do_eval):
        out["eval_steps"] = 0
        values.pop("eval_steps", None)
    elif strategy not in (None, "steps"):
        raise ConfigError(f"config key 'evaluation_strategy' = {strategy!r}: Lampo evaluates every eval_steps "
                          "steps ('steps') or never ('no')")
    save = values.pop("save_strategy", None)
    if save == "no":
        out["save_step"] = 0
        values.pop("save_steps", None)
        values.pop("save_step", None)
    elif save not in (None, "steps"):
        raise ConfigError(f"config key 'save_strategy' = {save!r}: Lampo saves every save_steps steps ('steps') "
                          "or only at the end ('no')")

    for key, value in values.items():
        if key in FILE_NAMES:
            target, convert = FILE_NAMES[key]
            if target in out or target in values or any(_lampo_key(k) == target for k in values if k != key):
                raise ConfigError(f"config keys '{key}' and another key both set '{target}'; keep one")
            out[target] = convert(value) if convert else value
        elif key in _FIELD_TYPES or key in ALIASES:
            out[key] = value
        else:
            _raise_unknown(key, value)
    return {k: _paddle_bool(k, v) for k, v in out.items()}, limits


def check_lengths(cfg: LampoConfig, limits: dict[str, Any]) -> None:
    """PaddleNLP's rule: max_prompt_len + max_dec_len must fit in max_seq_len (and in max_length)."""
    total = cfg.data.max_prompt_len + cfg.generation.max_new_tokens
    for key, limit in limits.items():
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ConfigError(f"config key '{key}' = {limit!r} is invalid: must be a positive int")
        if total > limit:
            raise ConfigError(
                f"config key '{key}' = {limit} is invalid: max_prompt_len ({cfg.data.max_prompt_len}) + "
                f"max_dec_len ({cfg.generation.max_new_tokens}) = {total} do not fit in it; lower them or raise {key}")


def _lampo_key(key: str) -> str:
    if key in ALIASES:
        return ALIASES[key].key
    if key in FILE_NAMES:
        return FILE_NAMES[key][0]
    return key


def _paddle_bool(key: str, value: Any) -> Any:
    """PaddleNLP writes booleans as 0 and 1; Lampo's boolean keys take them as false and true."""
    tp = _FIELD_TYPES.get(_lampo_key(key))
    if tp is bool and isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
        return bool(value)
    return value


def _raise_unknown(key: str, value: Any) -> None:
    known = {**{k: k for k in _FIELD_TYPES}, **{k: a.key for k, a in ALIASES.items()},
             **{k: t for k, (t, _) in FILE_NAMES.items()}, **{k: k for k in NO_MEANING}}
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.5)
    if close and known[close[0]] != close[0]:
        hint = f"; did you mean '{close[0]}' (Lampo's '{known[close[0]]}')?"
    elif close:
        hint = f"; did you mean '{close[0]}'?"
    else:
        hint = "; see docs/compat.md for the PaddleNLP keys Lampo reads"
    raise ConfigError(f"unknown key '{key}' (value {value!r}) in a PaddleNLP argument file{hint}")

"""Load a prompt dataset from the hub, a `save_to_disk` directory, a folder of files or one file."""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from pathlib import Path
from typing import Any

from lampo.data.formats import DataFormatError, PromptRow, parse_rows

log = logging.getLogger(__name__)

FILE_TYPES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def load_prompt_dataset(data_cfg: Any, seed: int = 0) -> dict[str, list[PromptRow]]:
    """The `train` and `test` splits of `data_cfg.query_dataset` as `PromptRow`s.

    Splits are read by the names `dataset_train_split` and `dataset_test_split`; without a test
    split, `test_split_ratio` of the train rows (chosen with `seed`) become the test split.
    PaddleNLP task files (`train_task_config`, `eval_task_config`) replace the split they name.
    """
    train_task = getattr(data_cfg, "train_task_config", None)
    eval_task = getattr(data_cfg, "eval_task_config", None)
    if train_task or eval_task:
        return _load_task_splits(data_cfg, seed, train_task, eval_task)
    source = data_cfg.query_dataset
    splits = load_splits(source)
    train_name, test_name = data_cfg.dataset_train_split, data_cfg.dataset_test_split
    if train_name not in splits:
        raise DataFormatError(
            f"query_dataset '{source}' has no split '{train_name}' (found {sorted(splits)}); "
            "set dataset_train_split to one of them"
        )
    train_records, columns = splits[train_name]
    if test_name in splits:
        test_records, test_columns = splits[test_name]
    else:
        train_records, test_records = carve_test_split(train_records, data_cfg.test_split_ratio, seed)
        test_columns = columns
        log.info("query_dataset '%s' has no split '%s': carved %d of %d rows with seed %d",
                 source, test_name, len(test_records), len(train_records) + len(test_records), seed)
    train = parse_rows(train_records, columns, split=train_name)
    test = parse_rows(test_records, test_columns, split=test_name)
    if not train:
        raise DataFormatError(f"query_dataset '{source}': split '{train_name}' has no rows")
    return {"train": train, "test": test}


def _load_task_splits(data_cfg: Any, seed: int, train_task: str | None, eval_task: str | None):
    """The splits when PaddleNLP task files name the data (lampo.data.task_config): the train split
    from `train_task_config` (else query_dataset's), the test split from `eval_task_config` (else
    query_dataset's, or carved from the task rows as for a dataset without one)."""
    from lampo.data.task_config import load_task_rows

    if train_task:
        train = load_task_rows(train_task, "train_task_config", "train")
        if not eval_task:
            train, test = carve_test_split(train, data_cfg.test_split_ratio, seed)
    else:
        # the test split comes from eval_task_config: none is carved from query_dataset's rows
        base = load_prompt_dataset(dataclasses.replace(data_cfg, eval_task_config=None, test_split_ratio=0.0), seed)
        train = base["train"]
    if eval_task:
        test = load_task_rows(eval_task, "eval_task_config", "test")
    return {"train": train, "test": test}


def carve_test_split(records: list[dict], ratio: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Split off ceil(ratio * n) rows (at least 1 when n >= 2 and ratio > 0) as the test split."""
    n = len(records)
    k = min(n - 1, max(1, math.ceil(ratio * n))) if ratio > 0 and n >= 2 else 0
    order = list(range(n))
    random.Random(seed).shuffle(order)
    test_ids = set(order[:k])
    train = [r for i, r in enumerate(records) if i not in test_ids]
    test = [r for i, r in enumerate(records) if i in test_ids]
    return train, test


def load_splits(source: str) -> dict[str, tuple[list[dict], list[str]]]:
    """split name -> (records, column names), whatever the source."""
    import datasets

    path = Path(source)
    if path.is_file():
        builder = FILE_TYPES.get(_suffix(path))
        if builder is None:
            raise DataFormatError(f"query_dataset '{source}': unsupported file type; use {sorted(FILE_TYPES)}")
        ds = datasets.load_dataset(builder, data_files={"train": str(path)})
    elif path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.Dataset):
            ds = datasets.DatasetDict({"train": ds})
    elif path.is_dir():
        ds = _load_file_dir(path)
    elif path.exists() or source.startswith(("/", ".")) or source.count("/") > 1 or source.endswith(tuple(FILE_TYPES)):
        # Hub ids are `name` or `owner/name`; anything else is a local path that is not there.
        raise DataFormatError(
            f"query_dataset '{source}' does not exist (or is not a file or directory); relative paths are "
            f"resolved from the current directory {Path.cwd()}"
        )
    else:
        ds = datasets.load_dataset(source)  # a hub id
    return {name: (split.to_list(), list(split.column_names)) for name, split in ds.items()}


def _load_file_dir(path: Path):
    """A folder of data files named by split (`train.jsonl`, `test-00000.parquet`, `data/train.csv` ...)."""
    import datasets

    files = sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p) in FILE_TYPES)
    if not files:
        raise DataFormatError(f"query_dataset '{path}' contains no {sorted(FILE_TYPES)} files and no saved dataset")
    kinds = {FILE_TYPES[_suffix(p)] for p in files}
    if len(kinds) > 1:
        raise DataFormatError(f"query_dataset '{path}' mixes file types {sorted(kinds)}; keep one type per dataset")
    by_split: dict[str, list[str]] = {}
    for p in files:
        name = p.name.split(".")[0].split("-")[0].split("_")[0]
        by_split.setdefault(name, []).append(str(p))
    if len(by_split) == 1 and "train" not in by_split:  # unnamed files are all training data
        by_split = {"train": [f for fs in by_split.values() for f in fs]}
    return datasets.load_dataset(kinds.pop(), data_files=by_split)


def _suffix(path: Path) -> str:
    return path.suffix.lower()

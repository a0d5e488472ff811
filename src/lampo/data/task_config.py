"""PaddleNLP task files (`train_task_config`, `eval_task_config`): data files named in a JSON file.

PaddleNLP's PPO argument files name their data through task files (`config/task_ppo.json`)
instead of naming a dataset. Lampo reads such a file as a list of tasks, each naming one data
file (any `query_dataset` source: a jsonl/json/csv/parquet file, a folder, a saved dataset) and
optionally its mixing weight:

    [{"task_name": "kk-train", "filepath": "ppo-kk/34567ppl/train.jsonl", "prob": 1.0},
     {"task_name": "more", "filepath": "data/more.jsonl", "prob": 0.5}]

A single task object, or an object holding the list under "tasks", is read the same way. The
file is named by any of FILE_KEYS, the weight by any of WEIGHT_KEYS (default 1). A relative
path is looked up from the current directory, then from the task file's folder. Rows of every
file are concatenated; unequal weights repeat the rows of each file so that its share of the
split is its weight's share (every row appears at least once). Rows are in the PaddleNLP
`src`/`tgt` format or any other format Lampo reads (lampo.data.formats).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from lampo.data.formats import DataFormatError, PromptRow, parse_rows

FILE_KEYS = ("filepath", "file", "path", "data_file", "data_path", "train_file", "filename")
WEIGHT_KEYS = ("prob", "probability", "weight", "sample_rate", "ratio")


def read_task_file(path: str | Path, key: str) -> list[tuple[Path, float]]:
    """(data file, weight) of each task in the task file `path`; errors name the config `key`."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"config key '{key}' = '{path}': no such file (relative to {Path.cwd()})")
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise DataFormatError(f"config key '{key}': task file '{path}' is not valid JSON: {exc}") from exc
    if isinstance(loaded, dict):
        loaded = loaded["tasks"] if isinstance(loaded.get("tasks"), list) else [loaded]
    if not isinstance(loaded, list) or not loaded:
        raise DataFormatError(f"config key '{key}': task file '{path}' must hold a non-empty list of tasks")
    tasks = []
    for i, task in enumerate(loaded):
        where = f"config key '{key}': task {i} of '{path}'"
        if not isinstance(task, dict):
            raise DataFormatError(f"{where} must be an object naming a data file, found {task!r:.80}")
        files = [task[k] for k in FILE_KEYS if k in task]
        if len(files) != 1 or not isinstance(files[0], str):
            raise DataFormatError(f"{where} must name its data file with one of {', '.join(FILE_KEYS)}; "
                                  f"found keys {sorted(task)}")
        weights = [task[k] for k in WEIGHT_KEYS if k in task]
        weight = weights[0] if weights else 1.0
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise DataFormatError(f"{where}: the weight must be a number > 0, found {weight!r}")
        tasks.append((_locate(files[0], path.parent, where), float(weight)))
    return tasks


def load_task_rows(path: str | Path, key: str, split: str) -> list[PromptRow]:
    """The rows of every data file the task file names, mixed by weight, indexed 0..n-1."""
    from lampo.data.loading import load_splits

    parts: list[tuple[list[PromptRow], float]] = []
    for file, weight in read_task_file(path, key):
        splits = load_splits(str(file))
        name = split if split in splits else "train" if "train" in splits else next(iter(splits))
        records, columns = splits[name]
        rows = parse_rows(records, columns, split=f"{file.name}:{name}")
        if not rows:
            raise DataFormatError(f"config key '{key}': data file '{file}' has no rows")
        parts.append((rows, weight))
    return [dataclasses.replace(row, index=i) for i, row in enumerate(mix(parts))]


def mix(parts: list[tuple[list[Any], float]]) -> list[Any]:
    """The items of every part, in order, each part's repeated to its share (`mixture_counts`)."""
    return [item for (items, _), count in zip(parts, mixture_counts(parts), strict=True)
            for item in (items * math.ceil(count / len(items)))[:count]]


def mixture_counts(parts: list[tuple[list[Any], float]]) -> list[int]:
    """Rows taken from each part so that part i's share is weight_i / sum(weights), no part losing rows.

    Equal weights keep every part as it is (the files are simply concatenated).
    """
    weights = [w for _, w in parts]
    if len(set(weights)) <= 1:
        return [len(rows) for rows, _ in parts]
    total = sum(weights)
    # the smallest split size in which every part keeps all its rows
    size = max(len(rows) / (w / total) for rows, w in parts)
    return [max(len(rows), round(size * w / total)) for rows, w in parts]


def _locate(name: str, folder: Path, where: str) -> Path:
    for candidate in (Path(name), folder / name):
        if candidate.exists():
            return candidate
    raise DataFormatError(f"{where}: data file '{name}' not found in {Path.cwd()} nor in {folder}")

"""Load a prompt dataset from the hub, a `save_to_disk` directory, a folder of files or one file.

Every row keeps where it came from (`origin`: a file and its 1-based line, or a split and its
1-based row), so that an error about a row names the line to fix, whichever split it ended up in.
JSON and JSON-lines files are read here rather than by the datasets library, whose errors name
neither the file nor the line.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lampo.data.formats import DataFormatError, PromptRow, parse_rows

log = logging.getLogger(__name__)

FILE_TYPES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class Records:
    """One split as read: its rows as dicts, its column names, and where each row came from."""

    rows: list[dict]
    columns: list[str]
    origins: list[str]
    """Per row: `<file>, line <n>` (JSON lines, JSON arrays, CSV) or `<source>, split '<name>', row <n>`."""
    where: str
    """The file(s) or source the split was read from, for messages about the split as a whole."""

    def select(self, indices: list[int]) -> Records:
        return Records([self.rows[i] for i in indices], self.columns, [self.origins[i] for i in indices], self.where)


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
    splits = load_split_records(source)
    train_name, test_name = data_cfg.dataset_train_split, data_cfg.dataset_test_split
    if train_name not in splits:
        raise DataFormatError(
            f"query_dataset '{source}' has no split '{train_name}' (found {sorted(splits)}); "
            "set dataset_train_split to one of them"
        )
    for name in (train_name, test_name):
        if name in splits and not splits[name].rows:
            raise DataFormatError(
                f"query_dataset '{source}': split '{name}' ({splits[name].where}) has no rows; fill it or remove it"
            )
    train_records = splits[train_name]
    if test_name in splits:
        test_records = splits[test_name]
    else:
        train_ids, test_ids = carve_test_indices(len(train_records.rows), data_cfg.test_split_ratio, seed)
        train_records, test_records = train_records.select(train_ids), train_records.select(test_ids)
        log.info("query_dataset '%s' has no split '%s': carved %d of %d rows with seed %d",
                 source, test_name, len(test_ids), len(train_ids) + len(test_ids), seed)
    train = parse_rows(train_records.rows, train_records.columns, split=train_name, origins=train_records.origins)
    test = parse_rows(test_records.rows, test_records.columns, split=test_name, origins=test_records.origins)
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


def carve_test_indices(n: int, ratio: float, seed: int) -> tuple[list[int], list[int]]:
    """Positions of the train and test rows when ceil(ratio * n) rows (at least 1 when n >= 2 and
    ratio > 0) of n are split off as the test split, chosen with `seed`; each list in order."""
    k = min(n - 1, max(1, math.ceil(ratio * n))) if ratio > 0 and n >= 2 else 0
    order = list(range(n))
    random.Random(seed).shuffle(order)
    test_ids = set(order[:k])
    return [i for i in range(n) if i not in test_ids], [i for i in range(n) if i in test_ids]


def carve_test_split(records: list[dict], ratio: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Split off ceil(ratio * n) rows (at least 1 when n >= 2 and ratio > 0) as the test split."""
    train_ids, test_ids = carve_test_indices(len(records), ratio, seed)
    return [records[i] for i in train_ids], [records[i] for i in test_ids]


def load_splits(source: str) -> dict[str, tuple[list[dict], list[str]]]:
    """split name -> (records, column names), whatever the source."""
    return {name: (split.rows, split.columns) for name, split in load_split_records(source).items()}


def load_split_records(source: str) -> dict[str, Records]:
    """split name -> its `Records`, whatever the source. JSON files are read here; the datasets
    library is imported only for what needs it (saved datasets, hub ids, CSV and parquet), so a
    machine without it (a bare GPU image) still trains on JSON data."""
    path = Path(source)
    if path.is_file():
        builder = FILE_TYPES.get(_suffix(path))
        if builder is None:
            raise DataFormatError(f"query_dataset '{source}': unsupported file type; use {sorted(FILE_TYPES)}")
        return {"train": _read_files([path])}
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.Dataset):
            ds = datasets.DatasetDict({"train": ds})
    elif path.is_dir():
        return _load_file_dir(path)
    elif path.exists() or source.startswith(("/", ".")) or source.count("/") > 1 or source.endswith(tuple(FILE_TYPES)):
        # Hub ids are `name` or `owner/name`; anything else is a local path that is not there.
        raise DataFormatError(
            f"query_dataset '{source}' does not exist (or is not a file or directory); relative paths are "
            f"resolved from the current directory {Path.cwd()}"
        )
    else:
        import datasets

        ds = datasets.load_dataset(source)  # a hub id
    return {name: Records(split.to_list(), list(split.column_names),
                          [f"{source}, split '{name}', row {i + 1}" for i in range(len(split))], f"{source}")
            for name, split in ds.items()}


def _load_file_dir(path: Path) -> dict[str, Records]:
    """A folder of data files named by split (`train.jsonl`, `test-00000.parquet`, `data/train.csv` ...)."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p) in FILE_TYPES)
    if not files:
        raise DataFormatError(f"query_dataset '{path}' contains no {sorted(FILE_TYPES)} files and no saved dataset")
    kinds = {FILE_TYPES[_suffix(p)] for p in files}
    if len(kinds) > 1:
        raise DataFormatError(f"query_dataset '{path}' mixes file types {sorted(kinds)}; keep one type per dataset")
    by_split: dict[str, list[Path]] = {}
    for p in files:
        name = p.name.split(".")[0].split("-")[0].split("_")[0]
        by_split.setdefault(name, []).append(p)
    if len(by_split) == 1 and "train" not in by_split:  # unnamed files are all training data
        by_split = {"train": [f for fs in by_split.values() for f in fs]}
    return {name: _read_files(paths) for name, paths in by_split.items()}


def _read_files(paths: list[Path]) -> Records:
    """The rows of one split's files, in order, each with its file and line (or row)."""
    rows: list[dict] = []
    origins: list[str] = []
    columns: dict[str, None] = {}
    for path in paths:
        kind = FILE_TYPES[_suffix(path)]
        if kind == "json":
            file_rows, lines = _read_json(path)
            file_origins = [f"{path}, line {n}" for n in lines]
            file_columns = [key for row in file_rows for key in row]
        else:
            file_rows, file_columns = _read_with_datasets(path, kind)
            lines = _csv_row_lines(path) if kind == "csv" else None
            if lines is None or len(lines) != len(file_rows):
                file_origins = [f"{path}, row {i + 1}" for i in range(len(file_rows))]
            else:
                file_origins = [f"{path}, line {n}" for n in lines]
        rows += file_rows
        origins += file_origins
        columns.update(dict.fromkeys(file_columns))
    return Records(rows, list(columns), origins, ", ".join(str(p) for p in paths))


def _read_json(path: Path) -> tuple[list[dict], list[int]]:
    """Rows of a JSON-lines file (or a .json file holding one JSON array of objects) and the
    1-based line each starts on; a line that is not a JSON object is an error naming it."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise DataFormatError(f"{path}, line {line}: not UTF-8 text ({exc.reason}); save the file as UTF-8") from None
    if _suffix(path) == ".json" and text.lstrip().startswith("["):
        return _read_json_array(path, text)
    rows, lines = [], []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataFormatError(
                f"{path}, line {n}: not valid JSON ({exc.msg} at column {exc.colno}); each line of a JSON-lines "
                "file holds one JSON object"
            ) from None
        rows.append(_object(row, path, n))
        lines.append(n)
    return rows, lines


def _read_json_array(path: Path, text: str) -> tuple[list[dict], list[int]]:
    decoder = json.JSONDecoder()
    rows, lines = [], []
    pos = text.index("[") + 1

    def skip(p: int) -> int:
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    def fail(p: int, what: str) -> DataFormatError:
        return DataFormatError(f"{path}, line {text.count(chr(10), 0, p) + 1}: not valid JSON ({what})")

    pos = skip(pos)
    if pos < len(text) and text[pos] == "]":
        pos += 1
    else:
        while True:
            try:
                row, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                raise fail(exc.pos, f"{exc.msg} at column {exc.colno}") from None
            line = text.count("\n", 0, pos) + 1
            rows.append(_object(row, path, line))
            lines.append(line)
            pos = skip(end)
            if pos < len(text) and text[pos] == ",":
                pos = skip(pos + 1)
                continue
            if pos < len(text) and text[pos] == "]":
                pos += 1
                break
            raise fail(pos, "expected ',' or ']' after an element of the array")
    if skip(pos) != len(text):
        raise fail(skip(pos), "text after the closing ']'")
    return rows, lines


def _object(row: Any, path: Path, line: int) -> dict:
    if not isinstance(row, dict):
        raise DataFormatError(f"{path}, line {line}: expected a JSON object of columns, found {type(row).__name__} "
                              f"{row!r:.80}")
    return row


def _read_with_datasets(path: Path, kind: str) -> tuple[list[dict], list[str]]:
    """A CSV or parquet file through the datasets library (its type inference); errors name the file."""
    import datasets

    if path.stat().st_size == 0:
        return [], []
    try:
        ds = datasets.load_dataset(kind, data_files={"train": str(path)})["train"]
    except Exception as exc:  # the library wraps the parser's error: report the innermost one
        cause: BaseException = exc
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        raise DataFormatError(f"{path}: cannot be read as {kind}: {type(cause).__name__}: {cause}") from exc
    return ds.to_list(), list(ds.column_names)


def _csv_row_lines(path: Path) -> list[int] | None:
    """The 1-based line each CSV row starts on (a quoted cell may span lines); blank lines are
    skipped, as pandas skips them. None when the file cannot be read this way."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            if next(reader, None) is None:  # the header
                return []
            lines = []
            while True:
                start = reader.line_num + 1
                row = next(reader, None)
                if row is None:
                    return lines
                if row:
                    lines.append(start)
    except (OSError, UnicodeDecodeError, csv.Error):
        return None


def _suffix(path: Path) -> str:
    return path.suffix.lower()

"""Dataset sources: one file of each type, a folder of split files, save_to_disk, a hub id (offline)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from lampo.config import DataConfig
from lampo.data import DataFormatError, carve_test_split, load_prompt_dataset

ROOT = Path(__file__).resolve().parents[2]
ROWS = [{"text": f"question {i}", "text1": f"follow-up {i}", "text2": "" if i % 3 else f"last {i}"} for i in range(10)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_shipped_example_dataset_has_both_splits_and_three_steps():
    splits = load_prompt_dataset(DataConfig(query_dataset=str(ROOT / "examples/data/multistep")), seed=0)
    assert len(splits["train"]) == 40 and len(splits["test"]) == 8
    assert max(len(r.steps) for r in splits["train"]) == 3
    assert any(len(r.steps) == 2 for r in splits["train"])  # a row that ends early
    assert [r.index for r in splits["test"]] == list(range(8))


@pytest.mark.parametrize("name", ["multistep_chatml", "paddlenlp", "messages"])
def test_shipped_format_examples_load(name):
    splits = load_prompt_dataset(DataConfig(query_dataset=str(ROOT / "examples/data" / name)), seed=0)
    assert splits["train"] and splits["test"]
    formats = {"multistep_chatml": "multistep", "paddlenlp": "paddlenlp", "messages": "messages"}
    assert {r.format for r in splits["train"]} == {formats[name]}


def test_single_jsonl_file_carves_a_test_split_with_the_seed(tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", ROWS)
    cfg = DataConfig(query_dataset=str(path), test_split_ratio=0.2)
    a, b = load_prompt_dataset(cfg, seed=1), load_prompt_dataset(cfg, seed=1)
    assert len(a["train"]) == 8 and len(a["test"]) == 2  # ceil(0.2 * 10)
    assert [r.steps for r in a["test"]] == [r.steps for r in b["test"]]
    c = load_prompt_dataset(cfg, seed=2)
    all_steps = sorted(r.steps for r in c["train"] + c["test"])
    assert all_steps == sorted(r.steps for r in a["train"] + a["test"])  # a partition of the same rows


def test_json_data_loads_without_the_datasets_library(tmp_path, monkeypatch):
    """A bare image (the GPU check's) may lack `datasets`: JSON files, alone or in a folder, need none."""
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    with pytest.raises(ImportError):
        import datasets  # noqa: F401
    one = load_prompt_dataset(DataConfig(query_dataset=str(write_jsonl(tmp_path / "prompts.jsonl", ROWS))), seed=0)
    write_jsonl(tmp_path / "folder" / "train.jsonl", ROWS[:6])
    write_jsonl(tmp_path / "folder" / "test.jsonl", ROWS[6:])
    folder = load_prompt_dataset(DataConfig(query_dataset=str(tmp_path / "folder")), seed=0)
    assert len(one["train"]) + len(one["test"]) == 10
    assert [r.steps[0] for r in folder["test"]] == [f"question {i}" for i in range(6, 10)]


def test_carve_test_split_keeps_at_least_one_row_each():
    train, test = carve_test_split([{"i": i} for i in range(3)], 0.01, seed=0)
    assert len(train) == 2 and len(test) == 1
    train, test = carve_test_split([{"i": 0}], 0.5, seed=0)
    assert len(train) == 1 and test == []


def test_csv_and_parquet_files(tmp_path):
    import pandas as pd

    df = pd.DataFrame(ROWS)
    df.to_csv(tmp_path / "p.csv", index=False)
    df.to_parquet(tmp_path / "p.parquet")
    for name in ("p.csv", "p.parquet"):
        splits = load_prompt_dataset(DataConfig(query_dataset=str(tmp_path / name), test_split_ratio=0.5), seed=0)
        rows = splits["train"] + splits["test"]
        assert len(rows) == 10
        assert sorted(len(r.steps) for r in rows) == sorted(3 if i % 3 == 0 else 2 for i in range(10))


def test_folder_of_split_files(tmp_path):
    write_jsonl(tmp_path / "d" / "train.jsonl", ROWS[:7])
    write_jsonl(tmp_path / "d" / "test.jsonl", ROWS[7:])
    splits = load_prompt_dataset(DataConfig(query_dataset=str(tmp_path / "d")), seed=0)
    assert [r.steps[0] for r in splits["test"]] == ["question 7", "question 8", "question 9"]


def test_save_to_disk_directory(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:6]), "test": datasets.Dataset.from_list(ROWS[6:])})
    dd.save_to_disk(str(tmp_path / "saved"))
    splits = load_prompt_dataset(DataConfig(query_dataset=str(tmp_path / "saved")), seed=0)
    assert len(splits["train"]) == 6 and len(splits["test"]) == 4


def test_hub_id_goes_through_datasets_load_dataset(monkeypatch):
    import datasets

    seen = []

    def fake_load_dataset(name, *args, **kwargs):
        seen.append(name)
        return datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    splits = load_prompt_dataset(DataConfig(query_dataset="someone/example_multistep_ppo"), seed=0)
    assert seen == ["someone/example_multistep_ppo"]
    assert len(splits["train"]) + len(splits["test"]) == 10


def test_errors_name_the_source_and_the_split(tmp_path):
    with pytest.raises(DataFormatError, match="does not exist"):
        load_prompt_dataset(DataConfig(query_dataset=str(tmp_path / "missing.jsonl")), seed=0)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataFormatError, match="unsupported file type"):
        load_prompt_dataset(DataConfig(query_dataset=str(tmp_path / "x.txt")), seed=0)
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    with pytest.raises(DataFormatError, match=r"no split 'training' \(found \['train'\]\)"):
        load_prompt_dataset(DataConfig(query_dataset=str(path), dataset_train_split="training"), seed=0)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a", "text1": ""}, {"text": "b", "text1": "", "text2": "c"}])
    with pytest.raises(DataFormatError, match=r"bad.jsonl, line 2 \(train split\), column 'text2': filled after the "
                                              r"empty cell 'text1'"):
        load_prompt_dataset(DataConfig(query_dataset=str(bad), test_split_ratio=0.0), seed=0)


def test_a_missing_relative_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataFormatError, match="'examples/data/multistep' does not exist.*current directory"):
        load_prompt_dataset(DataConfig(query_dataset="examples/data/multistep"), seed=0)


def test_an_empty_file_or_split_is_an_error_naming_the_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataFormatError, match=r"split 'train' \(.*empty.jsonl\) has no rows"):
        load_prompt_dataset(DataConfig(query_dataset=str(tmp_path / "empty.jsonl")), seed=0)
    write_jsonl(tmp_path / "d" / "train.jsonl", ROWS)
    (tmp_path / "d" / "test.jsonl").write_text("\n\n")
    with pytest.raises(DataFormatError, match=r"split 'test' \(.*d/test.jsonl\) has no rows"):
        load_prompt_dataset(DataConfig(query_dataset=str(tmp_path / "d")), seed=0)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataFormatError, match=r"split 'train' \(.*empty.csv\) has no rows"):
        load_prompt_dataset(DataConfig(query_dataset=str(tmp_path / "empty.csv")), seed=0)


def test_a_line_that_is_not_json_is_an_error_naming_the_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"\n{"text": "c"}\n')
    with pytest.raises(DataFormatError, match=r"p.jsonl, line 3: not valid JSON \(Expecting ',' delimiter at column "
                                              r"13\)"):
        load_prompt_dataset(DataConfig(query_dataset=str(path)), seed=0)
    path.write_text('{"text": "a"}\n["text", "b"]\n')
    with pytest.raises(DataFormatError, match=r"p.jsonl, line 2: expected a JSON object of columns, found list"):
        load_prompt_dataset(DataConfig(query_dataset=str(path)), seed=0)
    array = tmp_path / "p.json"  # a JSON array of objects: its elements' lines
    array.write_text('[\n  {"text": "a"},\n  {"text": "b",\n   "text1": 3}\n]\n')
    with pytest.raises(DataFormatError, match=r"p.json, line 3 \(train split\), column 'text1': expected a string"):
        load_prompt_dataset(DataConfig(query_dataset=str(array), test_split_ratio=0.0), seed=0)
    array.write_text('[{"text": "a"},\n {"text": "b"} {"text": "c"}]')
    with pytest.raises(DataFormatError, match=r"p.json, line 2: not valid JSON \(expected ',' or ']'"):
        load_prompt_dataset(DataConfig(query_dataset=str(array)), seed=0)


def test_errors_name_the_file_line_even_after_the_test_split_is_carved_off(tmp_path):
    rows = [{"text": f"q{i}", "text1": f"f{i}"} for i in range(40)]
    rows[31] = {"text": "q31", "text1": "", "text2": "late"}  # file line 32
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    for ratio in (0.0, 0.2, 0.5):  # whichever split line 32 lands in, and at whatever row
        with pytest.raises(DataFormatError, match=r"p.jsonl, line 32 \((train|test) split\), column 'text2'"):
            load_prompt_dataset(DataConfig(query_dataset=str(path), test_split_ratio=ratio), seed=0)
    # rows keep their origin: a CSV's lines count the header and a quoted cell over two lines
    (tmp_path / "p.csv").write_text('text,text1\n"two\nlines",x\n\nthird,y\n')
    train = load_prompt_dataset(DataConfig(query_dataset=str(tmp_path / "p.csv"), test_split_ratio=0.0), seed=0)["train"]
    assert [r.origin for r in train] == [f"{tmp_path}/p.csv, line 2", f"{tmp_path}/p.csv, line 5"]

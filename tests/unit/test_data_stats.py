"""Dataset token lengths (lampo.data.stats): counts, quantiles, cuts, the start-of-run logging, the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from lampo.data.formats import PromptRow
from lampo.data.stats import PLOT_FILE, TokenLengths, log_dataset_lengths, main, quantiles, token_lengths

pytestmark = pytest.mark.slow  # builds the tiny model's tokenizer

DATA = str(Path(__file__).resolve().parents[2] / "examples" / "data" / "multistep")


@pytest.fixture(scope="module")
def tok(tiny_model_path):
    return AutoTokenizer.from_pretrained(tiny_model_path)


def test_quantiles_by_hand():
    # nearest rank over 1..10: p50 is the 5th value, p90 the 9th, p99 the 10th
    assert quantiles(list(range(10, 0, -1))) == {"min": 1, "p50": 5, "p90": 9, "p99": 10, "max": 10, "mean": 5.5}
    assert quantiles([]) == {}


def test_lengths_count_what_the_rollout_feeds_the_engine(tok):
    # templated cells are used verbatim, so each length is the tokenizer's count of the cell itself
    first = "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n"
    later = "<|im_start|>user\nAnd then?<|im_end|>\n<|im_start|>assistant\n"
    rows = [PromptRow(0, (first, later, later)), PromptRow(1, (first,))]
    n_first = len(tok(first, add_special_tokens=False).input_ids)
    # a later segment follows the separator the template writes after <|im_end|> ("\n" in ChatML); the
    # templated cell starts after it
    n_later = len(tok("\n" + later.removeprefix("\n"), add_special_tokens=False).input_ids)
    lengths = token_lengths(rows, tok)
    assert lengths.prompt == [n_first, n_first]
    assert lengths.turn == [n_later, n_later]
    assert lengths.conversation == [n_first + 2 * n_later, n_first]


def test_cut_counts():
    lengths = TokenLengths(prompt=[10, 30, 12, 8], turn=[], conversation=[40, 30, 12, 25])
    # max 20: one prompt is longer (30); two more fit at step 0 but not with their later turns (40, 25)
    assert lengths.cut_counts(20) == (1, 2)
    assert lengths.cut_counts(100) == (0, 0)


def test_start_of_run_histograms_png_and_line(tok, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lampo.config import LampoConfig
    from lampo.data.loading import load_prompt_dataset
    from lampo.tracking import Tracker

    cfg = LampoConfig(output_dir=str(tmp_path), progress=False, max_prompt_len=40, query_dataset=DATA)
    rows = load_prompt_dataset(cfg.data)["train"]
    printed = []
    with Tracker(cfg, cfg.to_dict(), total_steps=1) as tracker:
        tracker.print = printed.append
        lengths = log_dataset_lengths(tracker, rows, tok, cfg.data, tmp_path)
    assert (tmp_path / PLOT_FILE).stat().st_size > 1000
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"histograms": 0})
    events.Reload()
    assert {"data/prompt_tokens", "data/turn_tokens"} <= set(events.Tags()["histograms"])
    (prompt_hist,) = events.Histograms("data/prompt_tokens")
    assert prompt_hist.histogram_value.num == len(rows) and prompt_hist.histogram_value.max == max(lengths.prompt)
    at_start, later = lengths.cut_counts(40)
    assert f"cuts {at_start} at step 0 and ends {later} early" in printed[0]


def test_data_stats_command(tiny_model_path, tok, capsys):
    from lampo.config import DataConfig
    from lampo.data.loading import load_prompt_dataset

    assert main([DATA, "--tokenizer", str(tiny_model_path), "--max-prompt-len", "40"]) == 0
    out = capsys.readouterr().out
    rows = load_prompt_dataset(DataConfig(query_dataset=DATA, test_split_ratio=0.0))["train"]
    lengths = token_lengths(rows, tok)
    at_start, later = lengths.cut_counts(40)
    assert f"{len(rows)} rows" in out
    assert f"{at_start} of {len(rows)} rows have a longer step-0 prompt" in out and f"{later} more would end early" in out
    q = quantiles(lengths.prompt)
    assert any(line.split()[:3] == ["prompt", str(len(rows)), f"{q['min']:.0f}"] for line in out.splitlines())

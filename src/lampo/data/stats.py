"""Token lengths of a prompt dataset: at the start of a run, and `lampo data-stats`.

open-instruct tracks its dataset's token-length distribution next to the training curves; Lampo
does the same. Lengths are counted as the rollout builds prompts (lampo.rollout.chat: the chat
template applied to plain cells, templated cells verbatim, history and system prompt included):
- prompt: step 0's prompt, the quantity `max_prompt_len` bounds first;
- turn: the tokens each later step adds from the dataset (its user segment, templated), one value
  per later turn (none for single-turn data);
- conversation: the prompt plus every later segment: the dataset's share of the last step's prompt,
  which the generated answers only lengthen.
So a row with prompt > max_prompt_len is cut at step 0 (the `truncation` setting decides how), and
a row with conversation > max_prompt_len ends early at a later step whatever the model answers.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PLOT_FILE = "token_lengths.png"
"""The histograms' PNG in output_dir."""

START_SAMPLE = 5000
"""Rows measured at the start of a run (a seeded sample of larger datasets; `lampo data-stats` reads all)."""


@dataclass
class TokenLengths:
    """Token counts of a dataset's rows (see the module docstring)."""

    prompt: list[int] = field(default_factory=list)
    turn: list[int] = field(default_factory=list)
    conversation: list[int] = field(default_factory=list)

    def cut_counts(self, max_prompt_len: int) -> tuple[int, int]:
        """(rows cut at step 0, further rows that end early at a later step even with empty answers)."""
        at_start = sum(p > max_prompt_len for p in self.prompt)
        later = sum(p <= max_prompt_len < c for p, c in zip(self.prompt, self.conversation, strict=True))
        return at_start, later


def token_lengths(rows: list[Any], tokenizer: Any, system_prompt: str | None = None) -> TokenLengths:
    """The token lengths of `rows` (PromptRows) as the rollout would tokenize them."""
    from lampo.rollout.multistep import chat_format

    fmt = chat_format(tokenizer, system_prompt)
    out = TokenLengths()
    if not rows:
        return out
    prompts = tokenizer([fmt.first_prompt(r) for r in rows], add_special_tokens=False)["input_ids"]
    later = [[fmt.separator + fmt.next_segment(cell) for cell in r.steps[1:]] for r in rows]
    flat = [seg for segs in later for seg in segs]
    seg_lens = [len(ids) for ids in tokenizer(flat, add_special_tokens=False)["input_ids"]] if flat else []
    k = 0
    for ids, segs in zip(prompts, later, strict=True):
        mine = seg_lens[k : k + len(segs)]
        k += len(segs)
        out.prompt.append(len(ids))
        out.turn += mine
        out.conversation.append(len(ids) + sum(mine))
    return out


def quantiles(values: list[int]) -> dict[str, float]:
    """min, p50, p90, p99, max and mean (nearest-rank percentiles)."""
    if not values:
        return {}
    v = sorted(values)

    def pct(q: float) -> float:  # the smallest value with at least q of the values at or below it
        return float(v[max(0, math.ceil(q * len(v)) - 1)])

    return {"min": float(v[0]), "p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "max": float(v[-1]),
            "mean": sum(v) / len(v)}


def report(lengths: TokenLengths, max_prompt_len: int) -> str:
    """The quantile table and what max_prompt_len would cut, as `lampo data-stats` prints them."""
    lines = [f"{'':14}{'values':>8}{'min':>8}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}{'mean':>9}"]
    for name, values in (("prompt", lengths.prompt), ("later turn", lengths.turn),
                         ("conversation", lengths.conversation)):
        q = quantiles(values)
        cells = "".join(f"{q[k]:>8.0f}" for k in ("min", "p50", "p90", "p99", "max")) + f"{q['mean']:>9.1f}" if q else ""
        lines.append(f"{name:14}{len(values):>8}{cells}")
    at_start, later = lengths.cut_counts(max_prompt_len)
    n = len(lengths.prompt)
    lines.append(f"max_prompt_len {max_prompt_len}: {at_start} of {n} rows have a longer step-0 prompt (cut by "
                 f"`truncation`), {later} more would end early at a later step even with empty answers")
    return "\n".join(lines)


def plot(lengths: TokenLengths, path: str | Path, max_prompt_len: int) -> Path:
    """Histograms of prompt and later-turn token lengths, max_prompt_len marked; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and in tests
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for ax, (title, values) in zip(axes, (("step-0 prompt", lengths.prompt), ("later turn (dataset tokens)",
                                                                               lengths.turn)), strict=True):
        if values:
            ax.hist(values, bins=min(50, max(5, len(set(values)))), color="tab:blue", alpha=0.8)
        else:
            ax.text(0.5, 0.5, "none (single-turn rows)", ha="center", va="center", transform=ax.transAxes)
        if title.startswith("step-0"):
            ax.axvline(max_prompt_len, color="tab:red", linestyle="--", label=f"max_prompt_len {max_prompt_len}")
            ax.legend()
        ax.set_title(f"{title}: {len(values)} values")
        ax.set_xlabel("tokens")
        ax.set_ylabel("count")
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def log_dataset_lengths(tracker: Any, rows: list[Any], tokenizer: Any, data_cfg: Any, output_dir: str | Path,
                        seed: int = 0) -> TokenLengths:
    """At the start of a run: histograms to TensorBoard and W&B (`data/prompt_tokens`, `data/turn_tokens`),
    the PNG to output_dir, and one summary line on the console."""
    sample = rows if len(rows) <= START_SAMPLE else random.Random(seed).sample(rows, START_SAMPLE)
    lengths = token_lengths(sample, tokenizer, data_cfg.system_prompt)
    tracker.log_histogram(0, "data/prompt_tokens", lengths.prompt)
    tracker.log_histogram(0, "data/turn_tokens", lengths.turn)
    if tracker.enabled:
        plot(lengths, Path(output_dir) / PLOT_FILE, data_cfg.max_prompt_len)
        q = quantiles(lengths.prompt)
        at_start, later = lengths.cut_counts(data_cfg.max_prompt_len)
        tracker.print(f"data: {len(sample)} of {len(rows)} training rows measured; step-0 prompt tokens p50 "
                      f"{q['p50']:.0f}, p99 {q['p99']:.0f}, max {q['max']:.0f}; max_prompt_len "
                      f"{data_cfg.max_prompt_len} cuts {at_start} at step 0 and ends {later} early "
                      f"({Path(output_dir) / PLOT_FILE})")
    return lengths


def main(argv: list[str] | None = None) -> int:
    """`lampo data-stats DATASET --tokenizer NAME [--max-prompt-len N] [--split train] [--plot PNG]`."""
    from lampo.config import DataConfig

    parser = argparse.ArgumentParser(prog="lampo data-stats", description="Token lengths of a prompt dataset: "
                                     "quantiles, and how many rows max_prompt_len would cut.")
    parser.add_argument("dataset", help="any query_dataset source: a hub id, a folder, a data file")
    parser.add_argument("--tokenizer", required=True, help="tokenizer (hub id or folder) whose chat template applies")
    parser.add_argument("--max-prompt-len", type=int, default=DataConfig.max_prompt_len,
                        help=f"the max_prompt_len to check (default {DataConfig.max_prompt_len})")
    parser.add_argument("--split", choices=["train", "test", "all"], default="train")
    parser.add_argument("--system-prompt", default=None, help="system_prompt, as in the config")
    parser.add_argument("--plot", default=None, help="also draw the histograms into this PNG")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    from lampo.data.loading import load_prompt_dataset

    splits = load_prompt_dataset(DataConfig(query_dataset=args.dataset, test_split_ratio=0.0))
    rows = splits["train"] + splits["test"] if args.split == "all" else splits[args.split]
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    lengths = token_lengths(rows, tokenizer, args.system_prompt)
    print(f"lampo data-stats: {args.dataset}, {args.split} split, {len(rows)} rows, tokenizer {args.tokenizer}")
    print(report(lengths, args.max_prompt_len))
    if args.plot:
        print(f"histograms in {plot(lengths, args.plot, args.max_prompt_len)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`lampo plot RUN_DIR`: training curves from metrics.jsonl into RUN_DIR/training_curves.png."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from lampo.tracking import read_metrics

PLOT_FILE = "training_curves.png"

# (title, [(metric, label)], y label): one panel each. The first metric present in a panel is
# the main curve; eval/ curves are drawn as points at the evaluation steps.
PANELS: tuple[tuple[str, tuple[tuple[str, str], ...], str], ...] = (
    ("Reward", (("objective/scores", "train score"), ("objective/rlhf_reward", "score - β·KL"),
                ("eval/scores", "eval score")), "score"),
    ("KL to reference", (("objective/kl", "KL (sum over response)"),), "nats"),
    ("Entropy", (("objective/entropy", "sequence entropy"), ("policy/entropy_avg", "per-token entropy")),
     "nats"),
    ("Loss", (("loss/policy_avg", "policy"), ("loss/value_avg", "value"), ("objective/loss", "total")), "loss"),
    ("Step time", (("time/training", "step"), ("time/rollout", "rollout"), ("time/reward", "reward"),
                   ("time/optimize", "optimize")), "seconds"),
    ("Response length", (("val/sequence_lengths", "tokens per response"),), "tokens"),
)


def merge_by_step(records: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """One dict per step (train and eval lines of the same step merged; later values win)."""
    merged: dict[int, dict[str, Any]] = {}
    for record in records:
        step = record.get("step")
        if isinstance(step, int):
            merged.setdefault(step, {}).update(record)
    return dict(sorted(merged.items()))


def series(by_step: dict[int, dict[str, Any]], name: str) -> tuple[list[int], list[float]]:
    """Steps and values of one metric (null values, i.e. NaN/inf at logging time, are left out)."""
    xs, ys = [], []
    for step, record in by_step.items():
        value = record.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            xs.append(step)
            ys.append(float(value))
    return xs, ys


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw reward, KL, entropy, loss, step time and response length per step; returns the PNG path."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    by_step = merge_by_step(records)
    if not by_step:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} has no logged steps yet; plot again after the first step")
    out = Path(out) if out is not None else run_dir / PLOT_FILE

    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and in tests
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5), constrained_layout=True)
    for ax, (title, metrics, ylabel) in zip(axes.flat, PANELS, strict=True):
        drawn = 0
        for name, label in metrics:
            xs, ys = series(by_step, name)
            if not xs:
                continue
            if name.startswith("eval/"):
                ax.plot(xs, ys, "o-", markersize=4, label=label)
            else:
                line = ax.plot(xs, ys, label=label, alpha=0.45 if len(xs) >= 20 else 1.0)[0]
                if len(xs) >= 20:
                    # Rollout rewards are noisy: a moving average shows the trend (window ~5% of the run).
                    window = max(3, len(xs) // 20)
                    sx, sy = _moving_average(xs, ys, window)
                    ax.plot(sx, sy, color=line.get_color(), linewidth=2, label=f"{label}, mean of {window}")
            drawn += 1
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
        else:
            names = ", ".join(name for name, _ in metrics)
            ax.text(0.5, 0.5, f"not logged:\n{names}", ha="center", va="center", transform=ax.transAxes,
                    fontsize=9, color="gray")
    last = max(by_step)
    fig.suptitle(f"{run_dir.resolve().name}: {len(by_step)} logged steps (last step {last})")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _moving_average(xs: list[int], ys: list[float], window: int) -> tuple[list[int], list[float]]:
    """Mean of each `window` consecutive points, placed at the window's centre (so it does not lag)."""
    out_x, out_y = [], []
    total = 0.0
    for i, y in enumerate(ys):
        total += y
        if i >= window:
            total -= ys[i - window]
        if i >= window - 1:
            out_x.append(xs[i - window // 2])
            out_y.append(total / window)
    return out_x, out_y


def main(argv: list[str] | None = None) -> int:
    """`python -m lampo.plot RUN_DIR`: the same as `lampo plot RUN_DIR`."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: lampo plot RUN_DIR   (RUN_DIR is a run's output_dir, holding metrics.jsonl)", file=sys.stderr)
        return 2
    try:
        path = plot_run(args[0])
    except (FileNotFoundError, ValueError) as exc:
        print(f"lampo plot: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

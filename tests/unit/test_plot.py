"""`lampo.plot`: a PNG of the training curves from a synthetic metrics.jsonl."""

from __future__ import annotations

import json
import math

import pytest

from lampo.plot import PLOT_FILE, main, merge_by_step, plot_run, series


def _write_metrics(run, n=40):
    lines = []
    for step in range(1, n + 1):
        lines.append({
            "step": step,
            "objective/scores": 0.1 + 0.02 * step + 0.05 * math.sin(step),
            "objective/kl": 0.01 * step,
            "objective/entropy": 20.0 - 0.1 * step,
            "loss/policy_avg": -0.01 * math.cos(step),
            "loss/value_avg": 0.5 / step,
            "time/training": 1.0 + 0.1 * (step % 3),
            "val/sequence_lengths": 30 - step * 0.2,
        })
        if step % 10 == 0:
            lines.append({"step": step, "eval/scores": 0.2 + 0.02 * step})
    lines[5]["objective/kl"] = None  # a NaN written as null is skipped, not drawn as 0
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_merge_and_series_skip_nulls():
    by_step = merge_by_step([{"step": 2, "a": 1.0}, {"step": 1, "a": None}, {"step": 2, "eval/b": 3.0}])
    assert list(by_step) == [1, 2] and by_step[2] == {"step": 2, "a": 1.0, "eval/b": 3.0}
    assert series(by_step, "a") == ([2], [1.0])


@pytest.mark.slow
def test_plot_run_writes_a_png(tmp_path, capsys):
    run = tmp_path / "run"
    _write_metrics(run)
    path = plot_run(run)
    assert path == run / PLOT_FILE
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # six panels of curves, not an empty canvas
    assert main([str(run)]) == 0 and "wrote" in capsys.readouterr().out


def test_plot_errors_are_clear(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="no logged steps"):
        plot_run(tmp_path)
    assert main([str(tmp_path / "nope")]) == 1
    assert "no metrics file" in capsys.readouterr().err
    assert main([]) == 2

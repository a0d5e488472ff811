"""The tracker: metrics.jsonl, console, resume truncation, samples, TensorBoard, W&B, docs."""

from __future__ import annotations

import io
import json
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import yaml
from rich.console import Console

from lampo.config import LampoConfig
from lampo.tracking import METRIC_NAMES, Tracker, TrackingError, read_metrics, render_samples_markdown

ROOT = Path(__file__).resolve().parents[2]


def _cfg(tmp_path: Path, **kw) -> LampoConfig:
    kw.setdefault("report_to", [])
    kw.setdefault("progress", False)
    return LampoConfig(output_dir=str(tmp_path / "run"), **kw)


def _tracker(cfg: LampoConfig, total: int = 10, **kw) -> tuple[Tracker, io.StringIO]:
    out = io.StringIO()
    console = Console(file=out, force_terminal=kw.pop("terminal", False), width=160)
    return Tracker(cfg.train, cfg.to_dict(), total, console=console, **kw), out


def test_metrics_jsonl_config_yaml_and_compact_console_lines(tmp_path):
    cfg = _cfg(tmp_path)
    tracker, out = _tracker(cfg)
    tracker.log(1, {"objective/scores": 0.5, "objective/kl": 0.25, "episode": 16})
    # numpy scalars (as torch tensors) are read with .item(); ints stay ints
    tracker.log(2, {"objective/scores": np.float32(0.75), "time/training": 1.5, "episode": 32})
    tracker.close()

    run = tmp_path / "run"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [
        {"step": 1, "objective/scores": 0.5, "objective/kl": 0.25, "episode": 16},
        {"step": 2, "objective/scores": 0.75, "time/training": 1.5, "episode": 32},
    ]
    assert yaml.safe_load((run / "config.yaml").read_text()) == cfg.to_dict()
    console = out.getvalue().splitlines()
    assert console[0].startswith("step 1/10 (10%) | score 0.5 | kl 0.25")
    # step 2: the latest score and the step time; kl is still the last value seen
    assert console[1].startswith("step 2/10 (20%) | score 0.75 | kl 0.25 | step 1.50s | eta ")
    assert not (run / "tensorboard").exists()  # report_to: []


def test_non_main_process_writes_nothing(tmp_path):
    cfg = _cfg(tmp_path, report_to=["tensorboard", "wandb"])  # no sink is even opened
    tracker = Tracker(cfg.train, cfg.to_dict(), 10, is_main_process=False)
    tracker.log(1, {"objective/scores": 1.0})
    tracker.log_samples(1, [{"messages": ["a", "b"], "score": 1.0}])
    tracker.truncate_after(0)
    tracker.close()
    assert not (tmp_path / "run").exists()
    assert tracker.should_log(1)


def test_values_nan_is_null_and_bad_values_name_the_metric(tmp_path):
    tracker, _ = _tracker(_cfg(tmp_path))
    tracker.log(1, {"objective/kl": float("nan"), "objective/scores": float("inf")})
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text()) == {
        "step": 1, "objective/kl": None, "objective/scores": None}
    with pytest.raises(TrackingError, match="metric 'objective/scores' must be a number"):
        tracker.log(2, {"objective/scores": "high"})
    with pytest.raises(TrackingError, match="metric 'objective/scores' must be a single number"):
        tracker.log(2, {"objective/scores": np.array([1.0, 2.0])})
    with pytest.warns(UserWarning, match="'objective/sores' is not in lampo.tracking.METRIC_NAMES"):
        tracker.log(2, {"objective/sores": 1.0})
    tracker.log(3, {"eval/anything": 1.0})  # eval/ names are accepted without warning
    with pytest.raises(TrackingError, match="'step' is the record's key"):
        tracker.log(4, {"step": 4})
    with pytest.raises(TrackingError, match="step must be a non-negative int"):
        tracker.log(2.5, {"lr": 1.0})
    tracker.close()
    with pytest.raises(TrackingError, match="closed"):
        tracker.log(4, {"lr": 1.0})


def test_resume_drops_lines_after_the_checkpoint_step(tmp_path):
    cfg = _cfg(tmp_path)
    tracker, _ = _tracker(cfg)
    for step in range(1, 6):
        tracker.log(step, {"objective/scores": float(step)})
        tracker.log_samples(step, [{"messages": ["q", f"a{step}"], "score": float(step)}])
    tracker.close()
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "objective/sc')  # torn by the crash

    resumed, _ = _tracker(cfg, resume_step=3)
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3]
    resumed.log(4, {"objective/scores": 40.0})
    resumed.close()
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [(r["step"], r["objective/scores"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    rollouts = [json.loads(x) for x in (tmp_path / "run" / "rollouts.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rollouts] == [1, 2, 3]


def test_log_samples_writes_whole_conversations(tmp_path):
    tracker, _ = _tracker(_cfg(tmp_path))
    samples = [
        {"messages": ["Hi<|im_end|>", "Hello!"], "score": 0.4},
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
         "score": [0.1, 0.9], "policy_version": np.int64(3)},
    ]
    tracker.log_samples(7, samples)
    tracker.close()
    lines = [json.loads(x) for x in (tmp_path / "run" / "rollouts.jsonl").read_text().splitlines()]
    assert lines == [
        {"step": 7, "messages": ["Hi<|im_end|>", "Hello!"], "score": 0.4},
        {"step": 7, "messages": samples[1]["messages"], "score": [0.1, 0.9], "policy_version": 3},
    ]
    md = render_samples_markdown(samples)
    # special tokens sit inside a code block, so TensorBoard's Markdown shows them verbatim
    assert "**sample 0** · score `0.4`\n\n```\n[0] Hi<|im_end|>\n[1] Hello!\n```" in md
    assert "[user] 2+2?\n[assistant] 4" in md and "score `[0.1, 0.9]`" in md


def test_live_progress_bar_shows_steps_and_key_metrics(tmp_path):
    cfg = _cfg(tmp_path, progress=True)
    tracker, out = _tracker(cfg, total=4, terminal=True)
    assert tracker.live
    tracker.log(1, {"objective/scores": 0.5, "objective/kl": 0.125, "loss/policy_avg": -0.25, "time/training": 2.0})
    tracker.advance(2)
    tracker.close()
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())  # drop terminal control codes
    assert "lampo" in text and "2/4" in text and "eta" in text
    assert "score 0.5 | kl 0.125 | pg_loss -0.25 | step 2.00s" in text


def test_progress_false_on_a_terminal_prints_lines(tmp_path):
    tracker, out = _tracker(_cfg(tmp_path, progress=False), terminal=True)
    assert not tracker.live
    tracker.log(10, {"objective/kl": 0.5})
    tracker.close()
    assert "step 10/10 (100%) | kl 0.5" in out.getvalue()


def test_should_log_follows_logging_steps(tmp_path):
    tracker, _ = _tracker(_cfg(tmp_path, logging_steps=5), total=12)
    assert [s for s in range(1, 13) if tracker.should_log(s)] == [1, 5, 10, 12]
    tracker.close()


def test_metric_window_averages_sums_counts_and_keeps_the_latest_totals():
    from lampo.tracking import MetricWindow

    w = MetricWindow()
    w.add({"objective/scores": 0.2, "reward/retries": 1, "episode": 16.0, "loss/policy_avg": None})
    w.add({"objective/scores": 0.4, "reward/retries": 2, "episode": 32.0, "loss/policy_avg": -0.5})
    # scores (0.2 + 0.4) / 2 = 0.3; retries 1 + 2 = 3; episode the latest, 32; a skipped null is not a 0
    assert w.reduce() == pytest.approx({"objective/scores": 0.3, "reward/retries": 3.0, "episode": 32.0,
                                        "loss/policy_avg": -0.5})
    assert w.reduce() == {}  # the next window starts empty


def _fake_wandb(calls: list) -> types.ModuleType:
    mod = types.ModuleType("wandb")

    class Run:
        def log(self, data, step=None):
            calls.append(("log", data, step))

        def finish(self):
            calls.append(("finish",))

    class Table:
        def __init__(self, columns):
            self.columns, self.rows = columns, []

        def add_data(self, *row):
            self.rows.append(row)

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run()

    mod.init, mod.Table = init, Table
    return mod


def test_wandb_offline_mode_config_and_resume_id(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(calls))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "proj")
    cfg = _cfg(tmp_path, report_to=["wandb"], run_name="r1")
    tracker, _ = _tracker(cfg)
    tracker.log(3, {"objective/scores": 1.0})
    tracker.log_samples(3, [{"messages": ["a", "b"], "score": 2.0}])
    tracker.close()
    init = calls[0][1]
    assert init["mode"] == "offline" and init["project"] == "proj" and init["name"] == "r1"
    assert init["config"] == cfg.to_dict() and init["dir"] == str(tmp_path / "run")
    assert calls[1] == ("log", {"objective/scores": 1.0}, 3)
    table = calls[2][1]["rollouts"]
    assert calls[2][2] == 3 and table.rows == [(3, 0, "2.0", "[0] a\n[1] b")]
    assert calls[-1] == ("finish",)

    # A resumed run continues the same W&B run id.
    tracker2, _ = _tracker(cfg, resume_step=3)
    tracker2.close()
    assert calls[-2][0] == "init" and calls[-2][1]["id"] == init["id"]


def test_wandb_missing_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(TrackingError, match="wandb package is not installed: pip install wandb"):
        _tracker(_cfg(tmp_path, report_to=["wandb"]))


@pytest.mark.slow
def test_tensorboard_scalars_text_and_purge_on_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg(tmp_path, report_to=["tensorboard"])
    tracker, _ = _tracker(cfg)
    for step in (1, 2, 3):
        tracker.log(step, {"objective/scores": float(step)})
    tracker.log_samples(2, [{"messages": ["Hi", "Hello"], "score": 0.5}])
    tracker.close()
    resumed, _ = _tracker(cfg, resume_step=1)  # crash after step 3, resume from checkpoint-1
    resumed.log(2, {"objective/scores": 20.0})
    resumed.close()

    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = acc.Scalars("objective/scores")
    # steps 2 and 3 of the first attempt were purged; the resumed step 2 replaced them
    assert [(s.step, s.value) for s in scalars] == [(1, 1.0), (2, 20.0)]
    text_tags = acc.Tags()["tensors"]
    assert "rollouts/text_summary" in text_tags and "config/text_summary" in text_tags


def test_docs_metrics_md_documents_every_metric_name():
    doc = (ROOT / "docs" / "metrics.md").read_text()
    documented = set(re.findall(r"^\| `([^`]+)` \|", doc, flags=re.M))
    missing = [name for name in METRIC_NAMES if name not in documented]
    assert missing == [], f"docs/metrics.md lacks a table row for {missing}"
    required = """episode lr epoch objective/kl objective/scores objective/rlhf_reward objective/non_score_reward
    objective/entropy objective/loss objective/verifiable_correct_rate loss/policy_avg loss/value_avg
    policy/approxkl_avg policy/clipfrac_avg policy/entropy_avg val/clipfrac_avg val/ratio val/sequence_lengths
    val/num_stop_token_ids val/engine_logprob_diff val/explained_variance time/from_scratch time/training
    time/rollout time/reward time/forward time/advantages time/optimize time/weight_sync perf/tokens_per_second
    perf/mfu policy/version_lag reward/retries reward/failed_requests data/skipped_rows optim/skipped_steps
    eval/scores objective/kl_coef""".split()
    assert set(required) <= set(METRIC_NAMES)
    assert len(set(METRIC_NAMES)) == len(METRIC_NAMES)

"""One tracker every component logs through: console, metrics.jsonl, TensorBoard, W&B, rollouts.jsonl.

    tracker = Tracker(cfg.train, cfg.to_dict(), total_steps=cfg.num_steps, is_main_process=acc.is_main_process)
    tracker.log(step, {"objective/scores": 0.4, "objective/kl": 0.01, ...})
    tracker.log_samples(step, [{"messages": ["Hi", "Hello!"], "score": 0.4}])
    tracker.close()

Sinks, all written by the main process only (other ranks get a tracker that does nothing):
- the console: a rich progress bar with ETA and the key metrics when stdout is a terminal and
  `progress` is true; otherwise one compact line per `log` call;
- `output_dir/metrics.jsonl`: one JSON object per `log` call, `{"step": N, <metric>: value, ...}`,
  flushed at once; non-finite values are written as null (strict JSON);
- `output_dir/tensorboard/` (when `report_to` contains tensorboard, the default);
- Weights & Biases (when `report_to` contains wandb; WANDB_MODE=offline and WANDB_PROJECT are honoured);
- `output_dir/rollouts.jsonl` and TensorBoard's text tab for `log_samples`;
- `output_dir/config.yaml`: the resolved configuration, written at start.

Resuming from step N: pass `resume_step=N`; lines with step > N are dropped from both jsonl files
and TensorBoard purges its events after N, so the files read as one consistent run.

Every metric name is documented in docs/metrics.md; `METRIC_NAMES` is the same list in code.
"""

from __future__ import annotations

import contextlib
import json
import math
import operator
import os
import time
import uuid
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

from lampo.files import atomic_write_text

# Per training step, as in the design documents (open-instruct's PPO metric names), plus the
# value model, per-phase timing, throughput, staleness and robustness counters.
METRIC_NAMES: tuple[str, ...] = (
    "episode",
    "lr",
    "epoch",
    "objective/kl",
    "objective/kl_coef",
    "objective/scores",
    "objective/rlhf_reward",
    "objective/non_score_reward",
    "objective/entropy",
    "objective/loss",
    "objective/verifiable_correct_rate",
    "loss/policy_avg",
    "loss/value_avg",
    "policy/approxkl_avg",
    "policy/clipfrac_avg",
    "policy/entropy_avg",
    "policy/version_lag",
    "val/clipfrac_avg",
    "val/ratio",
    "val/sequence_lengths",
    "val/num_stop_token_ids",
    "val/engine_logprob_diff",
    "val/policy_change_logprob_diff",
    "rollout/kl",
    "rollout/kl_numerical",
    "rollout/kl_staleness",
    "rollout/ratio_mean",
    "rollout/ratio_min",
    "rollout/ratio_max",
    "rollout/ratio_corrected_frac",
    "rollout/ratio_numerical_mean",
    "rollout/ratio_numerical_min",
    "rollout/ratio_numerical_max",
    "rollout/ratio_staleness_mean",
    "rollout/ratio_staleness_min",
    "rollout/ratio_staleness_max",
    "loss/ptx",
    "val/explained_variance",
    "time/from_scratch",
    "time/training",
    "time/rollout",
    "time/reward",
    "data/regenerated_groups",
    "ray/engine_restarts",
    "ray/requeued_chunks",
    "ray/live_engines",
    "ray/weight_broadcast",
    "time/forward",
    "time/advantages",
    "time/optimize",
    "time/weight_sync",
    "perf/tokens_per_second",
    "perf/mfu",
    "perf/mfu_rollout",
    "perf/mfu_forward",
    "perf/mfu_optimize",
    "perf/flops_per_second",
    "reward/retries",
    "reward/failed_requests",
    "data/skipped_rows",
    "data/cut_at_max_prompt_len",
    "data/filtered_groups",
    "data/resample_rounds",
    "optim/skipped_steps",
    "optim/scaler_skipped_steps",
    "optim/loss_scale",
    "eval/scores",
    "eval/sequence_lengths",
    "eval/num_stop_token_ids",
    "eval/verifiable_correct_rate",
)
"""Every metric Lampo logs; each is documented in docs/metrics.md (a test checks it)."""

EVAL_PREFIX = "eval/"
"""Evaluation metrics: `eval/<name>`; any name under this prefix is accepted."""

KEY_METRICS: tuple[str, ...] = ("objective/scores", "objective/kl", "loss/policy_avg", "time/training")
"""Shown on the console next to the progress bar."""

_SHORT = {"objective/scores": "score", "objective/kl": "kl", "loss/policy_avg": "pg_loss", "time/training": "step"}

METRICS_FILE = "metrics.jsonl"
ROLLOUTS_FILE = "rollouts.jsonl"
CONFIG_FILE = "config.yaml"
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id.txt"


class PhaseTimer:
    """Times the phases of a step: `with timer("forward"): ...` records `time/forward` in `timer.times`."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.times[f"time/{phase}"] = time.perf_counter() - start


class MetricWindow:
    """The steps between two logged steps (`logging_steps`), reduced to one record.

    As transformers' Trainer logs the mean loss since its last log: each metric is averaged over
    the window, except event counts, which are summed (a retry two steps ago still happened), and
    running totals and settings, which take their latest value.
    """

    SUMMED = ("reward/retries", "reward/failed_requests", "data/skipped_rows", "data/cut_at_max_prompt_len",
              "data/filtered_groups", "data/resample_rounds", "data/regenerated_groups", "optim/skipped_steps",
              "optim/scaler_skipped_steps")
    LATEST = ("episode", "epoch", "lr", "objective/kl_coef", "time/from_scratch", "policy/version_lag",
              "optim/loss_scale", "ray/engine_restarts", "ray/requeued_chunks", "ray/live_engines",
              "ray/weight_broadcast")

    def __init__(self) -> None:
        self._rows: list[dict[str, float]] = []

    def add(self, metrics: dict[str, float]) -> None:
        self._rows.append(dict(metrics))

    def reduce(self) -> dict[str, float]:
        """The window's record; the window starts empty again."""
        rows, self._rows = self._rows, []
        out: dict[str, float] = {}
        for name in dict.fromkeys(k for row in rows for k in row):
            values = [row[name] for row in rows if name in row and row[name] is not None]
            if not values:
                continue
            if name in self.SUMMED:
                out[name] = float(sum(values))
            elif name in self.LATEST:
                out[name] = values[-1]
            else:
                out[name] = float(sum(values) / len(values))
        return out


class TrackingError(RuntimeError):
    """A tracker could not start or a logged value is unusable; the message says what to do."""


def is_known_metric(name: str) -> bool:
    """True for the documented names and anything under `eval/`."""
    return name in METRIC_NAMES or name.startswith(EVAL_PREFIX)


class Tracker:
    """Writes metrics and samples to every configured sink; a no-op off the main process."""

    def __init__(
        self,
        train_cfg: Any,
        full_config_dict: dict[str, Any],
        total_steps: int,
        is_main_process: bool = True,
        *,
        resume_step: int | None = None,
        console: Any = None,
    ) -> None:
        # Accept the whole LampoConfig as well as its `train` section.
        train_cfg = getattr(train_cfg, "train", train_cfg)
        self.enabled = bool(is_main_process)
        self.total_steps = int(total_steps)
        self.logging_steps = int(getattr(train_cfg, "logging_steps", 1))
        self.latest: dict[str, float | int | None] = {}
        """The most recent value of every metric (for early stopping and summaries)."""
        self._warned: set[str] = set()
        self._closed = False
        self._tb = None
        self._wandb_run = None
        self._progress = None
        self._task = None
        self.console = None
        self.live = False
        if not self.enabled:
            return

        self.output_dir = Path(train_cfg.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.output_dir / METRICS_FILE
        self.rollouts_path = self.output_dir / ROLLOUTS_FILE
        report_to = list(getattr(train_cfg, "report_to", ["tensorboard"]) or [])
        self.run_name = getattr(train_cfg, "run_name", None) or self.output_dir.resolve().name
        self._start_step = int(resume_step or 0)
        self._start_time = time.monotonic()

        config_text = yaml.safe_dump(full_config_dict, sort_keys=False)
        atomic_write_text(self.output_dir / CONFIG_FILE, config_text)
        if resume_step is not None:
            self.truncate_after(resume_step)

        if "tensorboard" in report_to:
            self._tb = _open_tensorboard(self.output_dir / TENSORBOARD_DIR, resume_step)
            self._tb.add_text("config", _code_block(config_text), self._start_step)
            self._tb.flush()
        if "wandb" in report_to:
            self._wandb_run = _init_wandb(self.output_dir, self.run_name, full_config_dict, resume_step)

        self._setup_console(console, bool(getattr(train_cfg, "progress", True)))

    # --- logging -------------------------------------------------------------------------
    def should_log(self, step: int) -> bool:
        """True on steps the trainer should log: every `logging_steps`, the first and the last."""
        return step % self.logging_steps == 0 or step == 1 or step == self.total_steps

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Write `metrics` for `step` to every sink (values: numbers or one-element tensors)."""
        if not self.enabled:
            return
        self._check_open()
        step = _to_step(step)
        if "step" in metrics:
            raise TrackingError("log: 'step' is the record's key in metrics.jsonl; pass it as the step argument")
        values = {name: _to_number(name, value) for name, value in metrics.items()}
        for name in values:
            if not is_known_metric(name) and name not in self._warned:
                self._warned.add(name)
                warnings.warn(
                    f"metric '{name}' is not in lampo.tracking.METRIC_NAMES; document it in docs/metrics.md",
                    stacklevel=2,
                )
        self.latest.update(values)

        record = {"step": step, **values}
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(name, math.nan if value is None else value, step)
            self._tb.flush()
        if self._wandb_run is not None:
            self._wandb_run.log(values, step=step)
        self._show(step)

    def advance(self, step: int) -> None:
        """Move the progress bar to `step` without logging (for steps that are not logging steps)."""
        if self.enabled and self._progress is not None:
            self._progress.update(self._task, completed=step)

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        """Append whole conversations with their scores to rollouts.jsonl and TensorBoard's text tab.

        Each sample is a dict, e.g. {"messages": ["Hi", "Hello!"], "score": 0.4}; it is written
        as `{"step": N, **sample}`. `messages` may be plain-text turns or {"role", "content"} dicts.
        """
        if not self.enabled or not samples:
            return
        self._check_open()
        step = _to_step(step)
        lines = []
        for i, sample in enumerate(samples):
            if not isinstance(sample, dict):
                raise TrackingError(f"log_samples: sample {i} must be a dict, got {type(sample).__name__}")
            lines.append(json.dumps({"step": step, **sample}, default=_json_default, ensure_ascii=False))
        with open(self.rollouts_path, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        if self._tb is not None:
            self._tb.add_text("rollouts", render_samples_markdown(samples), step)
            self._tb.flush()
        if self._wandb_run is not None:
            import wandb

            table = wandb.Table(columns=["step", "sample", "score", "conversation"])
            for i, sample in enumerate(samples):
                table.add_data(step, i, json.dumps(_score_of(sample), default=_json_default),
                               _conversation_text(sample))
            self._wandb_run.log({"rollouts": table}, step=step)

    def log_table(self, step: int, rows: list[dict[str, Any]], key: str = "samples") -> None:
        """Rows of named columns (e.g. query, response, reward): appended to rollouts.jsonl as
        `{"step": N, **row}`, shown as a Markdown table in TensorBoard's text tab and logged as a
        W&B Table under `key` (columns: step, then the rows' keys)."""
        if not self.enabled or not rows:
            return
        self._check_open()
        step = _to_step(step)
        columns = list(dict.fromkeys(k for row in rows for k in row))
        with open(self.rollouts_path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps({"step": step, **row}, default=_json_default, ensure_ascii=False) + "\n"
                            for row in rows))
        if self._tb is not None:
            self._tb.add_text(key, render_table_markdown(columns, rows), step)
            self._tb.flush()
        if self._wandb_run is not None:
            import wandb

            table = wandb.Table(columns=["step", *columns])
            for row in rows:
                table.add_data(step, *[_cell(row.get(c)) for c in columns])
            self._wandb_run.log({key: table}, step=step)

    def log_histogram(self, step: int, name: str, values: list[float]) -> None:
        """A distribution (e.g. token lengths): a TensorBoard histogram and a W&B histogram under `name`."""
        if not self.enabled or not values:
            return
        self._check_open()
        if self._tb is not None:
            import numpy as np

            self._tb.add_histogram(name, np.asarray(values, dtype=np.float64), _to_step(step))
            self._tb.flush()
        if self._wandb_run is not None:
            import wandb

            self._wandb_run.log({name: wandb.Histogram(values)}, step=_to_step(step))

    @property
    def run_url(self) -> str | None:
        """The W&B run's page (None without W&B, or offline)."""
        return getattr(self._wandb_run, "url", None) if self._wandb_run is not None else None

    def record_config(self, values: dict[str, Any]) -> None:
        """Facts learnt during the run (e.g. the hub repository's URL) added to the W&B run's config."""
        if self.enabled and self._wandb_run is not None:
            self._wandb_run.config.update(values, allow_val_change=True)

    def print(self, message: str) -> None:
        """Print a message on the main process without breaking the live progress bar."""
        if self.enabled:
            self.console.print(message, soft_wrap=True, highlight=False, markup=False)

    # --- resume --------------------------------------------------------------------------
    def truncate_after(self, step: int) -> None:
        """Drop lines with step > `step` from metrics.jsonl and rollouts.jsonl (resuming from `step`)."""
        if not self.enabled:
            return
        for path in (self.metrics_path, self.rollouts_path):
            if not path.exists():
                continue
            kept = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line torn by the crash that made this resume necessary
                if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                    kept.append(line)
            atomic_write_text(path, "".join(line + "\n" for line in kept))

    # --- shutdown ------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the progress bar and flush and close every sink (safe to call twice)."""
        if self._closed:
            return
        self._closed = True
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.stop()
        if self._tb is not None:
            self._tb.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- console -------------------------------------------------------------------------
    def _setup_console(self, console: Any, progress: bool) -> None:
        from rich.console import Console

        self.console = console if console is not None else Console()
        self.live = progress and self.console.is_terminal
        if not self.live:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]lampo[/bold]"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[metrics]}"),
            console=self.console,
        )
        self._task = self._progress.add_task("train", total=self.total_steps, completed=self._start_step,
                                             metrics="")
        self._progress.start()

    def _show(self, step: int) -> None:
        summary = " | ".join(
            f"{_SHORT[name]} {_fmt(self.latest[name], name)}" for name in KEY_METRICS if name in self.latest
        )
        if self._progress is not None:
            self._progress.update(self._task, completed=step, metrics=summary)
            return
        done = step - self._start_step
        eta = ""
        if done > 0 and step < self.total_steps:
            per_step = (time.monotonic() - self._start_time) / done
            eta = f" | eta {_fmt_duration(per_step * (self.total_steps - step))}"
        pct = 100.0 * step / self.total_steps if self.total_steps else 100.0
        line = f"step {step}/{self.total_steps} ({pct:.0f}%)" + (f" | {summary}" if summary else "") + eta
        self.console.print(line, soft_wrap=True, highlight=False, markup=False)

    def _check_open(self) -> None:
        if self._closed:
            raise TrackingError("the tracker was closed; create a new Tracker to log again")


# ---------------------------------------------------------------------------------------
# Sinks
# ---------------------------------------------------------------------------------------


def _open_tensorboard(log_dir: Path, resume_step: int | None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # torch.utils.tensorboard needs the tensorboard package
        raise TrackingError(
            "report_to contains 'tensorboard' but the tensorboard package is not installed: "
            "pip install tensorboard (or pip install 'lampo[tracking]'), or set report_to: []"
        ) from exc
    # purge_step drops events at or after it, so a resumed run does not show two curves
    # over the steps between the checkpoint and the crash.
    purge = None if resume_step is None else resume_step + 1
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge, flush_secs=10)


def _init_wandb(output_dir: Path, run_name: str, config: dict[str, Any], resume_step: int | None):
    try:
        import wandb
    except ImportError as exc:
        raise TrackingError(
            "report_to contains 'wandb' but the wandb package is not installed: pip install wandb "
            "(or pip install 'lampo[tracking]'), or remove 'wandb' from report_to"
        ) from exc
    # One W&B run per output_dir: the id is kept next to the metrics so a resumed run continues it.
    id_file = output_dir / WANDB_ID_FILE
    if resume_step is not None and id_file.exists():
        run_id = id_file.read_text().strip()
    else:
        run_id = uuid.uuid4().hex[:12]
        atomic_write_text(id_file, run_id + "\n")
    kwargs: dict[str, Any] = dict(
        project=os.environ.get("WANDB_PROJECT", "lampo"),
        name=run_name,
        config=config,
        dir=str(output_dir),
        id=run_id,
        resume="allow",
    )
    if os.environ.get("WANDB_MODE"):
        kwargs["mode"] = os.environ["WANDB_MODE"]  # "offline": runs are synced later with `wandb sync`
    return wandb.init(**kwargs)


# ---------------------------------------------------------------------------------------
# Reading and formatting
# ---------------------------------------------------------------------------------------


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl file (or of `RUN_DIR/metrics.jsonl`), skipping torn lines."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}: is this a Lampo run directory (output_dir)?")
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            warnings.warn(f"{path}:{lineno}: skipping a line that is not JSON (torn by a crash?)", stacklevel=2)
    return records


def render_samples_markdown(samples: Iterable[dict[str, Any]]) -> str:
    """Conversations as Markdown for TensorBoard's text tab (turns in code blocks: special tokens stay visible)."""
    parts = []
    for i, sample in enumerate(samples):
        score = _score_of(sample)
        head = f"**sample {i}**" + ("" if score is None else f" · score `{json.dumps(score, default=_json_default)}`")
        parts.append(head + "\n\n" + _code_block(_conversation_text(sample)))
    return "\n\n".join(parts)


def render_table_markdown(columns: list[str], rows: list[dict[str, Any]]) -> str:
    """A Markdown table (TensorBoard's text tab renders it); cells on one line, pipes escaped."""
    def cell(value: Any) -> str:
        text = value if isinstance(value, str) else json.dumps(value, default=_json_default, ensure_ascii=False)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: Any) -> Any:
    # W&B table cells: numbers and strings as they are, anything else as JSON text
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return json.dumps(value, default=_json_default, ensure_ascii=False)


def _score_of(sample: dict[str, Any]) -> Any:
    for key in ("score", "scores", "reward"):
        if key in sample:
            return sample[key]
    return None


def _conversation_text(sample: dict[str, Any]) -> str:
    messages = sample.get("messages", sample.get("conversation"))
    if messages is None:
        rest = {k: v for k, v in sample.items() if k not in ("score", "scores", "reward")}
        return json.dumps(rest, default=_json_default, ensure_ascii=False, indent=1)
    turns = []
    for k, msg in enumerate(messages):
        if isinstance(msg, dict):
            turns.append(f"[{msg.get('role', k)}] {msg.get('content', '')}")
        else:
            turns.append(f"[{k}] {msg}")
    return "\n".join(turns)


def _code_block(text: str) -> str:
    return "```\n" + text.replace("```", "'''") + "\n```"


def _to_step(step: Any) -> int:
    try:
        value = operator.index(step)  # ints, numpy integers, integer tensors with one element
    except TypeError:
        value = None
    if value is None or isinstance(step, bool) or value < 0:
        raise TrackingError(f"step must be a non-negative int, got {step!r}")
    return value


def _to_number(name: str, value: Any) -> float | int | None:
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()  # one-element torch tensor or numpy scalar
        except (ValueError, RuntimeError) as exc:
            raise TrackingError(f"metric '{name}' must be a single number; reduce it first ({exc})") from exc
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TrackingError(f"metric '{name}' must be a number, got {type(value).__name__} {value!r}")
    if isinstance(value, int):
        return value
    # Strict JSON has no NaN/Infinity: write null so any JSON reader can parse the file.
    return value if math.isfinite(value) else None


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def _fmt(value: Any, name: str) -> str:
    if value is None:
        return "nan"
    if name.startswith("time/"):
        return f"{value:.2f}s"
    return f"{value:.4g}"


def _fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


__all__ = [
    "EVAL_PREFIX",
    "MetricWindow",
    "PhaseTimer",
    "KEY_METRICS",
    "METRIC_NAMES",
    "Tracker",
    "TrackingError",
    "is_known_metric",
    "read_metrics",
    "render_samples_markdown",
    "render_table_markdown",
]

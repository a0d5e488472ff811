"""Helpers shared by the benchmark scripts: the small model, prompts, statistics, result files and
their markdown tables."""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODELS = ROOT / "build" / "bench-models"

QUESTIONS = [
    "Why is the sky blue?", "How do bees make honey?", "What is a prime number?", "Why do cats purr?",
    "How does a bicycle stay upright?", "What makes bread rise?", "Why is the sea salty?",
    "How do plants drink water?", "What is an echo?", "Why do leaves change colour?",
    "How does a compass work?", "What is a rainbow?", "Why do we sleep?", "How do birds fly?",
    "What is thunder?", "Why is ice slippery?",
]


def model_dir(size: str = "small") -> Path:
    """The offline benchmark model (built once, deterministically, under build/bench-models)."""
    from lampo.testing import build_tiny_model

    return build_tiny_model(MODELS / size, size=size)


def write_messages_dataset(folder: Path, n: int = 16) -> Path:
    """`n` single-turn prompts as a Lampo `messages` dataset (train.jsonl)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]} for i in range(n)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def summary(values: list[float]) -> dict:
    """Median with min and max (the issue's figure format)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def span(s: dict, fmt: str = ".2f") -> str:
    """A `summary` as one table cell: "median (min-max)"."""
    return f"{s['median']:{fmt}} ({s['min']:{fmt}}-{s['max']:{fmt}})"


def table(header: list[str], rows: Iterable[Iterable[object]], align: str = "") -> str:
    """A markdown table. align: one letter per column, "l" (the default) or "r" (numbers)."""
    marks = ["---:" if a == "r" else "---" for a in align.ljust(len(header), "l")]
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "|".join(marks) + "|",
                      *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)])


def machine() -> dict:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
        "utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "commit": _commit(),
    }


def _commit() -> str | None:
    """The measured code's commit (with `+` when the tree has uncommitted changes)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+" if dirty else "")


def save(name: str, data: dict) -> Path:
    """benchmarks/results/NAME.json: what `python -m benchmarks.run --render-only` renders."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def publish(name: str, data: dict, render: Callable[[dict], str]) -> int:
    """The end of every benchmark's `main`: save its JSON, print its tables, exit status 0."""
    save(name, data)
    print(render(data))
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(module: str, args: list[str], timeout: float = 3600, env: dict | None = None) -> dict:
    """Run `python -m module args...` in a fresh process; it prints one JSON object as its last line."""
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{module} {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])

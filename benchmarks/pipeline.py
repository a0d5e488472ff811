"""Asynchronous vs synchronous pipeline through the real application (issue 6, items 2.3 and 2.4).

Runs `python -m lampo.ppo_vllm --config benchmarks/configs/pipeline.yaml` against a reward
server (`python -m lampo.reward_server`) started here on a free port, with two reward models
from `benchmarks/rewards.py`:
- VowelShare: trivial (microseconds); its time/reward share is the reward server's overhead;
- SlowVowelShare: sleeps 200 ms per call, a reward model whose latency matters.
For each, `async_mode: false` and `true`, taking turns `--rounds` times with the steps pooled.
Figures: seconds per step (median, min, max of the steps after the first of each run, which in
async mode has nothing to overlap with), steps per second, the async/sync ratio, and the mean
of each logged phase time.

    .venv/bin/python -m benchmarks.pipeline [--steps 6] [--quick]

Writes benchmarks/results/pipeline.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks.common import ROOT, free_port, machine, model_dir, publish, span, summary, table
from lampo.reward.client import wait_until_healthy

CONFIG = ROOT / "benchmarks" / "configs" / "pipeline.yaml"
REWARDS = {"trivial": "benchmarks.rewards.VowelShare", "sleep200ms": "benchmarks.rewards.SlowVowelShare"}
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "LAMPO_LOG_LEVEL": "WARNING"}


class RewardServer:
    """`python -m lampo.reward_server` in a subprocess, stopped on exit."""

    def __init__(self, model: str):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lampo.reward_server", "--model", model, "--config", str(CONFIG),
             "--port", str(self.port), "--log-level", "warning"],
            cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def __enter__(self):
        try:
            wait_until_healthy(f"http://127.0.0.1:{self.port}", self.proc, timeout=120)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}: {self.proc.stderr.read()[-2000:]}") from exc
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def run_app(cmd_prefix: list[str], out_dir: Path, overrides: dict, timeout: float = 3600) -> list[dict]:
    """Run the application, return its metrics.jsonl rows (one per step)."""
    args = [f"--{k}={v}" for k, v in overrides.items()]
    shutil.rmtree(out_dir, ignore_errors=True)  # a fresh run, not a resumed or appended one
    proc = subprocess.run([*cmd_prefix, "-m", "lampo.ppo_vllm", "--config", str(CONFIG),
                           f"--output_dir={out_dir}", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"lampo.ppo_vllm failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "time/training" in r]


def describe(rows: list[dict], skip: int = 1) -> dict:
    rows = rows[skip:]
    steps = [r["time/training"] for r in rows]
    phases = sorted({k for r in rows for k in r if k.startswith("time/") and k not in ("time/from_scratch",)})
    return {"step_s": summary(steps), "steps_per_s": 1.0 / statistics.median(steps),
            "phases_mean_s": {k: statistics.mean(r.get(k, 0.0) for r in rows) for k in phases}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="measured steps (one more runs first)")
    ap.add_argument("--rounds", type=int, default=2, help="sync and async alternate this many times")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    steps = 3 if args.quick else args.steps
    model_dir("tiny")
    results = {}
    for reward, model in REWARDS.items():
        pooled: dict[str, list[dict]] = {"sync": [], "async": []}
        with RewardServer(model) as server:
            # sync and async take turns (`--rounds` times) and their steps are pooled, so that load
            # from other jobs on the machine hits both modes alike.
            for rnd in range(args.rounds):
                for mode in ("sync", "async"):
                    out = ROOT / "build" / "bench_runs" / f"pipeline_{reward}_{mode}"
                    rows = run_app([sys.executable], out, {
                        "reward_model": f"http://127.0.0.1:{server.port}",
                        "async_mode": str(mode == "async").lower(), "max_steps": steps + 1})
                    pooled[mode] += rows[1:]  # the first step has nothing to overlap with in async mode
                    print(f"round {rnd + 1} {reward:10s} {mode:5s} "
                          f"{statistics.median(r['time/training'] for r in rows[1:]):.2f} s/step", file=sys.stderr)
        for mode, rows in pooled.items():
            results[f"{reward}/{mode}"] = describe(rows, skip=0)
        results[f"{reward}/async_speedup"] = results[f"{reward}/async"]["steps_per_s"] / \
            results[f"{reward}/sync"]["steps_per_s"]
    sync = results["trivial/sync"]
    results["reward_overhead"] = {
        "reward_s_per_step": sync["phases_mean_s"].get("time/reward", 0.0),
        "share_of_step": sync["phases_mean_s"].get("time/reward", 0.0) / sync["phases_mean_s"]["time/training"],
    }
    return publish("pipeline", {"benchmark": "pipeline", "machine": machine(), "steps": steps, "results": results},
                   render)


def render(data: dict) -> str:
    res = data["results"]
    rows = [[reward, span(res[f"{reward}/sync"]["step_s"]), span(res[f"{reward}/async"]["step_s"]),
             f"{res[f'{reward}/async_speedup']:.2f}x"] for reward in REWARDS]
    ro = res["reward_overhead"]
    return (table(["reward model", "sync s/step (min-max)", "async s/step (min-max)", "async/sync steps/s"], rows)
            + f"\n\nReward phase with the trivial model over HTTP: {ro['reward_s_per_step'] * 1000:.0f} ms per step, "
            f"{ro['share_of_step']:.1%} of the synchronous step.")


if __name__ == "__main__":
    raise SystemExit(main())

"""`lampo.ppo_ray`'s overhead against the in-process application, the runs taking turns every few steps.

`benchmarks/ray_pipeline.py` pairs whole runs, one after the other. On a shared host the speed
drifts within seconds by more than the +10% goal, so two runs a minute apart are timed on
different machines in effect. Here every run stays alive and they take turns instead: one run
trains `--window` steps while the others are stopped (SIGSTOP to its whole process tree: the
driver, and for Ray the cluster's processes and its actors), then the next run takes over. Each
run therefore has both cores to itself whenever it trains, and neighbouring windows see the same
host.

- A window's first step is left out: it was in progress when its run was stopped (its time counts
  the pause). The others ran start to end with the run awake.
- Start-up happens one run at a time, each with the cores to itself, and is not timed.
- A Ray window's overhead is its median step over the mean of the in-process windows just before
  and after it; the figure is the median over windows, with the range.

The runs are those of `ray_pipeline --overhead-only` (the benchmark config of benchmarks/pipeline.py,
one rollout worker and one learner, on-policy, one part per worker, the trivial reward over HTTP).

    .venv/bin/python -m benchmarks.ray_turns [--sizes tiny small] [--windows 12] [--window 8]
        [--layouts separate colocated] [--control]

Writes benchmarks/results/ray_turns.json. Linux only: it finds each run's processes in /proc.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import ROOT, machine, model_dir, publish, table
from benchmarks.pipeline import ENV, REWARDS, RewardServer
from benchmarks.ray_pipeline import IN_PROCESS_SYNC, LAYOUTS, OVERHEAD_RUNS, PHASES, app_command

RUNS = ROOT / "build" / "bench_runs" / "ray_turns"
IN_PROCESS = "in-process sync"
CONTROL = "in-process sync, again"
"""`--control`: a second in-process run, measured as a Ray run is: what the method reads when nothing differs."""
WINDOW_TIMEOUT = 600.0
"""Seconds a window may take before the benchmark gives up on its run."""


def descendants(root: int) -> list[int]:
    """`root` and every process below it (Ray's cluster processes and actors are the driver's)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


class Run:
    """One training command, stopped and continued as a whole."""

    def __init__(self, name: str, module: str, overrides: dict):
        self.name = name
        self.out = RUNS / name.replace(" ", "_").replace(",", "")
        shutil.rmtree(self.out, ignore_errors=True)
        RUNS.mkdir(parents=True, exist_ok=True)
        self.metrics = self.out / "metrics.jsonl"
        self.log = open(self.out.with_suffix(".log"), "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(app_command(module, self.out, overrides), cwd=ROOT, env=ENV, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        self._read = 0
        self._partial = ""
        self.windows: list[list[dict]] = []
        """Per window, the time/* metrics of its steps after the first."""

    def new_steps(self) -> list[dict]:
        """The time/* metrics of the steps logged since the last call."""
        if not self.metrics.exists():
            return []
        with self.metrics.open() as f:
            f.seek(self._read)
            text = f.read()
            self._read = f.tell()
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        return [{k: v for k, v in row.items() if k.startswith("time/")}
                for row in map(json.loads, filter(None, lines)) if "time/training" in row]

    def train(self, steps: int) -> list[dict]:
        """Continue until `steps` more steps are logged; their time/* metrics."""
        self._signal(signal.SIGCONT)
        got: list[dict] = []
        deadline = time.monotonic() + WINDOW_TIMEOUT
        while len(got) < steps:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} ended (exit {self.proc.returncode}); see {self.log.name}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} logged {len(got)} of {steps} steps in {WINDOW_TIMEOUT:.0f} s")
            got += self.new_steps()
            time.sleep(0.005)
        self._signal(signal.SIGSTOP)
        return got

    def _signal(self, sig: int) -> None:
        for pid in descendants(self.proc.pid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        self._signal(signal.SIGCONT)
        self.proc.terminate()
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.proc.wait()
        self.log.close()


def measure(runs: dict[str, tuple[str, dict]], windows: int, window: int, warmup: int, common: dict) -> dict:
    """The runs take turns, `windows` times each; per run its windows' step times."""
    started: list[Run] = []
    try:
        for name, (module, overrides) in runs.items():
            run = Run(name, module, {**common, **overrides, "max_steps": 100_000})
            started.append(run)
            run.train(warmup)  # start-up, alone on the machine; not timed
            print(f"{name}: started", file=sys.stderr)
        for w in range(windows):
            for run in started:
                steps = run.train(window + 1)[1:]  # the first step spans the pause
                run.windows.append(steps)
                median = statistics.median(s["time/training"] for s in steps)
                print(f"window {w + 1} {run.name:28s} {median:.3f} s/step", file=sys.stderr)
    finally:
        for run in started:
            run.stop()
    return {run.name: {"windows_s": [[s["time/training"] for s in w] for w in run.windows],
                       "phases_median_s": {k: statistics.median(s.get(k, 0.0) for w in run.windows for s in w)
                                           for k in PHASES}}
            for run in started}


def overhead(res: dict, name: str) -> list[float]:
    """Each window of `name` against the mean of the in-process windows around it (before, and after
    when there is one: the in-process run's turn comes first in every round), minus one."""
    base = [statistics.median(w) for w in res[IN_PROCESS]["windows_s"]]
    mine = [statistics.median(w) for w in res[name]["windows_s"]]
    return [m / statistics.mean(base[i:i + 2]) - 1 for i, m in enumerate(mine)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    ap.add_argument("--windows", type=int, default=12, help="turns each run takes")
    ap.add_argument("--window", type=int, default=0,
                    help="timed steps per turn (0: 8 on the tiny model, 2 on the small one)")
    ap.add_argument("--warmup", type=int, default=3, help="steps each run trains alone before the turns")
    ap.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=["separate", "colocated"])
    ap.add_argument("--control", action="store_true",
                    help="also a second in-process run, taken as a Ray run is: the method's own spread")
    args = ap.parse_args(argv)
    results: dict[str, dict] = {}
    with RewardServer(REWARDS["trivial"]) as server:
        for size in args.sizes:
            common = {"reward_model": f"http://127.0.0.1:{server.port}", "model_name_or_path": str(model_dir(size))}
            runs = {IN_PROCESS: IN_PROCESS_SYNC, **({CONTROL: IN_PROCESS_SYNC} if args.control else {}),
                    **{LAYOUTS[x]: OVERHEAD_RUNS[LAYOUTS[x]] for x in args.layouts}}
            window = args.window or (8 if size == "tiny" else 2)
            results[size] = {"window": window, "runs": measure(runs, args.windows, window, args.warmup, common)}
    return publish("ray_turns", {"benchmark": "ray_turns", "machine": machine(), "windows": args.windows,
                                 "results": results}, render)


def render(data: dict) -> str:
    rows = []
    for size, r in data["results"].items():
        res = r["runs"]
        for name in res:
            steps = [s for w in res[name]["windows_s"] for s in w]
            cell = within = ""
            if name != IN_PROCESS:
                o = overhead(res, name)
                cell = f"{statistics.median(o):+.1%} ({min(o):+.1%} to {max(o):+.1%})"
                within = f"{sum(x <= 0.10 for x in o)} of {len(o)}"
            phases = res[name]["phases_median_s"]
            rows.append([size, name, f"{len(res[name]['windows_s'])} x {r['window']}",
                         f"{statistics.median(steps):.3f}", cell, within, *(f"{phases[k]:.3f}" for k in PHASES)])
    m = data["machine"]
    return ("Ray against in-process, the runs taking turns (one worker, one learner, on-policy; goal: at most "
            "+10% per step); overhead: the median over windows of a Ray window's median step against the "
            f"in-process windows around it (range); the phases: medians over the timed steps, in seconds "
            f"({m['utc']} UTC, commit {m['commit']})\n\n"
            + table(["model", "run", "windows x steps", "s/step, median", "overhead", "windows within +10%",
                     *(k.split("/")[1] for k in PHASES)], rows, "llrrrr" + "r" * len(PHASES)))


if __name__ == "__main__":
    raise SystemExit(main())

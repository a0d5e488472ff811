"""Steps per second with 1 vs 2 data-parallel processes (issue 6, item 2.7).

Runs the real application on benchmarks/configs/pipeline.yaml with the in-process trivial
reward (no server), synchronous mode:
- 1 process: `python -m lampo.ppo_vllm ...` with 2 torch threads;
- 2 processes: `torchrun --nproc_per_node 2 -m lampo.ppo_vllm ...` with 1 thread each (this
  machine has 2 cores; 2 x 2 threads would oversubscribe them).
Each rank rolls out `batch_size` prompts, so 2 processes train twice the conversations per
step: the figures are steps/s and conversations/s, and the ratios 2-process / 1-process.

    .venv/bin/python -m benchmarks.scaling [--steps 5] [--quick]

Writes benchmarks/results/scaling.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from benchmarks.common import ROOT, free_port, machine, model_dir, publish, span, table
from benchmarks.pipeline import describe, run_app


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    steps = 3 if args.quick else args.steps
    model_dir("tiny")
    overrides = {"reward_model": "benchmarks.rewards.VowelShare", "async_mode": "false", "max_steps": steps + 1}
    torchrun = shutil.which("torchrun", path=str(ROOT / ".venv" / "bin")) or "torchrun"
    results = {}
    for procs, prefix, threads in ((1, [sys.executable], "2"),
                                   (2, [torchrun, "--nproc_per_node", "2", "--master_port", str(free_port())], "1")):
        os.environ["OMP_NUM_THREADS"] = threads
        rows = run_app(prefix, ROOT / "build" / "bench_runs" / f"scaling_{procs}", overrides)
        r = describe(rows)
        r["conversations_per_s"] = r["steps_per_s"] * procs * 8 * 4  # batch_size 8 x num_generations 4 per rank
        results[str(procs)] = r
        print(f"{procs} process(es): {r['step_s']['median']:.2f} s/step", file=sys.stderr)
    results["steps_ratio"] = results["2"]["steps_per_s"] / results["1"]["steps_per_s"]
    results["conversations_ratio"] = results["2"]["conversations_per_s"] / results["1"]["conversations_per_s"]
    return publish("scaling", {"benchmark": "scaling", "machine": machine(), "steps": steps, "results": results},
                   render)


def render(data: dict) -> str:
    r = data["results"]
    rows = [[p, span(r[p]["step_s"]), f"{r[p]['steps_per_s']:.3f}", f"{r[p]['conversations_per_s']:.1f}"]
            for p in ("1", "2")]
    return (table(["processes", "s/step (min-max)", "steps/s", "conversations/s"], rows)
            + f"\n\n2 / 1 processes: steps/s {r['steps_ratio']:.2f}x, conversations/s {r['conversations_ratio']:.2f}x")


if __name__ == "__main__":
    raise SystemExit(main())

"""`lampo.ppo_ray` against the in-process application, side by side (issue 20, section 6).

Three comparisons through the real commands, on the benchmark config of benchmarks/pipeline.py
(the hf engine, grpo, batch 8 x 4 samples) and a reward server started here:
1. overhead: `ppo_ray` with one rollout worker, one learner, max_staleness 0 and one part per
   worker (one rollout call per batch, as in-process) against `ppo_vllm` with async_mode false, on
   the tiny and the small model, the trivial reward; beside it the same with `colocate: true`
   (engine and learner in one actor) and with the default two parts;
2. rollout workers: 1 against 2 (max_staleness 1, the tiny model, the trivial reward);
3. asynchrony: a reward model that sleeps 200 ms per call and scores one call at a time (the
   server's micro-batching merges what waits); `ppo_ray` with max_staleness 0, 1 and 2 (rewards
   streamed per part) and the in-process async run, each against the in-process synchronous run.
The runs of each comparison take turns `--rounds` times and their steps are pooled; the first
step of every run is left out (start-up, and nothing to overlap with). Start-up (for Ray: the
cluster and the actors) is reported apart: the command's wall time outside its training loop.
The overhead is paired: each round's median step against the in-process run's median in the
same round, the median of those ratios shown with their range, so that the host's drift between
rounds does not count as overhead.

    .venv/bin/python -m benchmarks.ray_pipeline [--steps 6] [--rounds 2] [--quick]
    .venv/bin/python -m benchmarks.ray_pipeline --overhead-only --sizes tiny --rounds 8 --steps 24 \
        [--layouts separate colocated two-parts]

Writes benchmarks/results/ray_pipeline.json (with `--overhead-only`: ray_overhead.json).
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import ROOT, machine, model_dir, publish, span, summary, table
from benchmarks.pipeline import CONFIG, ENV, REWARDS, RewardServer

RUNS = ROOT / "build" / "bench_runs" / "ray_pipeline"


PHASES = ("time/rollout", "time/reward", "time/forward", "time/advantages", "time/optimize", "time/weight_sync")
"""The step's timed phases (docs/metrics.md), reported beside the step."""


def app_command(module: str, out: Path, overrides: dict) -> list[str]:
    """`python -m module` on the benchmark config, writing to `out`, with `overrides` as --key=value."""
    return [sys.executable, "-m", module, "--config", str(CONFIG), f"--output_dir={out}",
            *(f"--{k}={v}" for k, v in overrides.items())]


def run_app(module: str, name: str, overrides: dict, timeout: float = 3600) -> tuple[list[dict], float]:
    """One run of `module` on the benchmark config: its metrics rows, one per step, and the seconds
    the command took outside its training loop (start-up and shut-down)."""
    out = RUNS / name
    shutil.rmtree(out, ignore_errors=True)
    began = time.perf_counter()
    proc = subprocess.run(app_command(module, out, overrides), cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)
    wall = time.perf_counter() - began
    if proc.returncode != 0:
        raise RuntimeError(f"{module} {name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "time/training" in r]
    return rows, wall - rows[-1]["time/from_scratch"]


def compare(variants: dict[str, tuple[str, dict]], steps: int, rounds: int, common: dict) -> dict:
    """Each variant (module, overrides) run `rounds` times in turn; pooled step times per variant."""
    pooled: dict[str, list[dict]] = {name: [] for name in variants}
    start: dict[str, list[float]] = {name: [] for name in variants}
    by_round: dict[str, list[float]] = {name: [] for name in variants}
    wall_by_round: dict[str, list[float]] = {name: [] for name in variants}
    for rnd in range(rounds):
        for name, (module, overrides) in variants.items():
            rows, outside = run_app(module, name.replace(" ", "_"), {**common, **overrides, "max_steps": steps + 1})
            pooled[name] += rows[1:]
            start[name].append(outside)
            by_round[name].append(statistics.median(r["time/training"] for r in rows[1:]))
            # step to step, step 7 (logging) included: with Ray the next rollout overlaps it
            wall_by_round[name].append(statistics.median(
                b["time/from_scratch"] - a["time/from_scratch"] for a, b in itertools.pairwise(rows)))
            print(f"round {rnd + 1} {name:28s} {by_round[name][-1]:.3f} s/step, {wall_by_round[name][-1]:.3f} s wall",
                  file=sys.stderr)
    return {name: {"step_s": summary([r["time/training"] for r in rows]),
                   "round_medians_s": by_round[name],
                   "round_wall_medians_s": wall_by_round[name],
                   "steps_per_s": 1.0 / statistics.median(r["time/training"] for r in rows),
                   "start_s": summary(start[name]),
                   "phases_mean_s": {k: statistics.mean(r.get(k, 0.0) for r in rows) for k in PHASES}}
            for name, rows in pooled.items()}


IN_PROCESS_SYNC = ("lampo.ppo_vllm", {"async_mode": "false"})
IN_PROCESS_ASYNC = ("lampo.ppo_vllm", {"async_mode": "true"})


def ray(staleness: int, engines: int = 1, parts: int = 2, colocate: bool = False) -> tuple[str, dict]:
    return ("lampo.ppo_ray", {"max_staleness": staleness, "num_engines": engines, "num_learners": 1,
                              "chunks_per_engine": parts, "colocate": str(colocate).lower()})


OVERHEAD_RUNS = {"ray staleness 0": ray(0, parts=1), "ray colocated": ray(0, parts=1, colocate=True),
                 "ray staleness 0, 2 parts": ray(0)}
LAYOUTS = {"separate": "ray staleness 0", "colocated": "ray colocated", "two-parts": "ray staleness 0, 2 parts"}
"""`--layouts` names of the overhead runs."""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="measured steps per run (one more runs first)")
    ap.add_argument("--rounds", type=int, default=2, help="the variants of a comparison alternate this many times")
    ap.add_argument("--quick", action="store_true", help="3 steps, 1 round, the tiny model only")
    ap.add_argument("--overhead-only", action="store_true", help="only comparison 1 (writes ray_overhead.json)")
    ap.add_argument("--sizes", nargs="+", default=["tiny", "small"], help="the models of comparison 1")
    ap.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS),
                    help="the Ray runs of comparison 1, each against the in-process run")
    args = ap.parse_args(argv)
    steps, rounds = (3, 1) if args.quick else (args.steps, args.rounds)
    sizes = ["tiny"] if args.quick else args.sizes
    results: dict[str, dict] = {}
    with RewardServer(REWARDS["trivial"]) as server:
        url = f"http://127.0.0.1:{server.port}"
        for size in sizes:
            common = {"reward_model": url, "model_name_or_path": str(model_dir(size))}
            runs = {LAYOUTS[layout]: OVERHEAD_RUNS[LAYOUTS[layout]] for layout in args.layouts}
            results[f"overhead/{size}"] = compare({"in-process sync": IN_PROCESS_SYNC, **runs}, steps, rounds, common)
        if args.overhead_only:
            return publish("ray_overhead", {"benchmark": "ray_pipeline --overhead-only", "machine": machine(),
                                            "steps": steps, "rounds": rounds, "results": results}, render)
        common = {"reward_model": url, "model_name_or_path": str(model_dir("tiny"))}
        results["engines"] = compare({"ray 1 worker": ray(1, 1), "ray 2 workers": ray(1, 2)}, steps, rounds, common)
    with RewardServer(REWARDS["sleep200ms"]) as server:
        common = {"reward_model": f"http://127.0.0.1:{server.port}", "model_name_or_path": str(model_dir("tiny"))}
        results["async_200ms"] = compare({"in-process sync": IN_PROCESS_SYNC, "in-process async": IN_PROCESS_ASYNC,
                                          "ray staleness 0": ray(0), "ray staleness 1": ray(1),
                                          "ray staleness 2": ray(2)}, steps, rounds, common)
    return publish("ray_pipeline", {"benchmark": "ray_pipeline", "machine": machine(), "steps": steps,
                                    "rounds": rounds, "results": results}, render)


def ratio(res: dict, a: str, b: str) -> float:
    """Steps per second of `a` over those of `b`."""
    return res[a]["steps_per_s"] / res[b]["steps_per_s"]


def paired_overhead(r: dict, name: str, base: str = "in-process sync", key: str = "round_medians_s") -> str:
    """The median over rounds of `name`'s median step (`key`: its `time/training`, or with
    "round_wall_medians_s" step to step) over `base`'s in the same round, minus one, with the range
    of those ratios (one round: its ratio alone). Results saved before rounds were recorded give
    the ratio of the pooled medians; before the wall was recorded, an empty cell."""
    if key not in r[base]:
        if key != "round_medians_s":
            return ""
        return f"{r[name]['step_s']['median'] / r[base]['step_s']['median'] - 1:+.1%}"
    ratios = [a / b - 1 for a, b in zip(r[name][key], r[base][key], strict=True)]
    middle = f"{statistics.median(ratios):+.1%}"
    return middle if len(ratios) == 1 else f"{middle} ({min(ratios):+.1%} to {max(ratios):+.1%})"


def render(data: dict) -> str:
    res = data["results"]
    parts = []
    rows = []
    overhead = sorted(k for k in res if k.startswith("overhead/"))
    names = [name for name in OVERHEAD_RUNS if all(name in res[k] for k in overhead)]
    for key in overhead:
        r = res[key]
        runs = [r[name] for name in names]
        rows.append([key.split("/")[1], span(r["in-process sync"]["step_s"])]
                    + [cell for name in names for cell in (span(r[name]["step_s"]), paired_overhead(r, name),
                                                           paired_overhead(r, name, key="round_wall_medians_s"))]
                    + [" / ".join(f"{x['start_s']['median']:.0f}" for x in [r["in-process sync"], *runs])])
    parts.append("Ray against in-process, one worker and one learner, on-policy (goal: at most +10% per step); "
                 "overhead: the median of the rounds' paired ratios (range), of time/training and of the wall "
                 "time from step to step\n\n"
                 + table(["model", "in-process s/step"]
                         + [h for name in names for h in (f"{name} s/step", "overhead", "wall overhead")]
                         + ["start-up s, in-process / " + " / ".join(names)], rows, "l" + "r" * (3 * len(names) + 2)))
    if "engines" not in res:  # --overhead-only
        return parts[0]
    e = res["engines"]
    parts.append("Rollout workers, max_staleness 1, tiny model\n\n" + table(
        ["workers", "s/step (min-max)", "mean time/rollout s", "steps/s vs 1 worker"],
        [[name, span(e[name]["step_s"]), f"{e[name]['phases_mean_s']['time/rollout']:.2f}",
          f"{ratio(e, name, 'ray 1 worker'):.2f}x"] for name in ("ray 1 worker", "ray 2 workers")], "lrrr"))
    a = res["async_200ms"]
    parts.append("A reward model that takes 200 ms per call (goal: async with streamed rewards at least 1.6x the steps/s "
                 "of the synchronous run)\n\n" + table(
                     ["run", "s/step (min-max)", "mean time/reward s", "steps/s vs in-process sync"],
                     [[name, span(a[name]["step_s"]), f"{a[name]['phases_mean_s']['time/reward']:.2f}",
                       f"{ratio(a, name, 'in-process sync'):.2f}x"] for name in a], "lrrr"))
    return "\n\n".join(parts)


if __name__ == "__main__":
    raise SystemExit(main())

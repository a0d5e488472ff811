"""Does bf16 learn like fp32? Reward curves of the same run in both precisions (issue 6, item 2.1).

The demo's task (the pretrained tiny chat model, the 3-turn example dataset, the "be polite"
reward scored per turn, PPO with a critic, 60 steps; see `lampo.demo`), run through the real
application (`python -m lampo.ppo_vllm`) with the reward in-process, four times: fp32 and bf16
(autocast with fp32 master weights, bf16 engine), each with seeds 0 and 1. With seeded sampling
one configuration on one seed gives the same curve every time, so "run-to-run noise" is the
spread between seeds: bf16 matches fp32 when its curve differs from fp32's on the same seed by
no more than the two fp32 seeds differ from each other.

Figures per run: mean score of the first and last 10% of steps, and the mean absolute gap
between curves (moving average over 5 steps) for bf16 vs fp32 on the same seed and fp32 seed 0
vs seed 1.

    .venv/bin/python -m benchmarks.bf16_curve [--steps 60] [--quick]

Writes benchmarks/results/bf16_curve.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

import yaml

from benchmarks.common import ROOT, machine, publish, table

RUNS = [("fp32", 0), ("fp32", 1), ("bf16", 0), ("bf16", 1)]


def run(precision: str, seed: int, steps: int, model: str, data: str, lr: float) -> list[float]:
    """One application run; its objective/scores per step."""
    from lampo.demo import DEMO_CONFIG

    out = ROOT / "build" / "bench_runs" / f"bf16curve_{precision}_s{seed}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cfg = {**DEMO_CONFIG, "model_name_or_path": model, "query_dataset": data, "output_dir": str(out),
           "reward_model": "lampo.demo.PoliteReward", "engine": "vllm", "bf16": precision == "bf16", "learning_rate": lr,
           "seed": seed, "max_steps": steps, "save_step": 0, "log_samples_steps": 0, "progress": False,
           "report_to": []}
    (out / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LAMPO_LOG_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "lampo.ppo_vllm", "--config", str(out / "cfg.yaml")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{precision} seed {seed} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["objective/scores"] for r in rows if "objective/scores" in r]


def smooth(xs: list[float], k: int = 5) -> list[float]:
    return [sum(xs[max(0, i - k + 1): i + 1]) / len(xs[max(0, i - k + 1): i + 1]) for i in range(len(xs))]


def gap(a: list[float], b: list[float]) -> float:
    """Mean absolute difference of the two smoothed curves."""
    sa, sb = smooth(a), smooth(b)
    return sum(abs(x - y) for x, y in zip(sa, sb, strict=True)) / len(sa)


def main(argv: list[str] | None = None) -> int:
    from lampo.demo import DEMO_CONFIG, write_dataset
    from lampo.testing.tiny import build_tiny_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--quick", action="store_true", help="20 steps")
    ap.add_argument("--lr", type=float, default=DEMO_CONFIG["learning_rate"], help="learning rate (the demo's)")
    args = ap.parse_args(argv)
    steps = 20 if args.quick else args.steps
    # the demo's model and data (cached under build/demo, shared with `make demo`)
    model = build_tiny_model(ROOT / "build" / "demo" / "tiny-chat-model", size="tiny", seed=0, pretrain_steps=300)
    data = write_dataset(ROOT / "build" / "bench_runs" / "bf16curve_data")
    curves = {}
    for precision, seed in RUNS:
        curves[f"{precision}/seed{seed}"] = run(precision, seed, steps, str(model), str(data), args.lr)
        c = curves[f"{precision}/seed{seed}"]
        print(f"{precision} seed {seed}: {c[0]:.2f} -> {c[-1]:.2f}", file=sys.stderr)
    k = max(1, steps // 10)
    runs = {name: {"first_10pct": sum(c[:k]) / k, "last_10pct": sum(c[-k:]) / k} for name, c in curves.items()}
    seed_gap = gap(curves["fp32/seed0"], curves["fp32/seed1"])
    bf16_gaps = {str(s): gap(curves[f"fp32/seed{s}"], curves[f"bf16/seed{s}"]) for s in (0, 1)}
    data_out = {"benchmark": "bf16_curve", "machine": machine(), "steps": steps, "lr": args.lr, "curves": curves,
                "runs": runs,
                "gap_fp32_seeds": seed_gap, "gap_bf16_vs_fp32": bf16_gaps,
                "within_noise": max(bf16_gaps.values()) <= seed_gap}
    return publish("bf16_curve", data_out, render)


def render(data: dict) -> str:
    rows = [[name, f"{r['first_10pct']:.2f}", f"{r['last_10pct']:.2f}"] for name, r in data["runs"].items()]
    g = data["gap_bf16_vs_fp32"]
    return (table(["run", "mean score, first 10% of steps", "last 10%"], rows)
            + f"\n\nMean gap between smoothed curves ({data['steps']} steps, learning rate {data['lr']:g}, "
            f"moving average of 5): bf16 vs fp32 on the same seed {g['0']:.3f} (seed 0) and {g['1']:.3f} (seed 1); "
            f"fp32 seed 0 vs seed 1 (the run-to-run noise) {data['gap_fp32_seeds']:.3f}. Within the noise: "
            f"**{'yes' if data['within_noise'] else 'no'}**.")


if __name__ == "__main__":
    raise SystemExit(main())

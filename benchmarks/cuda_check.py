"""Lampo's CUDA path, end to end, on one GPU: the check a session with a GPU runs (CI has none).

Four runs of the real application (`python -m lampo.ppo_vllm`, the `hf` engine, the benchmark
model, the vowel-share reward in-process) and one of the library API, each a few steps:

| case          | what it exercises on the GPU                                               |
|---------------|----------------------------------------------------------------------------|
| bf16-gae      | bf16 autocast, bf16 engine, a separate critic, the reference, GAE          |
| bf16-grpo     | the group estimator with shared prompts (the speed wing's KV-cache pass)   |
| fp16-grpo     | fp16 autocast with torch's GradScaler, an fp16 engine                      |
| fp32-gae-head | fp32 with the value head                                                   |
| library       | `PPOTrainer.generate` / `step` with the model the user placed on the GPU    |

Per case: did it finish, the median step time, `perf/mfu` against the peak measured on the model's
device (the run's own figure) and against the data sheet's (`--datasheet-tflops`, default the
H100/H200 SXM dense bf16 figure, 989 TFLOP/s), and the first and last mean reward.

    PYTHONPATH=src python -m benchmarks.cuda_check [--size small] [--steps 6] [--out DIR]
    python -m benchmarks.cuda_check --device cpu --steps 2     # the script itself, on a CPU (fp16 skipped)

Writes DIR/cuda_check.json (default benchmarks/results/) and prints a table. A case that fails
keeps its stderr's tail in the JSON; the other cases still run.
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

import yaml

from benchmarks.common import ROOT, machine, model_dir, table, write_messages_dataset

CASES = {
    "bf16-gae": {"bf16": True, "estimator": "gae", "value_model": "separate", "kl_coef": 0.05},
    "bf16-grpo": {"bf16": True, "estimator": "grpo", "kl_coef": 0.0},
    "fp16-grpo": {"fp16": True, "estimator": "grpo", "kl_coef": 0.0},
    "fp32-gae-head": {"estimator": "gae", "value_model": "head", "kl_coef": 0.05},
}


def app_case(name: str, overrides: dict, model: Path, data: Path, steps: int, work: Path) -> dict:
    """One application run; its per-step metrics summarised."""
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cfg = {"model_name_or_path": str(model), "query_dataset": str(data), "output_dir": str(out), "engine": "hf",
           "reward_model": "benchmarks.rewards.VowelShare", "max_prompt_len": 64, "max_new_tokens": 32,
           "num_generations": 4, "batch_size": 8, "mini_batch_size": 16, "ppo_epochs": 2, "learning_rate": 1e-5,
           "max_steps": steps, "save_step": 0, "eval_steps": 0, "log_samples_steps": 0, "logging_steps": 1,
           "non_stop_penalty": False, "report_to": [], "progress": False, "seed": 0, **overrides}
    (out / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "LAMPO_LOG_LEVEL": "WARNING",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "lampo.ppo_vllm", "--config", str(out / "cfg.yaml")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        return {"ok": False, "error": proc.stderr[-2000:]}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summarise([r for r in rows if "time/training" in r])


def summarise(rows: list[dict]) -> dict:
    """Median step time and MFU over the steps after the first (start-up), the run's peak, rewards."""
    steady = rows[1:] or rows
    mfu = statistics.median(r["perf/mfu"] for r in steady)
    flops = statistics.median(r["perf/flops_per_second"] for r in steady)
    return {"ok": True, "steps": len(rows), "step_s": statistics.median(r["time/training"] for r in steady),
            "mfu": mfu, "flops_per_second": flops, "peak_flops": flops / mfu if mfu else None,
            "first_score": rows[0]["objective/scores"], "last_score": rows[-1]["objective/scores"],
            "optimize_mfu": statistics.median(r["perf/mfu_optimize"] for r in steady)}


def library_case(model: Path, device: str, steps: int) -> dict:
    """`PPOTrainer` on a model the user moved to `device`: it must train there and hand back responses."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.rewards import vowel_share
    from lampo import PPOConfig, PPOTrainer

    tok = AutoTokenizer.from_pretrained(model)
    policy = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).to(device)
    cfg = PPOConfig(batch_size=8, mini_batch_size=8, max_new_tokens=16, estimator="gae", bf16=device == "cuda",
                    seed=0)
    trainer = PPOTrainer(cfg, policy, tok)
    chats = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
             for q in ("Why is the sky blue?", "What is an echo?")]
    queries = [torch.tensor(tok(c, add_special_tokens=False).input_ids) for c in chats] * 4
    scores = []
    for _ in range(steps):
        responses = trainer.generate(queries)
        rewards = [vowel_share(tok.decode(r)) for r in responses]
        stats = trainer.step(queries, responses, rewards)
        scores.append(sum(rewards) / len(rewards))
    devices = {p.device.type for p in trainer.learner.unwrapped_policy().parameters()}
    finite = all(isinstance(v, float) and v == v for v in stats.values())
    return {"ok": devices == {torch.device(device).type} and finite, "devices": sorted(devices),
            "first_score": scores[0], "last_score": scores[-1], "finite_stats": finite}


def render(data: dict) -> str:
    tflops = data["datasheet_tflops"]
    rows = []
    for name, r in data["cases"].items():
        if not r.get("ok"):
            rows.append([name, "**failed**", "", "", "", "", ""])
            continue
        if "mfu" not in r:  # the library case
            rows.append([name, "ok", "", "", "", "", f"{r['first_score']:.3f} -> {r['last_score']:.3f}"])
            continue
        peak = f"{r['peak_flops'] / 1e12:.1f}" if r["peak_flops"] else "-"
        rows.append([name, "ok", f"{r['step_s']:.3f}", f"{100 * r['mfu']:.2f}%", peak,
                     f"{100 * r['flops_per_second'] / (tflops * 1e12):.3f}%",
                     f"{r['first_score']:.3f} -> {r['last_score']:.3f}"])
    header = ["case", "result", "step (s, median)", "perf/mfu (measured peak)", "measured peak (TFLOP/s)",
              f"MFU vs data sheet ({tflops:g} TFLOP/s)", "reward first -> last"]
    return f"{data['device_name']}, model {data['size']}, {data['steps']} steps\n\n" + table(header, rows, "llrrrrl")


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--size", default="small", help="benchmark model size (lampo.testing.tiny.SIZES)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--datasheet-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("cuda_check: torch sees no GPU here; --device cpu checks the script itself", file=sys.stderr)
        return 2
    model = model_dir(args.size)
    data = write_messages_dataset(ROOT / "build" / "bench_runs" / "cuda_check_data")
    work = ROOT / "build" / "bench_runs" / "cuda_check"
    cases = {}
    for name, overrides in CASES.items():
        if args.device == "cpu" and overrides.get("fp16"):
            continue  # fp16 stops at start on a CPU (by design)
        cases[name] = app_case(name, overrides, model, data, args.steps, work)
        print(name, "ok" if cases[name]["ok"] else "FAILED", flush=True)
    try:
        cases["library"] = library_case(model, args.device, min(args.steps, 3))
    except Exception as exc:  # noqa: BLE001 - reported in the table, the other cases stand
        cases["library"] = {"ok": False, "error": repr(exc)}
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    result = {"machine": machine(), "device_name": device_name, "size": args.size, "steps": args.steps,
              "datasheet_tflops": args.datasheet_tflops, "cases": cases}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cuda_check.json").write_text(json.dumps(result, indent=2) + "\n")
    print(render(result))
    return 0 if all(c.get("ok") for c in cases.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())

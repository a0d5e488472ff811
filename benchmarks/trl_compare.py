"""Lampo vs TRL 1.16 GRPOTrainer, side by side on CPU (issue 6, item 2.1). A script, not a test.

Same `small` model (26.7M-parameter Llama), same 16 prompts x 4 generations, 32 new tokens,
temperature 1, one optimisation epoch with one optimiser step per batch, no reference model
(TRL beta = 0, Lampo kl_coef = 0), the same in-process reward function
(`benchmarks.rewards.vowel_share`), learning rate 1e-6, seed 0.

- TRL: `GRPOTrainer` with transformers `generate` (no vLLM), fp32.
- Lampo: the real application loop (`lampo.trainer.Trainer`, the code behind
  `python -m lampo.ppo_vllm`) with the `hf` engine, synchronous mode, fp32 and bf16 autocast
  (fp32 master weights).

Each framework runs in its own fresh process, one after the other in the same invocation:
`--warmup` steps, then `--steps` measured steps. A step is the whole RL step (generation,
reward, log-probs, optimisation, weight sync). Figures: seconds per step and trained
(completion) tokens per second, median with min and max, and the ratio to TRL fp32.

    .venv/bin/python -m benchmarks.trl_compare [--steps 5] [--warmup 1] [--quick]

Writes benchmarks/results/trl_compare.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine, model_dir, run_worker, save, summary, write_messages_dataset

PROMPTS, GROUP, NEW_TOKENS, LR = 16, 4, 32, 1e-6


# ----------------------------------------------------------------------------- TRL worker
def trl_worker(steps: int, warmup: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from benchmarks.common import QUESTIONS
    from benchmarks.rewards import vowel_share

    path = model_dir("small")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    total = steps + warmup
    # Every step draws 16 distinct prompts: repeat the 16 questions once per step.
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": q}]} for q in QUESTIONS[:PROMPTS]] * total)

    def reward(completions, **_):
        return [vowel_share(c[-1]["content"] if isinstance(c, list) else c) for c in completions]

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.lengths, self.t0 = [], [], 0.0

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                self.lengths.append(float(logs["completions/mean_length"]))

    out = tempfile.mkdtemp(prefix="lampo-bench-trl-")
    args = GRPOConfig(
        output_dir=out, per_device_train_batch_size=PROMPTS * GROUP, gradient_accumulation_steps=1,
        num_generations=GROUP, max_completion_length=NEW_TOKENS, beta=0.0, num_iterations=1,
        learning_rate=LR, max_steps=total, logging_steps=1, report_to="none", use_cpu=True, bf16=False,
        save_strategy="no", temperature=1.0, seed=0, shuffle_dataset=False, disable_dropout=True,
    )
    timer = Timer()
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=ds, processing_class=tok,
                          callbacks=[timer])
    trainer.train()
    prompt_len = [len(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False)) for q in QUESTIONS[:PROMPTS]]
    times = timer.times[warmup:]
    lengths = timer.lengths[warmup:] if len(timer.lengths) >= total else [timer.lengths[-1]] * len(times)
    tokens = [m * PROMPTS * GROUP for m in lengths]
    return {"step_s": times, "trained_tokens": tokens, "prompt_lens": prompt_len, "completion_mean": lengths}


# ----------------------------------------------------------------------------- Lampo worker
def lampo_config(folder: Path, dtype: str, steps: int, extra: dict | None = None):
    from lampo.config import LampoConfig

    keys = dict(
        model_name_or_path=str(model_dir("small")), bf16=dtype == "bf16",
        query_dataset=str(write_messages_dataset(folder / "data", PROMPTS)), max_prompt_len=128,
        engine="hf", temperature=1.0, max_new_tokens=NEW_TOKENS, num_generations=GROUP,
        reward_model="benchmarks.rewards.VowelShare",
        estimator="grpo", batch_size=PROMPTS, mini_batch_size=PROMPTS * GROUP, gradient_accumulation_steps=1,
        ppo_epochs=1, learning_rate=LR, lr_scheduler_type="constant", kl_coef=0.0,
        output_dir=str(folder / "run"), seed=0, max_steps=steps, async_mode=False, logging_steps=1,
        eval_steps=0, log_samples_steps=0, save_step=0, report_to=[],
    )
    keys.update(extra or {})
    return LampoConfig(**keys)


def lampo_worker(steps: int, warmup: int, dtype: str, extra: dict | None = None) -> dict:
    from lampo import perf
    from lampo.trainer import Trainer

    folder = Path(tempfile.mkdtemp(prefix="lampo-bench-"))
    cfg = lampo_config(folder, dtype, steps + warmup, extra)
    trainer = Trainer(cfg, cfg.to_dict())
    seq_lens: list[list[int]] = []
    train = trainer.learner.train

    def recording_train(batch):
        seq_lens.append(batch.attention_mask.sum(1).tolist())
        return train(batch)

    trainer.learner.train = recording_train
    try:
        trainer.train()
    finally:
        trainer.close()
    rows = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time/training" in r][warmup:]
    shape = perf.ModelShape.from_model(trainer.learner.unwrapped_policy())
    out = {"step_s": [], "trained_tokens": [], "phases": [], "flops": []}
    for r, lens in zip(rows, seq_lens[warmup:], strict=True):
        out["step_s"].append(r["time/training"])
        out["trained_tokens"].append(r["perf/tokens_per_second"] * r["time/training"])
        out["phases"].append({k: v for k, v in r.items() if k.startswith("time/")})
        out["flops"].append(perf.count_flops(shape, lens, ppo_epochs=1,
                                             reference=getattr(trainer.learner, "uses_reference", True)))
    return out


# ----------------------------------------------------------------------------- driver
def describe(name: str, raw: dict) -> dict:
    step = summary(raw["step_s"])
    tps = summary([t / s for t, s in zip(raw["trained_tokens"], raw["step_s"], strict=True)])
    return {"name": name, "step_s": step, "tokens_per_s": tps, "raw": raw}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="3 measured steps, no bf16 run")
    ap.add_argument("--runs", default="trl,lampo-fp32,lampo-bf16")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--extra", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker == "trl":
        print(json.dumps(trl_worker(args.steps, args.warmup)))
        return 0
    if args.worker == "lampo":
        print(json.dumps(lampo_worker(args.steps, args.warmup, args.dtype, json.loads(args.extra))))
        return 0

    steps = 3 if args.quick else args.steps
    runs = [r for r in args.runs.split(",") if not (args.quick and r == "lampo-bf16")]
    import torch

    from lampo import perf

    peaks = {f"{dt}/{kind}": perf.measure_peak(getattr(torch, dt), kind) for dt in ("float32", "bfloat16")
             for kind in ("matmul", "onednn") if kind == "matmul" or perf.onednn_linear_available()}
    results = []
    for name in runs:
        common = ["--steps", str(steps), "--warmup", str(args.warmup)]
        if name == "trl":
            raw = run_worker("benchmarks.trl_compare", ["--worker", "trl", *common])
        else:
            raw = run_worker("benchmarks.trl_compare", ["--worker", "lampo", "--dtype", name.split("-")[1], *common])
        results.append(describe(name, raw))
        print(f"{name:12s} {results[-1]['step_s']['median']:.2f} s/step  "
              f"{results[-1]['tokens_per_s']['median']:.0f} tok/s", file=sys.stderr)
    base = next((r for r in results if r["name"] == "trl"), None)
    fp32_peak = max(v for k, v in peaks.items() if k.startswith("float32"))
    for r in results:
        if base is not None:
            r["ratio_vs_trl"] = r["tokens_per_s"]["median"] / base["tokens_per_s"]["median"]
        if "flops" in r["raw"]:
            per_phase = [perf.step_mfu(ph, fl, fp32_peak) for ph, fl in zip(r["raw"]["phases"], r["raw"]["flops"],
                                                                              strict=True)]
            r["mfu_vs_fp32_peak"] = {k: summary([p[k] for p in per_phase])["median"] for k in per_phase[0]}
    data = {"benchmark": "trl_compare", "machine": machine(), "peaks_flops": peaks, "steps": steps,
            "warmup": args.warmup, "setup": {"prompts": PROMPTS, "group": GROUP, "new_tokens": NEW_TOKENS},
            "results": results}
    save("trl_compare", data)
    print(render(data))
    return 0


def render(data: dict) -> str:
    lines = ["| run | s/step median (min-max) | trained tok/s median (min-max) | vs TRL fp32 | MFU optimize |",
             "|---|---|---|---|---|"]
    for r in data["results"]:
        s, t = r["step_s"], r["tokens_per_s"]
        mfu = r.get("mfu_vs_fp32_peak", {}).get("perf/mfu_optimize")
        lines.append(f"| {r['name']} | {s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f}) | {t['median']:.0f} "
                     f"({t['min']:.0f}-{t['max']:.0f}) | {r.get('ratio_vs_trl', float('nan')):.2f}x | "
                     f"{'' if mfu is None else f'{mfu:.0%}'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())

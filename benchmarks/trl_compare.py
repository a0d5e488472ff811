"""Lampo vs TRL 1.16 GRPOTrainer, side by side on CPU (issue 6, item 2.1). A script, not a test.

Same `small` model (26.7M-parameter Llama), same 16 prompts x 4 generations, 32 new tokens,
temperature 1, one optimisation epoch with one optimiser step per batch, no reference model
(TRL beta = 0, Lampo kl_coef = 0), the same in-process reward function
(`benchmarks.rewards.vowel_share`), learning rate 1e-6, seed 0.

- trl: `GRPOTrainer` with transformers `generate` (no vLLM), fp32, in a process as TRL users run
  it. trl-tuned: the same with the process-wide settings Lampo's process has: the kept memory
  (`speed.keep_freed_memory`) and OpenMP threads bound to cores (as vLLM binds them).
- lampo-fp32 / lampo-bf16: the application's Trainer (`lampo.trainer.Trainer`, the code behind
  `python -m lampo.ppo_vllm`) with the `hf` engine, synchronous mode; bf16 = autocast with fp32
  master weights and a bf16 engine (what the trainer does with `bf16: true`). A Lampo step is the
  body of `Trainer.train` in synchronous mode, phase by phase: produce (rollout + reward),
  to_train_batch, learn (forward, advantages, optimise), sync.
  bf16 runs train with `attn_implementation: eager` (docs/performance-log.md, change 6).
- lampo-vllm-fp32 / lampo-vllm-bf16: the same with `engine: vllm` (in-process vLLM on CPU), the
  engine the product is named after. lampo-vllm-bf16-sdpa: with transformers' default attention.
  lampo-vllm-fp32-mkl: lampo-vllm-fp32 with torch's default (MKL) fp32 linear layers
  (`speed.onednn_linear: false`).
- lampo-fp32-noshare: lampo-fp32 without the shared-prompt forward (`speed.share_prefix: false`).
- lampo-fp32-before: the learner as it was before the optimisation log (docs/performance-log.md)
  (reference pass despite kl_coef 0, separate pass for the old log-probs, no shared prompts,
  MKL linear layers).

The Lampo variants live in one process and TRL in another (each TRL run in its own), and the
runs take turns step by step: TRL's step (a TrainerCallback waits for its turn), then one step
of every Lampo variant. On a machine shared with other jobs the load changes from minute to
minute; taking turns exposes every run to the same load. TRL has a process of its own so that
Lampo's process-wide settings (vLLM's OpenMP thread binding, the kept memory) do not reach it
(docs/performance-log.md, change 13, shows what they did to it in a shared process). The first
`--warmup` steps of each run are not measured. Figures: seconds per step and trained (completion)
tokens per second, median with min and max, ratio to TRL; MFU per phase from lampo.perf against
the best fp32 peak measured in the same run.

    .venv/bin/python -m benchmarks.trl_compare [--steps 5] [--warmup 1] [--quick]

Writes benchmarks/results/trl_compare.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    QUESTIONS,
    machine,
    model_dir,
    publish,
    span,
    summary,
    table,
    write_messages_dataset,
)

PROMPTS, GROUP, NEW_TOKENS, LR = 16, 4, 32, 1e-6
RUNS = ("trl,trl-tuned,lampo-fp32,lampo-bf16,lampo-vllm-fp32,lampo-vllm-bf16,lampo-vllm-bf16-sdpa,lampo-vllm-fp32-mkl,"
        "lampo-fp32-noshare,lampo-fp32-before")


def lampo_trainer(folder: Path, name: str, steps: int):
    """A Lampo application Trainer for the variant `name` (see the module docstring)."""
    from lampo.config import LampoConfig
    from lampo.trainer import Trainer

    bf16 = "bf16" in name
    attn = "eager" if bf16 and not name.endswith("-sdpa") else None
    cfg = LampoConfig(
        model_name_or_path=str(model_dir("small")), bf16=bf16, attn_implementation=attn,
        query_dataset=str(write_messages_dataset(folder / "data", PROMPTS)), max_prompt_len=128,
        engine="vllm" if "-vllm" in name else "hf", temperature=1.0, vllm_kv_cache_gb=1.0, max_new_tokens=NEW_TOKENS, num_generations=GROUP,
        reward_model="benchmarks.rewards.VowelShare", non_stop_penalty=False,
        estimator="grpo", batch_size=PROMPTS, mini_batch_size=PROMPTS * GROUP, gradient_accumulation_steps=1,
        ppo_epochs=1, learning_rate=LR, lr_scheduler_type="constant", kl_coef=0.0,
        share_prefix=not name.endswith(("-noshare", "-before")), onednn_linear=not name.endswith(("-mkl", "-before")), output_dir=str(folder / name), seed=0, max_steps=steps, async_mode=False, logging_steps=1,
        eval_steps=0, log_samples_steps=0, save_step=0, report_to=[],
    )
    trainer = Trainer(cfg, cfg.to_dict())
    if name.endswith("-before"):
        from lampo.optimize.models import build_reference

        learner = trainer.learner
        learner.uses_reference = True
        learner.ref_model = build_reference(learner.policy, cfg.model)
        learner.fuses_old_logprobs = lambda batch: False
    return trainer


def lampo_step(trainer, step: int) -> dict:
    """One synchronous step of the application loop, phase by phase, timed like Trainer.train."""
    from lampo import perf

    t_step = time.perf_counter()
    produced = trainer.produce(step)  # 1-2. rollout and reward
    batch = trainer.to_train_batch(produced)
    flops = perf.learner_step_flops(trainer.learner, batch, trainer.engine.prompt_cache_block)
    stats = trainer.learn(batch, step)  # 3-5. forward, advantages, optimise
    trainer.policy_version += 1
    t0 = time.perf_counter()
    trainer.sync()  # 6. weight sync
    stats["time/weight_sync"] = time.perf_counter() - t0
    step_s = time.perf_counter() - t_step
    phases = {k: v for k, v in {**stats, **produced.times}.items() if k.startswith("time/")}
    phases["time/training"] = step_s
    return {"step_s": step_s, "trained_tokens": float(batch.action_mask.sum()), "phases": phases, "flops": flops,
            "score": sum(float(s) for s in produced.scores) / max(len(produced.scores), 1)}


def trl_worker(conn, name: str, total: int) -> None:
    """TRL's GRPOTrainer in a process of its own, one step per turn (see `run_all`).

    `trl-tuned` first applies Lampo's allocator setting (`speed.machine.keep_freed_memory`); its threads
    are bound by `run_all`. It shows how much of the ratio is process-wide settings, which TRL
    users can have too (tcmalloc or jemalloc preloaded, OMP_PROC_BIND).
    """
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from benchmarks.rewards import vowel_share
    from lampo.speed.machine import keep_freed_memory

    if name == "trl-tuned":
        keep_freed_memory()
    print(f"{name}: pid {os.getpid()}, {torch.get_num_threads()} threads", file=sys.stderr)
    folder = Path(tempfile.mkdtemp(prefix="lampo-bench-trl-"))
    path = model_dir("small")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    # Every step draws the 16 questions (the dataset repeats them once per step).
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": q}]} for q in QUESTIONS[:PROMPTS]] * total)

    def reward(completions, **_):
        return [vowel_share(c[-1]["content"] if isinstance(c, list) else c) for c in completions]

    class TakeTurns(TrainerCallback):
        def __init__(self):
            self.t0, self.seconds, self.lengths = 0.0, None, []

        def on_step_begin(self, args, state, control, **kw):
            # Report the last step only now, once its logging is done: nothing of TRL's runs
            # while the others take their turn.
            if self.seconds is not None:
                conn.send(self.seconds)
            conn.recv()  # wait for this run's turn
            self.t0 = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                self.lengths.append(float(logs["completions/mean_length"]))

        def on_step_end(self, args, state, control, **kw):
            self.seconds = time.perf_counter() - self.t0

    args = GRPOConfig(
        output_dir=str(folder / name), per_device_train_batch_size=PROMPTS * GROUP,
        gradient_accumulation_steps=1, num_generations=GROUP, max_completion_length=NEW_TOKENS, beta=0.0,
        num_iterations=1, learning_rate=LR, max_steps=total, logging_steps=1, report_to="none", use_cpu=True,
        bf16=False, save_strategy="no", temperature=1.0, seed=0, shuffle_dataset=False, disable_dropout=True,
    )
    turns = TakeTurns()
    GRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=ds, processing_class=tok,
                callbacks=[turns]).train()
    conn.send(turns.seconds)
    conn.send(turns.lengths)  # one mean completion length per step (logged after each step's end)
    conn.close()


def run_all(runs: list[str], steps: int, warmup: int) -> dict[str, dict]:
    """Every run, taking turns step by step; returns each run's measured records.

    TRL runs in a process of its own: Lampo's process-wide settings (vLLM's OpenMP thread binding,
    `speed.keep_freed_memory`) must not reach it, so TRL runs as its users run it. The processes
    take turns (one computes while the others wait on a pipe), so every run sees the same load.
    """
    import multiprocessing as mp

    total = steps + warmup
    ctx = mp.get_context("spawn")
    workers = {}
    for name in runs:
        if name.startswith("trl"):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=trl_worker, args=(theirs, name, total), daemon=True)
            # the child inherits the environment; libgomp reads these when it loads
            binding = {"OMP_PROC_BIND": "true", "OMP_PLACES": "cores"} if name == "trl-tuned" else {}
            saved = {k: os.environ.get(k) for k in binding}
            os.environ.update(binding)
            proc.start()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k)
                else:
                    os.environ[k] = v
            workers[name] = (proc, ours)
    folder = Path(tempfile.mkdtemp(prefix="lampo-bench-"))
    lampo = {name: lampo_trainer(folder, name, total) for name in runs if name not in workers}
    records: dict[str, list[dict]] = {name: [] for name in runs}
    for step in range(total):
        for name, (proc, conn) in workers.items():
            conn.send("go")
            records[name].append({"step_s": conn.recv()})
            print(f"step {step + 1}/{total} {name:18s} {records[name][-1]['step_s']:.2f} s", file=sys.stderr)
            if step == total - 1:  # its train() has returned: let it exit before the next run's turn
                for r, length in zip(records[name], conn.recv(), strict=True):
                    r["trained_tokens"] = length * PROMPTS * GROUP
                proc.join(timeout=120)
        for name, trainer in lampo.items():
            records[name].append(lampo_step(trainer, step))
            print(f"step {step + 1}/{total} {name:18s} {records[name][-1]['step_s']:.2f} s", file=sys.stderr)
    for t in lampo.values():
        t.close()
    return {name: {k: [r[k] for r in recs[warmup:] if k in r] for k in recs[0]} for name, recs in records.items()}


def describe(name: str, raw: dict, peak: float) -> dict:
    from lampo import perf

    out = {"name": name, "step_s": summary(raw["step_s"]),
           "tokens_per_s": summary([t / s for t, s in zip(raw["trained_tokens"], raw["step_s"], strict=True)]),
           "raw": raw}
    if raw.get("flops"):
        mfu = [perf.step_mfu(ph, fl, peak) for ph, fl in zip(raw["phases"], raw["flops"], strict=True)]
        out["mfu_vs_fp32_peak"] = {k: summary([m[k] for m in mfu if k in m])["median"] for k in mfu[0]}
        out["phases_median_s"] = {k: summary([p[k] for p in raw["phases"]])["median"] for k in raw["phases"][0]}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="measured steps per run")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="3 measured steps, TRL and Lampo's vLLM fp32/bf16 only")
    ap.add_argument("--runs", default=RUNS, help=f"comma-separated subset of {RUNS}")
    ap.add_argument("--name", default="trl_compare", help="results file name (benchmarks/results/NAME.json)")
    args = ap.parse_args(argv)
    steps = 3 if args.quick else args.steps
    runs = ["trl", "lampo-vllm-fp32", "lampo-vllm-bf16"] if args.quick else args.runs.split(",")
    import torch

    from lampo.speed.machine import measure_peak, onednn_linear_available

    def measure_peaks() -> dict[str, float]:
        return {f"{dt}/{kind}": measure_peak(getattr(torch, dt), kind) for dt in ("float32", "bfloat16")
                for kind in ("matmul", "onednn") if kind == "matmul" or onednn_linear_available()}

    peaks_start = measure_peaks()
    load = os.getloadavg()[0]
    raw = run_all(runs, steps, args.warmup)
    # Measured before and after the run, the larger kept: a neighbour's burst during one
    # measurement only ever lowers it.
    peaks_end = measure_peaks()
    peaks = {k: max(v, peaks_end[k]) for k, v in peaks_start.items()}
    fp32_peak = max(v for k, v in peaks.items() if k.startswith("float32"))
    results = [describe(name, raw[name], fp32_peak) for name in runs]
    bases = {r["name"]: r["tokens_per_s"]["median"] for r in results if r["name"].startswith("trl")}
    for r in results:
        if "trl" in bases:
            r["ratio_vs_trl"] = r["tokens_per_s"]["median"] / bases["trl"]
        if "trl-tuned" in bases:
            r["ratio_vs_trl_tuned"] = r["tokens_per_s"]["median"] / bases["trl-tuned"]
    # The load at the start and at the end: other tenants of the machine come and go during a run.
    data = {"benchmark": "trl_compare",
            "machine": {**machine(), "load_avg_1m": load, "load_avg_1m_end": os.getloadavg()[0]}, "peaks_flops": peaks,
            "peaks_flops_start": peaks_start, "peaks_flops_end": peaks_end,
            "steps": steps, "warmup": args.warmup, "trl_process": "own",
            "setup": {"prompts": PROMPTS, "group": GROUP, "new_tokens": NEW_TOKENS, "lr": LR}, "results": results}
    return publish(args.name, data, render)


def render(data: dict) -> str:
    rows = []
    for r in data["results"]:
        mfu, ph = r.get("mfu_vs_fp32_peak", {}), r.get("phases_median_s", {})
        rows.append([r["name"], span(r["step_s"]), span(r["tokens_per_s"], ".0f"),
                     f"{r.get('ratio_vs_trl', float('nan')):.2f}x",
                     *(f"{ph[k]:.1f}" if k in ph else "" for k in ("time/rollout", "time/optimize")),
                     *(f"{mfu[k]:.0%}" if k in mfu else "" for k in ("perf/mfu_optimize", "perf/mfu"))])
    lines = [table(["run", "s/step median (min-max)", "trained tok/s median (min-max)", "vs TRL", "rollout s",
                    "optimize s", "MFU optimize", "MFU step"], rows)]
    tuned = [f"{r['name']} {r['ratio_vs_trl_tuned']:.2f}x" for r in data["results"]
             if "ratio_vs_trl_tuned" in r and not r["name"].startswith("trl")]
    if tuned:
        lines.append("\nAgainst trl-tuned (TRL with the kept memory and bound threads of Lampo's process): "
                     + ", ".join(tuned) + ".")
    p = data.get("peaks_flops", {})
    if p:
        lines.append("\nMFU against the best fp32 peak measured in the same run: "
                     + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in p.items()) + ".")
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())

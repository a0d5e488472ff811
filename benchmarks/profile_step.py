"""Where a Lampo GRPO step spends its time: torch.profiler over one Learner.train call (no rollout)
on the small model, with the trl_compare setup (64 sequences, 32 new tokens, one epoch, kl_coef 0).

    .venv/bin/python -m benchmarks.profile_step [--bf16] [--kl 0.05] [--rows 25]

Prints the top operators by self CPU time and writes benchmarks/results/profile_step[_bf16].txt.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import QUESTIONS, RESULTS, model_dir


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lampo import PPOConfig, PPOTrainer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--kl", type=float, default=0.0)
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args(argv)
    path = model_dir("small")
    tok = AutoTokenizer.from_pretrained(path)
    # bf16 with eager attention, as the trl_compare bf16 runs (the library takes the model as given)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 attn_implementation="eager" if args.bf16 else "sdpa")
    cfg = PPOConfig(batch_size=16, num_generations=4, estimator="grpo", mini_batch_size=64, max_new_tokens=32,
                    kl_coef=args.kl, bf16=args.bf16, non_stop_penalty=False, seed=0)
    trainer = PPOTrainer(cfg, model, tok)
    gen = torch.Generator().manual_seed(0)
    # 16 questions x 4 answers, groups contiguous (as the trainer builds them)
    queries = [torch.tensor(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                    tokenize=True, return_dict=False))
               for q in QUESTIONS[:16] for _ in range(4)]
    responses = [torch.randint(4, 1024, (32,), generator=gen) for _ in range(64)]
    scores = torch.rand(64, generator=gen).tolist()
    trainer.step(queries, responses, scores)  # warm-up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        stats = trainer.step(queries, responses, scores)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows)
    phases = {k: round(v, 3) for k, v in stats.items() if k.startswith("time/")}
    text = f"phases (s, under the profiler): {phases}\n\n{table}\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"profile_step{'_bf16' if args.bf16 else ''}{'_kl' if args.kl else ''}.txt").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Peak resident memory: full fine-tuning vs LoRA on the small model (issue 6, item 2.6).

Each variant runs in a fresh process: load the 26.7M-parameter model, build Lampo's
PPOTrainer (library API) with a reference model in use (kl_coef 0.05), run two PPO steps on 64
sequences of 32 new tokens in micro-batches of 8, and report the process's peak RSS (`ru_maxrss`). With LoRA the
reference is the base model with the adapter disabled, so no second copy of the weights
exists (`learner.ref_model is None`); full fine-tuning holds a frozen reference copy, plus
gradients and two AdamW moments of every weight.

    .venv/bin/python -m benchmarks.memory

Writes benchmarks/results/memory.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys

from benchmarks.common import machine, model_dir, publish, run_worker, table


def worker(lora: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lampo import PPOConfig, PPOTrainer

    path = model_dir("small")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # Micro-batches of 8 sequences (64 / 8 accumulation steps): with one micro-batch of 64 the
    # activations (about 2 GB) hide what LoRA changes, the weights' copies and optimiser state.
    cfg = PPOConfig(batch_size=16, num_generations=4, estimator="grpo", mini_batch_size=64, max_new_tokens=32,
                    gradient_accumulation_steps=8,
                    kl_coef=0.05, use_peft=lora, lora_r=16, non_stop_penalty=False, seed=0)
    trainer = PPOTrainer(cfg, model, tok)
    q = [torch.tensor(tok.apply_chat_template([{"role": "user", "content": f"Question {i}?"}],
                                              add_generation_prompt=True, tokenize=True, return_dict=False))
         for i in range(64)]
    for _ in range(2):
        responses = trainer.generate(q)
        trainer.step(q, responses, [0.5] * 64)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "after_load_mb": loaded,
            "reference_copy": trainer.learner.ref_model is not None, "trainable_params": trainable}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", choices=["full", "lora"], help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="(same as the full run: two steps)")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker == "lora")))
        return 0
    results = {v: run_worker("benchmarks.memory", ["--worker", v]) for v in ("full", "lora")}
    results["lora_over_full"] = results["lora"]["peak_rss_mb"] / results["full"]["peak_rss_mb"]
    return publish("memory", {"benchmark": "memory", "machine": machine(), "results": results}, render)


def render(data: dict) -> str:
    r = data["results"]
    rows = [[v, f"{r[v]['peak_rss_mb']:.0f}", f"{r[v]['after_load_mb']:.0f}", r[v]["reference_copy"],
             f"{r[v]['trainable_params']:,}"] for v in ("full", "lora")]
    return (table(["variant", "peak RSS MB", "RSS after loading MB", "reference copy", "trainable params"], rows)
            + f"\n\nLoRA / full peak RSS: {r['lora_over_full']:.2f}")


if __name__ == "__main__":
    sys.exit(main())

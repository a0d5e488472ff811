"""`lampo demo | train | reward-server | tiny-model | plot | config | data-stats`."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="lampo", description="RL fine-tuning of language models (PPO, GRPO).")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="build a tiny model, start a reward server, train, show the result")
    demo.add_argument("--max-steps", type=int, default=None,
                      help="training steps (default: the demo's 60); fewer for a quick smoke run")
    demo.add_argument("--engine", choices=["auto", "hf", "vllm"], default=None,
                      help="rollout engine (default auto: vLLM when installed)")
    demo.add_argument("--pretrain-steps", type=int, default=300,
                      help="supervised warm-up steps of the tiny chat model (fewer for a quick smoke run)")
    sub.add_parser("train", help="train: lampo train --config cfg.yaml [--key value ...] (= python -m lampo.ppo_vllm)",
                   add_help=False)
    sub.add_parser("reward-server", help="= python -m lampo.reward_server", add_help=False)
    tiny = sub.add_parser("tiny-model", help="build an offline random model + ChatML tokenizer (Llama by default)")
    tiny.add_argument("out_dir")
    tiny.add_argument("--arch", default="llama",
                      help="model family: llama (default), llama-tied, qwen2, qwen3, mistral, gemma2, gpt2 "
                           "(lampo.testing.FAMILIES, docs/models.md)")
    tiny.add_argument("--size", choices=["tiny", "small"], default="tiny")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--kind", choices=["causal-lm", "classifier"], default="causal-lm")
    tiny.add_argument("--overwrite", action="store_true")
    plot = sub.add_parser("plot", help="draw reward, KL, entropy, loss and step time of a run into a PNG")
    plot.add_argument("run_dir")
    sub.add_parser("config", help="print the resolved config (--config F, overrides) or --docs", add_help=False)
    sub.add_parser("data-stats", help="token lengths of a dataset: lampo data-stats DATASET --tokenizer NAME "
                   "[--max-prompt-len N]", add_help=False)

    args, rest = parser.parse_known_args(argv)
    if args.command == "train":
        from lampo.ppo_vllm import main as train_main

        return train_main(rest)
    if args.command == "reward-server":
        from lampo.reward_server import main as server_main

        return server_main(rest) or 0
    if args.command == "config":
        from lampo.config import main as config_main

        return config_main(rest)
    if args.command == "data-stats":
        from lampo.data.stats import main as stats_main

        return stats_main(rest)
    if rest:
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    if args.command == "demo":
        from lampo.demo import run_demo

        overrides = {k: v for k, v in (("max_steps", args.max_steps), ("engine", args.engine)) if v is not None}
        return run_demo(overrides, pretrain_steps=args.pretrain_steps)
    if args.command == "tiny-model":
        from lampo.testing.tiny import FAMILIES, build_tiny_model, num_parameters

        if args.arch not in FAMILIES:
            parser.error(f"argument --arch: {args.arch!r} is not a model family; choose from {', '.join(FAMILIES)}")
        path = build_tiny_model(args.out_dir, size=args.size, seed=args.seed, kind=args.kind, overwrite=args.overwrite,
                                arch=args.arch)
        print(f"{args.arch} {args.kind} model ({args.size}, {num_parameters(path):,} parameters) in {path}")
        return 0
    if args.command == "plot":
        from lampo.plot import plot_run

        print(plot_run(args.run_dir))
        return 0
    return 1


if __name__ == "__main__":
    raise SystemExit(main())

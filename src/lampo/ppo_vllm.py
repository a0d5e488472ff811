"""`accelerate launch -m lampo.ppo_vllm --config cfg.yaml [--key value ...]` (or `python -m ...`).

The training application: reads the YAML config (or a PaddleNLP argument file, `.json`:
lampo.compat.paddlenlp), applies command-line overrides, and runs the Trainer (rollout with vLLM
or transformers, reward server, PPO/GRPO optimisation).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lampo.config import ConfigError, load_config, parse_overrides, read_yaml


def main(argv: list[str] | None = None, prog: str = "python -m lampo.ppo_vllm", runner: str = "lampo.trainer") -> int:
    """Parse the command line, load the config and hand it to `runner`'s `run(cfg, raw)`."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Train a policy with PPO/GRPO. Any config key can follow as --key value.",
    )
    parser.add_argument("--config", help="YAML config file (see docs/config.md), or a PaddleNLP argument "
                        "file (.json, see docs/compat.md)")
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.config is None and overrides and overrides[0].endswith(".json"):
        args.config = overrides.pop(0)  # PaddleNLP's run_ppo.py takes its argument file first, unnamed
    try:
        if args.config and args.config.endswith(".json"):
            from lampo.compat.paddlenlp import load_argument_file

            cfg = load_argument_file(args.config, parse_overrides(overrides))
            raw = cfg.to_dict()  # the reward model's settings, as the file's keys mean them
        else:
            cfg = load_config(args.config, overrides)
            raw = read_yaml(args.config) if args.config else {}
    except ConfigError as exc:
        print(f"lampo: {exc}", file=sys.stderr)
        return 2
    return importlib.import_module(runner).run(cfg, raw or {})


if __name__ == "__main__":
    raise SystemExit(main())

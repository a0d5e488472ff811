"""`accelerate launch -m lampo.ppo_vllm --config cfg.yaml [--key value ...]` (or `python -m ...`).

The training application: reads the YAML config, applies command-line overrides, and runs
the Trainer (rollout with vLLM or transformers, reward server, PPO/GRPO optimisation).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lampo.config import ConfigError, load_config, read_yaml


def main(argv: list[str] | None = None, prog: str = "python -m lampo.ppo_vllm", runner: str = "lampo.trainer") -> int:
    """Parse the command line, load the config and hand it to `runner`'s `run(cfg, raw)`."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Train a policy with PPO/GRPO. Any config key can follow as --key value.",
    )
    parser.add_argument("--config", help="YAML config file (see docs/config.md)")
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"lampo: {exc}", file=sys.stderr)
        return 2
    raw = read_yaml(args.config) if args.config else {}
    return importlib.import_module(runner).run(cfg, raw or {})


if __name__ == "__main__":
    raise SystemExit(main())

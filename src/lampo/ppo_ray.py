"""`python -m lampo.ppo_ray --config cfg.yaml [--key value ...]`: the training application on Ray.

The same config file as `lampo.ppo_vllm`, plus the `ray` section: rollout workers (one vLLM
engine each) and a learner group as Ray actors, weights through the object store, up to
`max_staleness` batches rolled out ahead. A local cluster by default; `--address auto` joins
the one `ray start` made. See docs/ray.md.
"""

from __future__ import annotations

from lampo.ppo_vllm import main as _main


def main(argv: list[str] | None = None) -> int:
    return _main(argv, prog="python -m lampo.ppo_ray", runner="lampo.distributed.ray.driver")


if __name__ == "__main__":
    raise SystemExit(main())

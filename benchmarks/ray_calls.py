"""One Ray actor call with a training batch, torch tensors against `lampo.distributed.ray.wire`.

A local cluster as `lampo.ppo_ray` starts it (loopback, 2 CPUs), one actor. Each call sends a
`TrainBatch` of 32 rows x T tokens to the actor (as the driver sends a learner its part), or
gets one back (as a rollout worker returns its part): its tensors as they are, or packed by
`to_wire` and unpacked by `from_wire` on arrival (included in the time). The variants take
turns call by call; the figure is the median round trip at the driver, beside an empty call.

    .venv/bin/python -m benchmarks.ray_calls [--calls 60]

Writes benchmarks/results/ray_calls.json.
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import sys
import time

import torch

from benchmarks.common import machine, publish, table
from lampo.config import LampoConfig
from lampo.distributed.ray.wire import from_wire, to_wire
from lampo.optimize.batch import TrainBatch

LENGTHS = (110, 400)
"""Tokens per row: the tiny model's benchmark batch, and a longer one."""


def batch(length: int, rows: int = 32) -> TrainBatch:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (rows, length), generator=gen)
    return TrainBatch(input_ids=ids, attention_mask=torch.ones_like(ids), action_mask=ids > 500,
                      placed_scores=torch.rand(rows, length, generator=gen), seq_scores=torch.rand(rows, generator=gen),
                      stopped=torch.ones(rows, dtype=torch.bool), group_size=4,
                      engine_logprobs=-torch.rand(rows, length, generator=gen))


class Echo:
    """The actor: takes a batch (unpacking it when packed), or hands one back."""

    def __init__(self):
        self.batches = {length: batch(length) for length in LENGTHS}

    def take(self, value) -> int:
        return len(from_wire(value)) if value is not None else 0

    def give(self, length: int, packed: bool):
        return to_wire(self.batches[length]) if packed else self.batches[length]


def main(argv: list[str] | None = None) -> int:
    import ray

    from lampo.distributed.ray.cluster import connect

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=60, help="timed calls per variant (5 more run first)")
    args = ap.parse_args(argv)
    connect(LampoConfig().ray, 1)
    try:
        actor = ray.remote(num_cpus=1)(Echo).remote()
        ray.get(actor.take.remote(None))
        variants = {"empty call": lambda: ray.get(actor.take.remote(None))}
        for length in LENGTHS:
            b = batch(length)
            variants[f"send T={length}, torch"] = lambda b=b: ray.get(actor.take.remote(b))
            variants[f"send T={length}, wire"] = lambda b=b: ray.get(actor.take.remote(to_wire(b)))
            variants[f"receive T={length}, torch"] = lambda n=length: ray.get(actor.give.remote(n, False))
            variants[f"receive T={length}, wire"] = lambda n=length: from_wire(ray.get(actor.give.remote(n, True)))
        times: dict[str, list[float]] = {name: [] for name in variants}
        for k in range(args.calls + 5):
            for name, call in variants.items():
                t0 = time.perf_counter()
                call()
                if k >= 5:
                    times[name].append(time.perf_counter() - t0)
    finally:
        ray.shutdown()
    sizes = {length: len(pickle.dumps(batch(length))) for length in LENGTHS}
    results = {name: {"median_ms": 1000 * statistics.median(t), "min_ms": 1000 * min(t)} for name, t in times.items()}
    return publish("ray_calls", {"benchmark": "ray_calls", "machine": machine(), "calls": args.calls,
                                 "pickled_bytes": sizes, "results": results}, render)


def render(data: dict) -> str:
    r = data["results"]
    rows = [[name, f"{x['median_ms']:.2f}", f"{x['min_ms']:.2f}"] for name, x in r.items()]
    ratios = [f"{name.removesuffix(', torch')}: torch / wire {r[name]['median_ms'] / r[name.replace('torch', 'wire')]['median_ms']:.2f}x"
              for name in r if name.endswith("torch")]
    sizes = ", ".join(f"T={n}: {b / 1024:.0f} KiB" for n, b in data["pickled_bytes"].items())
    return ("One Ray actor call with a TrainBatch of 32 rows (pickled: " + sizes + ")\n\n"
            + table(["call", "median ms", "min ms"], rows, "lrr") + "\n\n" + "; ".join(ratios))


if __name__ == "__main__":
    sys.exit(main())

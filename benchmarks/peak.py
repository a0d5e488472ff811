"""This machine's matmul peak (issue 6, item 2.5): 2048 x 2048 products, fp32 and bf16, with
torch.matmul (default kernels) and oneDNN's prepacked linear. A script, not a test.

    .venv/bin/python -m benchmarks.peak

Writes benchmarks/results/peak.json (FLOP/s, the median of 5 products after a warm-up).
"""

from __future__ import annotations

import sys

import torch

from benchmarks.common import machine, publish, table
from lampo.speed.machine import measure_peak, onednn_linear_available


def measure() -> dict[str, float]:
    out = {}
    for dt in ("float32", "bfloat16"):
        for kind in ("matmul", "onednn"):
            if kind == "onednn" and not onednn_linear_available():
                continue
            out[f"{dt}/{kind}"] = measure_peak(getattr(torch, dt), kind)
    return out


def main(argv: list[str] | None = None) -> int:
    return publish("peak", {"benchmark": "peak", "machine": machine(), "peaks_flops": measure()}, render)


def render(data: dict) -> str:
    return table(["dtype / kernels", "GFLOP/s"], [[k, f"{v / 1e9:.0f}"] for k, v in data["peaks_flops"].items()])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

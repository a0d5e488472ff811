"""The optimisers and learning-rate schedules of the policy and the critic."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


def make_optimizer(param_groups: list[dict], lr: float, weight_decay: float, eps: float) -> torch.optim.AdamW:
    """AdamW over `param_groups` (each may carry its own "lr")."""
    # fused AdamW is a single kernel per step on CPU and GPU (torch >= 2.4)
    return torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay, eps=eps, fused=True)


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup_ratio: float, total_steps: int):
    """The LambdaLR schedule of `optimizer`: one factor for every parameter group (each keeps its own rate)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(schedule, warmup_ratio, total_steps))


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def lr_schedule(kind: str, warmup_ratio: float, total_steps: int) -> Callable[[int], float]:
    """The learning rate's factor at each step: linear warm-up from 0 over `warmup_ratio` of the
    steps, then constant, linear decay to 0 or cosine decay to 0 over the rest."""
    warmup = int(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        progress = min(max(progress, 0.0), 1.0)
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor

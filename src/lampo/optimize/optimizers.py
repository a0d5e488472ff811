"""The optimisers and learning-rate schedules of the policy and the critic."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def make_optimizer(param_groups: list[dict], lr: float, weight_decay: float, eps: float) -> torch.optim.AdamW:
    """AdamW over `param_groups`; a group may carry its own "lr", "weight_decay" and "schedule"
    (`make_scheduler` reads it; the optimiser keeps it with the group, through strategies and checkpoints)."""
    # fused AdamW is a single kernel per step on CPU and GPU (torch >= 2.4)
    return torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay, eps=eps, fused=True)


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup_ratio: float, total_steps: int):
    """The LambdaLR schedule of `optimizer`: one factor per parameter group (each keeps its own rate),
    from the group's "schedule" `(kind, warmup_ratio, floor)` when it has one, else from the arguments."""
    factors = []
    for group in optimizer.param_groups:
        kind, warmup, floor = group.get("schedule") or (schedule, warmup_ratio, 0.0)
        factors.append(lr_schedule(kind, warmup, total_steps, floor))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


def policy_group(config: Any, params: list[nn.Parameter]) -> dict:
    """The policy's parameter group: learning rate, weight decay and schedule (with its floor) from the config."""
    opt = config.optim
    floor = opt.min_learning_rate / opt.learning_rate
    return {"params": params, "lr": opt.learning_rate, "weight_decay": opt.weight_decay,
            "schedule": (opt.lr_scheduler_type, opt.warmup_ratio, floor)}


def critic_group(config: Any, params: list[nn.Parameter]) -> dict:
    """The critic's parameter group (a value head's or a value model's): its `critic_*` keys, each
    falling back to the policy's (PaddleNLP gives the critic its own optimiser settings)."""
    opt = config.optim
    lr = config.critic_learning_rate
    if opt.critic_min_learning_rate is not None:
        floor = opt.critic_min_learning_rate / lr
    else:
        floor = opt.min_learning_rate / opt.learning_rate
    decay = opt.weight_decay if opt.critic_weight_decay is None else opt.critic_weight_decay
    kind = opt.critic_lr_scheduler_type or opt.lr_scheduler_type
    warmup = opt.warmup_ratio if opt.critic_warmup_ratio is None else opt.critic_warmup_ratio
    return {"params": params, "lr": lr, "weight_decay": decay, "schedule": (kind, warmup, floor)}


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def lr_schedule(kind: str, warmup_ratio: float, total_steps: int, floor: float = 0.0) -> Callable[[int], float]:
    """The learning rate's factor at each step: linear warm-up from 0 over `warmup_ratio` of the
    steps, then constant, or linear or cosine decay from 1 to `floor` over the rest (PaddleNLP's
    min_learning_rate is such a floor)."""
    warmup = int(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        progress = min(max(progress, 0.0), 1.0)
        if kind == "linear":
            decay = 1.0 - progress
        else:
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        return floor + (1.0 - floor) * decay

    return factor

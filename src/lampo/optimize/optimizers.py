"""The optimisers and learning-rate schedules of the policy and the critic."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Schedule:
    """One learning-rate schedule: its kind, its warm-up share of the run and the floor its decay ends at."""

    kind: str
    warmup_ratio: float
    floor: float = 0.0
    """The factor (share of the peak learning rate) that linear and cosine decay end at."""


def make_optimizer(param_groups: list[dict], lr: float, weight_decay: float, eps: float, schedule: str,
                   warmup_ratio: float, total_steps: int):
    """AdamW over `param_groups` and its LambdaLR schedule.

    A group may carry its own "lr" and "weight_decay" (AdamW reads them) and its own "schedule"
    (a `Schedule`); the other arguments are the defaults of groups that do not.
    """
    default = Schedule(schedule, warmup_ratio)
    groups = [{k: v for k, v in g.items() if k != "schedule"} for g in param_groups]
    schedules = [g.get("schedule", default) for g in param_groups]
    # fused AdamW is a single kernel per step on CPU and GPU (torch >= 2.4)
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, eps=eps, fused=True)
    factors = [lr_schedule(s.kind, s.warmup_ratio, total_steps, s.floor) for s in schedules]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
    return optimizer, scheduler


def policy_group(config: Any, params: list[nn.Parameter]) -> dict:
    """The policy's parameter group: learning rate, weight decay and schedule from the config."""
    opt = config.optim
    floor = opt.min_learning_rate / opt.learning_rate
    return {"params": params, "lr": opt.learning_rate, "weight_decay": opt.weight_decay,
            "schedule": Schedule(opt.lr_scheduler_type, opt.warmup_ratio, floor)}


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
    return {"params": params, "lr": lr, "weight_decay": decay, "schedule": Schedule(kind, warmup, floor)}


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

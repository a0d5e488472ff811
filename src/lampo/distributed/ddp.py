"""Data parallel through accelerate: each trained model in DistributedDataParallel.

`accelerate launch` with a MULTI_GPU or MULTI_CPU config (configs/accelerate/multi_cpu_2proc.yaml),
or `torchrun`. Gradients are all-reduced inside the backward of a minibatch's last micro-batch;
the earlier ones run under DDP's `no_sync`.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from lampo.distributed.strategy import DistributedStrategy, TrainedModels


class AccelerateDDP(DistributedStrategy):
    def __init__(self, accelerator):
        self.acc = accelerator

    def training_device(self, policy: nn.Module | None = None) -> torch.device:
        return self.acc.device

    def prepare(self, models: TrainedModels, config) -> TrainedModels:
        acc = self.acc
        policy, optimizer = acc.prepare(models.policy, models.optimizer)
        value_model, critic_optimizer = models.value_model, models.critic_optimizer
        if value_model is not None:
            value_model, critic_optimizer = acc.prepare(value_model, critic_optimizer)
        value_head = acc.prepare(models.value_head) if models.value_head is not None else None
        ref_model = acc.prepare_model(models.ref_model, evaluation_mode=True) if models.ref_model is not None else None
        prepared = TrainedModels(policy, value_model, value_head, ref_model, optimizer, critic_optimizer)
        # the loss scaler is made for the device accelerate moved the models to
        return super().prepare(prepared, config)

    def backward(self, loss, finite: bool) -> None:
        # As DistributedStrategy.backward: every rank runs every backward (DDP all-reduces in it).
        self.acc.backward(self._scaled(loss))

    def no_sync(self, skip: bool):
        if not skip:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        for m in (self.models.policy, self.models.value_model):
            if m is not None:
                stack.enter_context(self.acc.no_sync(m))
        return stack

    def unwrap(self, model: nn.Module) -> nn.Module:
        return self.acc.unwrap_model(model)

    def close(self) -> None:
        self.acc.end_training()

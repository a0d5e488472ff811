"""The seam between plain PPO and the processes it runs on.

The learner computes losses. How a micro-batch's loss becomes a gradient, and a minibatch's
gradient a step, differs between one process, data parallel and DeepSpeed ZeRO; the learner
leaves all of that to a Strategy:

  training_device(policy)       the device the learner trains on
  prepare(models, config)       wrap the trained models and optimisers (once), on that device
  forward(fn, *args)            run `fn`, which calls the models, as one forward pass of them
  token_normaliser(n)           what a minibatch's token-mean loss divides by (n: this rank's tokens)
  no_sync(skip)                 around each micro-batch; skip: not the minibatch's last one
  backward(loss, finite)        one micro-batch's backward; gradients accumulate
  step(finite)                  clip at max_grad_norm and apply the minibatch, or skip it whole
  zero_grad()
  state_dict(), load_state_dict(state)       optimiser state that rank 0 saves
  save_shards(dir), load_shards(checkpoint)  state that every rank saves (ZeRO's partitions)
  unwrap(model), full_weights(*models)       the plain module; all its parameters present

and for the trainer, the run's processes: `rank`, `world`, `reduce`, `barrier`,
`broadcast_object`, `close`.

`Strategy` is the single-process path (optionally with fp16 loss scaling). `DistributedStrategy`
adds the process-level operations over torch.distributed's default group; `ddp.py` and
`deepspeed.py` build on it.
"""

from __future__ import annotations

import contextlib
import enum
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


class StepOutcome(enum.Enum):
    """What `Strategy.step` did with a minibatch."""

    APPLIED = "applied"
    NON_FINITE = "non_finite"
    """Skipped: a loss or a gradient was not finite on some rank. A bad step (see max_bad_steps)."""
    LOSS_SCALE = "loss_scale"
    """Skipped by the fp16 loss scaler: the scaled gradient overflowed and the scale was lowered.
    The scaler's normal way of finding its scale, not a bad step."""


@dataclass
class TrainedModels:
    """The learner's models and optimisers, as it builds them and as `Strategy.prepare` returns them.

    optimizer covers the policy (and the value head); critic_optimizer the separate value model.
    A strategy may return one optimiser for all of them (DeepSpeed), with critic_optimizer None.
    """

    policy: nn.Module
    value_model: nn.Module | None
    value_head: nn.Module | None
    ref_model: nn.Module | None
    optimizer: torch.optim.Optimizer
    critic_optimizer: torch.optim.Optimizer | None

    def trained(self) -> list[nn.Module]:
        return [m for m in (self.policy, self.value_model, self.value_head) if m is not None]

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.optimizer, self.critic_optimizer) if o is not None]


class Strategy:
    """One process: plain backward, torch's clipping, the optimisers' own steps.

    With fp16 a `torch.amp.GradScaler` scales each loss before its backward and unscales the
    minibatch's gradients before clipping (torch's AMP recipe, one scaler for both optimisers).
    """

    rank = 0
    world = 1
    saves_weights = False
    """Whether `save_shards` also holds the trained weights (DeepSpeed's engine checkpoint)."""

    def training_device(self, policy: nn.Module | None = None) -> torch.device:
        """Where the models train: a policy already on an accelerator stays there (the library's
        users place their own models); otherwise this process's GPU when there is one, else the CPU."""
        if policy is not None:
            device = next(policy.parameters()).device
            if device.type != "cpu":
                return device
        return local_device()

    def prepare(self, models: TrainedModels, config) -> TrainedModels:
        self.models = models
        self.max_grad_norm = config.optim.max_grad_norm
        device = self.training_device(models.policy)
        for model in (models.policy, models.value_model, models.value_head, models.ref_model):
            if model is not None:
                model.to(device)  # in place: the optimisers keep their parameters
        self.scaler = None
        if config.model.fp16:
            self.scaler = torch.amp.GradScaler(device.type)
        return models

    # ------------------------------------------------------------------ the learner's seam
    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)

    def token_normaliser(self, num_tokens: float) -> float:
        return num_tokens

    def no_sync(self, skip: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, finite: bool) -> None:
        if finite:
            self._scaled(loss).backward()

    def step(self, finite: bool) -> StepOutcome:
        """Clip the minibatch's gradient at max_grad_norm over all trained models and apply it.

        Weights and optimiser state stay untouched when the loss or the gradient norm is not
        finite; with fp16 an overflowing gradient (finite loss) is the loss scaler's to skip.
        """
        if not finite:
            return StepOutcome.NON_FINITE
        optimizers = self.models.optimizers()
        if self.scaler is not None:
            for opt in optimizers:
                self.scaler.unscale_(opt)
        applied = math.isfinite(self._clip())
        if self.scaler is not None:
            if applied:
                for opt in optimizers:
                    self.scaler.step(opt)
            self.scaler.update()  # lowers the scale after an overflow, raises it after a long run without
            return StepOutcome.APPLIED if applied else StepOutcome.LOSS_SCALE
        if applied:
            for opt in optimizers:
                opt.step()
        return StepOutcome.APPLIED if applied else StepOutcome.NON_FINITE

    def zero_grad(self) -> None:
        for opt in self.models.optimizers():
            opt.zero_grad(set_to_none=True)

    def loss_scale(self) -> float | None:
        """The fp16 loss scale, or None without one."""
        return float(self.scaler.get_scale()) if self.scaler is not None else None

    def _scaled(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def _clip(self) -> float:
        params = [p for m in self.models.trained() for p in m.parameters() if p.requires_grad and p.grad is not None]
        if not params:
            return 0.0
        max_norm = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        state = {"optimizer": self.models.optimizer.state_dict()}
        if self.models.critic_optimizer is not None:
            state["critic_optimizer"] = self.models.critic_optimizer.state_dict()
        if self.scaler is not None:
            state["grad_scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if "optimizer" not in state:
            from lampo.checkpoint import CheckpointError

            raise CheckpointError(
                "this checkpoint holds no optimiser state of its own: it was saved under DeepSpeed (its "
                "optimiser state is in per-rank shards). Resume it with the DeepSpeed launcher it was saved with"
            )
        self.models.optimizer.load_state_dict(state["optimizer"])
        if self.models.critic_optimizer is not None:
            self.models.critic_optimizer.load_state_dict(state["critic_optimizer"])
        if self.scaler is not None and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])

    def save_shards(self, staged: Path) -> list[str]:
        """Write this rank's part of the state under `staged`; returns the entries it made there."""
        return []

    def load_shards(self, checkpoint: Path) -> None:
        pass

    # ------------------------------------------------------------------ whole models
    def unwrap(self, model: nn.Module) -> nn.Module:
        return model

    @contextlib.contextmanager
    def full_weights(self, *models: nn.Module) -> Iterator[None]:
        """Inside: every parameter of `models` holds its whole tensor (read only). Call on every rank."""
        yield

    # ------------------------------------------------------------------ processes (for the trainer)
    def reduce(self, tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
        return tensor

    def all_true(self, flag: bool) -> bool:
        return flag

    def barrier(self) -> None:
        pass

    def broadcast_object(self, obj: Any) -> Any:
        return obj

    def close(self) -> None:
        pass


def local_device() -> torch.device:
    """This process's GPU (`LOCAL_RANK` of a launcher's, else the current one), or the CPU without one."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    # A launcher's LOCAL_RANK numbers the node's GPUs; a process that sees one GPU only (Ray sets
    # CUDA_VISIBLE_DEVICES per actor) uses the one it sees.
    local_rank = int(os.environ.get("LOCAL_RANK", "-1"))
    if 0 <= local_rank < torch.cuda.device_count():
        return torch.device("cuda", local_rank)
    return torch.device("cuda", torch.cuda.current_device())


class DistributedStrategy(Strategy):
    """Process-level operations over torch.distributed's default process group.

    A run with several processes differs from the single-process path in three ways, all here:
    every rank runs every backward (the gradient collectives must match), a minibatch is
    applied on all ranks or on none (`all_true`), and a token-mean loss divides by the tokens of
    the whole data-parallel minibatch, so that averaging the ranks' gradients gives exactly the
    gradient of one process holding every rank's rows (see `token_normaliser`).
    """

    @property
    def rank(self) -> int:
        return torch.distributed.get_rank()

    @property
    def world(self) -> int:
        return torch.distributed.get_world_size()

    def training_device(self, policy: nn.Module | None = None) -> torch.device:
        # every rank on its own GPU (accelerate and DeepSpeed place the models there), or the CPU
        return local_device()

    def _device(self) -> torch.device:
        # gloo reduces CPU tensors, nccl CUDA tensors
        if torch.distributed.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def token_normaliser(self, num_tokens: float) -> float:
        """The mean over ranks of the minibatch's tokens.

        The ranks' gradients are averaged, so rank r's loss sum_r / (N / world) contributes
        sum_r / N to the mean: the token mean over all N tokens of all ranks, as one process
        holding all the rows computes it. Each rank's own count in its place would weigh a
        token on a rank with few tokens more than one on a rank with many.
        """
        t = torch.tensor([num_tokens], dtype=torch.float64, device=self._device())
        torch.distributed.all_reduce(t)
        return float(t.item()) / self.world

    def backward(self, loss: torch.Tensor, finite: bool) -> None:
        # Every rank runs every backward, a non-finite one too: the gradient collectives happen
        # inside it, and a rank that left one out would leave the others waiting. The step
        # then skips the minibatch on every rank (`all_true`).
        self._scaled(loss).backward()

    def step(self, finite: bool) -> StepOutcome:
        if not self.all_true(finite):
            return StepOutcome.NON_FINITE
        return super().step(True)

    def reduce(self, tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
        t = tensor.to(self._device(), copy=True)
        torch.distributed.all_reduce(t)
        if op == "mean":
            t /= self.world
        elif op != "sum":
            raise ValueError(f"op must be 'mean' or 'sum', got {op!r}")
        return t.to(tensor.device)

    def all_true(self, flag: bool) -> bool:
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self._device())
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return bool(t.item())

    def barrier(self) -> None:
        torch.distributed.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        # Destroy the process group before the interpreter exits: left to shutdown, gloo's
        # threads can abort a finished run with SIGABRT ("terminate called without an active
        # exception").
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


__all__ = ["DistributedStrategy", "StepOutcome", "Strategy", "TrainedModels", "local_device"]

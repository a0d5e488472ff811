"""DeepSpeed ZeRO (stages 1-3) behind the learner's Strategy seam.

Selected by `accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml` (or
`deepspeed_zero3.yaml`): accelerate starts the ranks and names the DeepSpeed JSON in the
environment; Lampo builds the engine itself with `deepspeed.initialize`.

Why not `accelerator.prepare`: accelerate's DeepSpeed backward (`DeepSpeedEngineWrapper`) steps
the engine inside every `backward` and wires only the first prepared engine to it. Lampo
accumulates micro-batches itself (each loss already divided by the whole minibatch's tokens),
decides after the last one whether the minibatch is applied at all, and trains a critic too.

One engine holds every trained model (the policy, and the critic or the value head), with one
optimiser whose parameter groups are the learner's (each with its own learning rate). OpenRLHF
gives the actor and the critic an engine each; here one engine is what makes the step equal to
the single-process one: the plain path clips the gradient norm over policy and critic
together and applies or skips a minibatch as a whole, and one engine computes that one global
norm, makes that one overflow decision (all-reduced over the ranks) and takes one step.

How Lampo drives the engine, per minibatch:
- `set_gradient_accumulation_boundary(last)` before each micro-batch (in `no_sync`), so the
  engine steps only on Lampo's minibatch boundary; `backward(loss, scale_wrt_gas=False)`, as
  the loss is already normalised over the minibatch;
- every call of the trained models goes through one `engine(fn)` per micro-batch
  (`forward`), so DeepSpeed's per-forward bookkeeping and ZeRO-3's parameter fetching see
  them as one forward pass, however many model calls `fn` makes;
- the skip: DeepSpeed skips a step whose gradient holds inf or NaN on any rank (its overflow
  check, all-reduced) and clears the gradient. A rank whose loss was not finite backpropagates
  that loss times NaN, which puts NaN into the gradient of every parameter the loss reached,
  so the engine skips the minibatch on every rank; `was_step_applied()` reports it.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lampo.config import ConfigError
from lampo.distributed.strategy import DistributedStrategy, StepOutcome, TrainedModels

SHARDS = "deepspeed"
"""The checkpoint entry holding the engine's own checkpoint (every rank's optimiser partition)."""
_TAG = "engine"


class TrainedModules(nn.Module):
    """The models one engine trains; `forward(fn, *args)` runs `fn(*args)`, which calls them."""

    def __init__(self, policy: nn.Module, value_model: nn.Module | None, value_head: nn.Module | None):
        super().__init__()
        self.policy = policy
        self.value_model = value_model
        self.value_head = value_head

    def forward(self, fn, *args):
        return fn(*args)


def engine_config(user: dict[str, Any], config, world: int, hidden_size: int, source: str) -> dict[str, Any]:
    """The engine's config: `user` (the JSON) with its "auto" values filled from Lampo's config.

    Batch sizes, accumulation, clipping and precision have one source, the Lampo config; an
    explicit JSON value that disagrees with it is an error that names both keys. `source`
    names the JSON in messages.
    """
    ds = copy.deepcopy(user)
    opt = config.optim
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ConfigError(
                f"{source}: remove the '{section}' section. Lampo passes DeepSpeed its own AdamW and learning-rate "
                "schedule, set by learning_rate, critic_learning_rate, weight_decay, adam_eps, lr_scheduler_type "
                "and warmup_ratio"
            )
    gas = opt.gradient_accumulation_steps
    micro = opt.mini_batch_size // gas
    _fill(ds, "train_micro_batch_size_per_gpu", micro, "mini_batch_size / gradient_accumulation_steps", source)
    _fill(ds, "gradient_accumulation_steps", gas, "gradient_accumulation_steps", source)
    _fill(ds, "train_batch_size", micro * gas * world, f"mini_batch_size x {world} processes", source)
    _fill(ds, "gradient_clipping", float(opt.max_grad_norm), "max_grad_norm", source)
    for key, on in (("bf16", config.model.bf16), ("fp16", config.model.fp16)):
        section = ds.setdefault(key, {})
        _fill(section, "enabled", on, key, source, where=f"{key}.enabled")
    zero = ds.setdefault("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in (1, 2, 3):
        raise ConfigError(
            f"{source}: zero_optimization.stage = {stage!r}; Lampo's DeepSpeed path runs ZeRO stage 1, 2 or 3 "
            "(for plain data parallel launch with configs/accelerate/multi_cpu_2proc.yaml or a MULTI_GPU config)"
        )
    # Hugging Face's "auto" sizes for these buckets (transformers.integrations.deepspeed)
    for key, value in (("reduce_bucket_size", hidden_size * hidden_size),
                       ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size)),
                       ("stage3_param_persistence_threshold", 10 * hidden_size)):
        if zero.get(key) == "auto":
            zero[key] = value
    # Lampo's optimiser is a torch AdamW, which ZeRO accepts when allowed to (and with offload,
    # when not forced onto DeepSpeed's CPU Adam).
    ds.setdefault("zero_allow_untested_optimizer", True)
    if (zero.get("offload_optimizer") or {}).get("device", "none") != "none":
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    ds.setdefault("steps_per_print", 2**31 - 1)  # Lampo logs its own metrics
    left = _autos(ds)
    if left:
        raise ConfigError(f"{source}: Lampo cannot fill {', '.join(left)} = \"auto\"; give a value instead")
    return ds


def _fill(section: dict, key: str, value, lampo_key: str, source: str, where: str | None = None) -> None:
    given = section.get(key, "auto")
    if given == "auto":
        section[key] = value
    elif given != value:
        raise ConfigError(
            f"{source}: {where or key} = {json.dumps(given)} but Lampo's config gives {json.dumps(value)} "
            f"(from '{lampo_key}'). Set it to \"auto\" in the JSON (Lampo fills it in) or change the Lampo key"
        )


def _autos(tree: Any, prefix: str = "") -> list[str]:
    if isinstance(tree, dict):
        return [name for k, v in tree.items() for name in _autos(v, f"{prefix}{k}.")]
    return [prefix[:-1]] if tree == "auto" else []


def _one_optimizer(models: TrainedModels) -> torch.optim.Optimizer:
    """One optimiser over the parameter groups of the learner's optimisers (each group keeps its
    learning rate; the learner's one schedule then scales them all)."""
    first = models.optimizer
    groups = [g for opt in models.optimizers() for g in opt.param_groups]
    accepted = inspect.signature(type(first)).parameters
    return type(first)(groups, **{k: v for k, v in first.defaults.items() if k in accepted})


class DeepSpeedStrategy(DistributedStrategy):
    """Train the policy and critic in one DeepSpeed engine (see the module docstring)."""

    saves_weights = True

    def __init__(self, ds_config: dict[str, Any], source: str = "the DeepSpeed config"):
        import deepspeed

        self.user_config, self.source = ds_config, source
        if not torch.distributed.is_initialized():
            # gloo on CPU: DeepSpeed's CPU accelerator would pick oneCCL, which is not installed
            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")

    @classmethod
    def from_accelerate_environment(cls) -> DeepSpeedStrategy:
        """From what `accelerate launch` puts in the environment for a DEEPSPEED config."""
        if os.environ.get("ACCELERATE_DEEPSPEED_ZERO3_INIT", "false").lower() == "true":
            raise ConfigError(
                "accelerate's zero3_init_flag: true is not supported: Lampo loads each model whole and ZeRO-3 "
                "partitions it when the engine starts. Set zero3_init_flag: false in the accelerate config"
            )
        path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if path:
            try:
                return cls(json.loads(Path(path).read_text()), source=path)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"accelerate's deepspeed_config_file {path} could not be read: {exc}") from exc
        zero: dict[str, Any] = {"stage": int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))}
        for part in ("optimizer", "param"):
            device = os.environ.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{part.upper()}_DEVICE", "none")
            if device != "none":
                zero[f"offload_{part}"] = {"device": device}
        return cls({"zero_optimization": zero}, source="the accelerate config's deepspeed_config")

    # ------------------------------------------------------------------ set-up
    def training_device(self, policy: nn.Module | None = None) -> torch.device:
        from deepspeed.accelerator import get_accelerator

        # where deepspeed.initialize puts the engines' modules
        return torch.device(get_accelerator().current_device_name())

    def prepare(self, models: TrainedModels, config) -> TrainedModels:
        import deepspeed

        from lampo.optimize.models import base_causal_lm

        self.models = models
        self.fp16 = config.model.fp16
        self.scaler = None  # DeepSpeed scales fp16 losses itself
        hidden = base_causal_lm(models.policy).config.hidden_size
        ds = engine_config(self.user_config, config, self.world, hidden, self.source)
        self.stage = ds["zero_optimization"]["stage"]
        self.modules = TrainedModules(models.policy, models.value_model, models.value_head)
        optimizer = _one_optimizer(models)
        self.engine, *_ = deepspeed.initialize(model=self.modules, optimizer=optimizer, config=ds)
        ref = models.ref_model
        if ref is not None:
            ref = self._reference_engine(ref, ds)
        m = self.engine.module
        # The merged optimiser stands for both: the learner schedules its groups with one scheduler.
        self.models = TrainedModels(m.policy, m.value_model, m.value_head, ref, optimizer, None)
        return self.models

    def _reference_engine(self, ref: nn.Module, ds: dict[str, Any]) -> nn.Module:
        """The frozen reference in an engine without optimiser: partitioned like the policy under
        ZeRO-3, and in the training precision (DeepSpeed's bf16/fp16 weights) in every stage."""
        import deepspeed

        zero = {"stage": 3 if self.stage == 3 else 0}
        if self.stage == 3:
            for key in ("offload_param", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
                if key in ds["zero_optimization"]:
                    zero[key] = ds["zero_optimization"][key]
        ref_ds = {key: ds[key] for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                           "train_batch_size", "bf16", "fp16", "steps_per_print")}
        ref_ds["zero_optimization"] = zero
        engine, *_ = deepspeed.initialize(model=ref, config=ref_ds)
        return engine

    # ------------------------------------------------------------------ the learner's seam
    def forward(self, fn, *args):
        return self.engine(fn, *args)

    @contextlib.contextmanager
    def no_sync(self, skip: bool) -> Iterator[None]:
        # Not DeepSpeed's no_sync (ZeRO-2/3 refuse it): the boundary flag tells the engine which
        # backward ends the minibatch. ZeRO-1 reduces gradients there; ZeRO-2/3 reduce them
        # inside every backward, which their partitioned gradients need.
        self.engine.set_gradient_accumulation_boundary(not skip)
        yield

    def backward(self, loss: torch.Tensor, finite: bool) -> None:
        if not finite:
            loss = loss * float("nan")  # the engine's overflow check skips the step (module docstring)
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self, finite: bool) -> StepOutcome:
        all_finite = self.all_true(finite)
        self.engine.step()
        applied = self.engine.was_step_applied()
        if applied and not all_finite:
            raise RuntimeError("DeepSpeed applied a minibatch whose loss was not finite on some rank; "
                               "the NaN gradient did not reach its overflow check")
        if applied:
            return StepOutcome.APPLIED
        # fp16: a finite loss with an overflowing gradient is the loss scaler finding its scale
        return StepOutcome.LOSS_SCALE if self.fp16 and all_finite else StepOutcome.NON_FINITE

    def zero_grad(self) -> None:
        # engine.step() clears the gradient buffers itself, applied or skipped
        pass

    def loss_scale(self) -> float | None:
        return float(self.engine.optimizer.loss_scale) if self.fp16 else None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {}  # all in the shards

    def load_state_dict(self, state: dict) -> None:
        pass

    def save_shards(self, staged: Path) -> list[str]:
        # Every rank writes its partition of the optimiser state (and its fp32 master weights).
        # Frozen weights (a LoRA base) never change and come back from the model folders.
        self.engine.save_checkpoint(str(Path(staged) / SHARDS), tag=_TAG, save_latest=False,
                                    exclude_frozen_parameters=True)
        return [SHARDS]

    def load_shards(self, checkpoint: Path) -> None:
        from lampo import checkpoint as ckpt

        folder = ckpt.shard_path(checkpoint, SHARDS)
        # strict=False: the saved module state leaves the frozen weights out on purpose (save_shards)
        path, _ = self.engine.load_checkpoint(str(folder), tag=_TAG, load_module_strict=False,
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise ckpt.CheckpointError(f"DeepSpeed could not load its shards from {folder}")

    # ------------------------------------------------------------------ whole models
    def unwrap(self, model: nn.Module) -> nn.Module:
        import deepspeed

        return model.module if isinstance(model, deepspeed.DeepSpeedEngine) else model

    @contextlib.contextmanager
    def full_weights(self, *models: nn.Module) -> Iterator[None]:
        if self.stage != 3:
            yield
            return
        import deepspeed

        params = [p for m in models for p in self.unwrap(m).parameters()]
        # modifier_rank None: read only; every rank gathers (each has an engine to feed)
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield

"""Which Strategy a multi-process run uses, from the environment its launcher set.

- `accelerate launch` with a DEEPSPEED config (configs/accelerate/deepspeed_zero2.yaml,
  deepspeed_zero3.yaml): accelerate sets ACCELERATE_USE_DEEPSPEED and names the JSON in
  ACCELERATE_DEEPSPEED_CONFIG_FILE; Lampo builds the DeepSpeed engine (deepspeed_zero.py).
- anything else with WORLD_SIZE > 1 (accelerate MULTI_GPU/MULTI_CPU, torchrun): DDP through
  accelerate (ddp.py).
"""

from __future__ import annotations

import os

import torch

from lampo.distributed.strategy import Strategy


def wants_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")


def strategy_from_environment() -> Strategy:
    """The strategy of this process: single-process unless WORLD_SIZE > 1."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Strategy()
    if wants_deepspeed():
        from lampo.distributed.deepspeed_zero import DeepSpeedStrategy

        return DeepSpeedStrategy.from_accelerate_environment()
    from accelerate import Accelerator

    from lampo.distributed.ddp import AccelerateDDP

    return AccelerateDDP(Accelerator(cpu=not torch.cuda.is_available()))

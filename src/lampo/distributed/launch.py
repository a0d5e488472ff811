"""Which Strategy a multi-process run uses, from the environment its launcher set.

- WORLD_SIZE > 1 (accelerate MULTI_GPU/MULTI_CPU, torchrun): DDP through accelerate (ddp.py).
"""

from __future__ import annotations

import os

import torch

from lampo.distributed.strategy import Strategy


def strategy_from_environment() -> Strategy:
    """The strategy of this process: single-process unless WORLD_SIZE > 1."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Strategy()
    from accelerate import Accelerator

    from lampo.distributed.ddp import AccelerateDDP

    return AccelerateDDP(Accelerator(cpu=not torch.cuda.is_available()))

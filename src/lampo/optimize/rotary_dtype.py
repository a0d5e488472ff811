"""Rotary-embedding tables in the autocast dtype, so bf16 queries and keys stay bf16.

Under autocast the residual stream stays fp32, and a transformers decoder computes its rotary
tables (cos, sin) in the dtype of that stream. The bf16 queries and keys that come out of the
projections are then multiplied by fp32 tables: they are promoted to fp32 on every layer, and
cast back to bf16 for attention. A bf16 model (and vLLM's bf16 engine) uses bf16 tables and has
none of these casts. In the bf16 CPU profile the promotions, casts and fp32 element-wise work
on q and k took about a fifth of the training pass. With bf16 tables the pass was 8-10% faster
(docs/performance.md, change 10).

Only the tables change dtype, and only while autocast is on. Weights, the residual stream and the
log-softmax stay fp32. Without autocast (fp32 training, the engines) the hook does nothing.
"""

from __future__ import annotations

import torch
from torch import nn


def _tables_in_autocast_dtype(module: nn.Module, args, output):
    device = "cuda" if isinstance(output, tuple) and output and output[0].is_cuda else "cpu"
    if not torch.is_autocast_enabled(device):
        return None
    if not (isinstance(output, tuple) and all(torch.is_tensor(t) and t.is_floating_point() for t in output)):
        return None
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) for t in output)


def rotary_in_autocast_dtype(model: nn.Module) -> int:
    """Hook every rotary-embedding module of `model` (transformers names them `*RotaryEmbedding`;
    they return `(cos, sin)`) to return its tables in the autocast dtype; returns how many."""
    n = 0
    for module in model.modules():
        if type(module).__name__.endswith("RotaryEmbedding") and not getattr(module, "_lampo_rotary_hook", False):
            module.register_forward_hook(_tables_in_autocast_dtype)
            module._lampo_rotary_hook = True
            n += 1
    return n

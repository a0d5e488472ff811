"""fp32 linear layers on oneDNN's matmul kernels, for training and generation on CPU.

torch runs an fp32 `nn.Linear` on CPU through MKL's sgemm, which on some CPUs (AMD EPYC among
them) picks slower paths than oneDNN for the shapes a training pass multiplies. This module runs
the same products on oneDNN; the measurements are in docs/performance-log.md. The maths is the same
matrix products: out = x W^T + b, dx = dy W, dW = dy^T x, db = sum(dy).

Only the forward and input-gradient products go to oneDNN (`torch.ops.mkldnn._linear_pointwise`,
the kernel behind torch.compile's CPU linear, given the plain weight: packing it afresh per call
would cost more than it saves). The weight gradient stays on `torch.mm`, where MKL is as fast.
Anything else (autocast, bf16/fp16, a GPU tensor, a product under `MIN_MACS`) takes the usual
`nn.Linear.forward`. The `hf` engine uses the same layers for decoding.
"""

from __future__ import annotations

import torch
from torch import nn

MIN_MACS = 1 << 24
"""Multiply-adds (rows x in x out) from which a product goes to oneDNN. Its call has a fixed cost
over MKL's (tens of microseconds) that only larger products pay back; smaller ones, the tiny test
models' layers among them, stay on MKL (docs/performance-log.md)."""


def available() -> bool:
    """Whether this torch build has oneDNN's linear kernel."""
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):  # pragma: no cover - depends on the build
        return False


def _dnn_linear(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x2, weight, bias, "none", [], "")


def _forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x W^T + b for x of any rank, and the 2-D contiguous input the kernel read."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    return _dnn_linear(x2, weight, bias).view(*x.shape[:-1], weight.shape[0]), x2


class _OneDNNLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        out, x2 = _forward(x, weight, bias)
        ctx.save_for_backward(x2, weight)
        ctx.has_bias, ctx.x_shape = bias is not None, x.shape
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x2, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1]).contiguous()
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            # dx = dy W, as a linear layer whose weight is W^T: oneDNN reads the transposed view
            # as it is, which is faster than copying it transposed first
            dx = _dnn_linear(g2, weight.t(), None).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            dw = g2.t().mm(x2)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = g2.sum(0)
        return dx, dw, db


class OneDNNLinear(nn.Linear):
    """An `nn.Linear` whose fp32 CPU products run on oneDNN (same parameters, same state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dtype is torch.float32 and self.weight.dtype is torch.float32 and x.device.type == "cpu"
                and not torch.is_autocast_enabled("cpu") and x.numel() * self.out_features >= MIN_MACS):
            if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
                return _OneDNNLinearFn.apply(x, self.weight, self.bias)
            # no graph to record (generation, no-grad passes): skip the autograd function's
            # per-call cost, which shows on small layers
            return _forward(x, self.weight, self.bias)[0]
        return super().forward(x)


def use_onednn_linear(model: nn.Module) -> int:
    """Turn every plain `nn.Linear` in `model` into a `OneDNNLinear`, in place; returns how many.

    Subclasses (LoRA wrappers, quantised layers) are left alone; the plain layers inside them
    are converted. Parameters, hooks and the state dict do not change.
    """
    if not available():
        return 0
    n = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = OneDNNLinear
            n += 1
    return n

"""fp32 linear layers on oneDNN's matmul kernels, for training and generation on CPU.

torch runs an fp32 `nn.Linear` on CPU through MKL's sgemm. On this project's AMD EPYC machine
MKL picks slower paths than oneDNN for the training shapes (a [2048 x 512] x [512 x 1408]
product: 130-180 vs 190-215 GFLOP/s), and an alternated A/B of the fp32 training pass gave
-8 to -11% time with this module (docs/performance.md, change 9). The maths is the same matrix
products: out = x W^T + b, dx = dy W, dW = dy^T x, db = sum(dy).

Only the forward and input-gradient products go to oneDNN (`torch.ops.mkldnn._linear_pointwise`,
the kernel behind torch.compile's CPU linear, given the plain weight: packing it afresh per call
cost more than it saved). The weight gradient stays on `torch.mm`, where MKL was already as fast.
Anything else (autocast, bf16/fp16, a GPU tensor, a product under `MIN_MACS`) takes the usual
`nn.Linear.forward`. The `hf` engine uses the same layers for decoding (change 12).
"""

from __future__ import annotations

import torch
from torch import nn

# oneDNN's call costs about 15 us more than MKL's; it pays from about 2^24 multiply-adds per
# product (rows x in x out) on this machine: 0.85x MKL's time for [64 x 512] x [512 x 512],
# 1.1-7x for smaller products (the tiny test models' layers). Smaller products stay on MKL.
MIN_MACS = 1 << 24


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
            # as it is (1.3 ms faster per [2048 x 512] x [512 x 1408] product than a copy first)
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

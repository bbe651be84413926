"""A literal transcription of the CoDeQ quantizer, the oracle for tests and benchmarks.

Every step of ``docs/method.md``, "The quantizer" written out with separate
straight-through autograd functions and ``torch.quantile``, as the reference
code (github.com/saintslab/CoDeQ) does. It is slow and limited to tensors of
at most 2**24 elements; :class:`codeq_cli.DeadZoneQuantizer` must agree with it.
"""

from __future__ import annotations

import torch
from torch import Tensor

EPS = 1e-8


class _Round(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return g


class _Relu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return g


class _Clip(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lo, hi):  # type: ignore[override]
        return torch.clamp(x, min=lo.to(x.device), max=hi.to(x.device))

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return g, None, None


class _SignedMagnitude(torch.autograd.Function):
    """``sign(w) · relu(|w| − δ)`` with ∂/∂w = 1 everywhere and ∂/∂δ = −sign(w)."""

    @staticmethod
    def forward(ctx, w, shift):  # type: ignore[override]
        ctx.save_for_backward(w)
        return torch.sign(w) * (w.abs() - shift).clamp(min=0)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        (w,) = ctx.saved_tensors
        return g, -(g * torch.sign(w)).sum()


def reference_dequantize(
    w: Tensor,
    theta_dz: Tensor,
    theta_bit: Tensor | None = None,
    *,
    bits: int | None = 4,
    b_min: int = 2,
    b_max: int = 8,
    quantile: float = 0.99,
) -> Tensor:
    """``ŵ`` of §1, step by step."""
    with torch.no_grad():
        R = torch.quantile(w.detach().abs().flatten(), quantile)
    if bits is None:
        b = _Round.apply(torch.tanh(theta_bit.abs()) * (b_max - b_min) + b_min)
    else:
        b = torch.tensor(float(bits), device=w.device)
    Q = torch.pow(2.0, b - 1.0) - 1.0
    d = 2.0 * R * (1.0 - torch.tanh(theta_dz.abs()))
    s = (R - d / 2.0) / (Q - 0.5) + EPS
    shift = d / 2.0 - s / 2.0
    q = _Clip.apply(_Round.apply(_SignedMagnitude.apply(w, shift) / s), -Q.detach(), Q.detach())
    return s * q + shift * torch.sign(q)

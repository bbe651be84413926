"""The figures a budget is about, measured on a model (``docs/method.md``, "Compressing to a budget").

Relative BOPs as ``codeq report`` computes them, the checkpoint's size (each
layer's codes entropy-coded as the writer does, or estimated from their
histogram during training), what can be reached from a start, and each
quantized layer's share of the figure (the controller's per-layer weights).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from codeq_cli.core.act_quant import act_quantizers, learns_width
from codeq_cli.core.bops import A_BITS, FP_BITS, bops_rows, bops_totals
from codeq_cli.core.insert import encode_all, quantized_weights
from codeq_cli.train.budget import SIZE_FIGURE, Figure


def _table_bytes(counts: torch.Tensor) -> int:
    """Bytes of the frequency table :func:`codeq_cli.formats.entropy.encode` writes."""
    nz = counts[counts > 0].tolist()
    varint = lambda v: max(1, (int(v).bit_length() + 6) // 7)  # noqa: E731
    return varint(len(nz)) + sum(1 + varint(c) for c in nz)


@torch.no_grad()
def coded_bytes(model: nn.Module) -> list[float]:
    """Per quantized layer: the bytes of its coded weights, estimated from the code histogram."""
    out = []
    for enc in encode_all(model).values():
        codes = enc.codes
        counts = torch.bincount(codes.reshape(-1).to(torch.int64) + 128, minlength=256).double()
        p = counts[counts > 0] / codes.numel()
        bound_bits = float(-(counts[counts > 0] * torch.log2(p)).sum())
        out.append(float(_table_bytes(counts) + 4 * (math.ceil(bound_bits / 32) + 1) if (counts > 0).sum() > 1
                         else _table_bytes(counts)))
    return out


@torch.no_grad()
def exact_size(model: nn.Module, overhead: int) -> int:
    """The checkpoint's size: every layer's codes entropy-coded as the writer does, plus the rest."""
    from codeq_cli.formats import entropy

    coded = 0
    for enc in encode_all(model).values():  # every layer in one pass where the one-pass quantizer runs
        coded += len(entropy.encode(enc.codes.detach().cpu().reshape(-1).numpy()))
    return overhead + coded


def measure(figure: Figure, model: nn.Module, macs: dict[str, int], size_overhead: int = 0) -> tuple[float, list[float]]:
    """The figure (relative BOPs %, or bytes) and each quantized layer's cost share."""
    if figure is SIZE_FIGURE:
        costs = coded_bytes(model)
        return float(size_overhead + sum(costs)), costs
    # One encoding of every layer: a quantized row's BOPs (density · MACs · bits · input bits) is its cost.
    rows = bops_rows(model, macs)
    cost = {r.name: r.bops for r in rows}
    return float(bops_totals(rows)["rel_bops"]), [cost[qw.name] for qw in quantized_weights(model)]


def rel_bops(model: nn.Module, macs: dict[str, int], act_bits: dict[str, int] | None = None) -> float:
    """Relative BOPs (%) as ``codeq report`` computes it (``act_bits``: see :func:`~codeq_cli.core.bops.bops_rows`)."""
    return float(bops_totals(bops_rows(model, macs, act_bits=act_bits))["rel_bops"])


def act_layer_index(model: nn.Module) -> list[int]:
    """For each learned activation bit logit (in :func:`~codeq_cli.core.act_quant.act_parameters` order),
    the index of the layer it feeds among :func:`~codeq_cli.core.insert.quantized_weights`."""
    index = {qw.name: i for i, qw in enumerate(quantized_weights(model))}
    # A quantizer shared by several layers, or sitting on a non-layer module's output, is named by the layers it feeds.
    return [index.get(qz.feeds[0] if qz.feeds else name, -1)
            for name, qz in act_quantizers(model) if learns_width(qz)]


@torch.no_grad()
def reachable(figure: Figure, model: nn.Module, macs: dict[str, int], size_overhead: int, start: float, *,
              act_bits: dict[str, int] | None = None, act_low: dict[str, int] | None = None) -> tuple[float, float]:
    """``(lowest, start)``: the figure at the widest dead zones and fewest bits, and the figure now.

    ``act_bits``: the activation widths the run starts with (default: the
    model's calibrated ones); ``act_low``: the fewest each can reach (default:
    the same), for the BOPs.

    The widest dead zone is ``d = 2R`` (θ_dz = 0): every ``|w| ≤ R`` is
    pruned and about 1 − quantile of the weights stay. The bit-width is then
    ``b_min`` (mixed) or the fixed one. For the size, each kept weight costs at
    least its sign, so a layer needs at least ``n·(h(ρ) + ρ)/8`` bytes
    (``h``: binary entropy, ``ρ``: density), exact at 2 bits.
    """
    quantized = {}
    for qw in quantized_weights(model):
        w = qw.original.detach()
        R = qw.quantizer.absmax(w)
        rho = float((w.abs() > R).sum()) / max(1, w.numel())
        bits = qw.quantizer.b_min if qw.quantizer.mixed else qw.quantizer.bits
        quantized[qw.name] = (w.numel(), rho, bits)
    if figure is SIZE_FIGURE:
        low = float(size_overhead)
        for n, rho, _ in quantized.values():
            h = 0.0 if rho in (0.0, 1.0) else -(rho * math.log2(rho) + (1 - rho) * math.log2(1 - rho))
            low += n * (h + rho) / 8.0
        return low, start
    rows = bops_rows(model, macs, act_bits=act_bits)
    dense = sum(r.macs for r in rows) * FP_BITS * A_BITS
    act_low = act_low or {}
    low = 0.0
    for r in rows:
        a = act_low.get(r.name, r.act_bits)
        if r.name in quantized:
            _, rho, bits = quantized[r.name]
            low += rho * r.macs * bits * a
        else:  # a float layer: no input quantizer either
            low += r.bops
    return (100.0 * low / dense if dense else 0.0), start

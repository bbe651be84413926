"""Exact quantiles of ``|w|`` that cost one counting pass per training step.

CoDeQ needs ``R = quantile(|w|, 0.99)`` of every layer at every forward pass.
``torch.quantile`` sorts the whole tensor (and refuses more than 2**24
elements); ``kthvalue`` copies and selects it. Either dominates a training
step on CPU.

Between two optimizer steps the weights barely move, so the set of the largest
~1% of magnitudes barely changes. :class:`QuantileCache` remembers the flat
indices of the top ``K + margin`` magnitudes. Each call gathers those few
values, selects the needed order statistics among them, and then *proves* the
result with one counting pass: if no element outside the remembered set is
larger than the selected value, the selection equals the selection over the
whole tensor (ties included). When the proof fails (a weight from outside has
risen into the top ``K``), the set is rebuilt with ``topk``. The result is
always exact: the cache changes only the speed, never a value.

The interpolation reproduces ``torch.quantile(..., interpolation="linear")``
bit for bit on every device: the rank is ``float32(q) * (n - 1)``, computed in
double precision on CPU and rounded to float32 on accelerators (torch's CUDA
kernels compute ``q * (n - 1)`` in float32, so the interpolation weight
differs in the third decimal for ``n`` in the tens of thousands; found by
``bench/gpu_check.sh``); the weight is rounded to float32 and the two order
statistics are combined with ``torch.lerp``.
"""

from __future__ import annotations

import math
import struct
from functools import lru_cache

import torch
from torch import Tensor

from codeq_cli.core import _kernels

# Below this size a plain selection is as fast as the cached one.
_SMALL = 1 << 14


def _f32(x: float) -> float:
    """``x`` rounded to float32 (plain Python: no tensor, so no graph break under torch.compile)."""
    return struct.unpack("f", struct.pack("f", x))[0]


@lru_cache(maxsize=4096)
def quantile_rank(n: int, q: float, float32_rank: bool = False) -> tuple[int, int, float]:
    """``(below, above, weight)`` of linear interpolation, as ``torch.quantile``.

    ``float32_rank``: round the rank to float32 first, as torch does off the CPU.
    """
    q32 = _f32(q)
    rank = q32 * (n - 1)
    if float32_rank:
        rank = _f32(rank)
    below, above = math.floor(rank), math.ceil(rank)
    weight = _f32(rank - below)
    return below, above, weight


def _finish(lo: Tensor, hi: Tensor, weight: float) -> Tensor:
    if weight == 0.0:
        return lo.clone()
    return torch.lerp(lo, hi, weight)  # weight is a float32 value: same as a float32 tensor


def _order_stats(values: Tensor, k: int, need_next: bool) -> tuple[Tensor, Tensor]:
    """The k-th and (k-1)-th largest of the full tensor, from a set holding its k largest."""
    top = values if values.numel() == k else torch.topk(values, k, largest=True, sorted=False).values
    if not need_next:
        lo = top.min()
        return lo, lo
    two = torch.topk(top, 2, largest=False, sorted=True).values
    return two[0], two[1]


def exact_quantile(a: Tensor, q: float) -> Tensor:
    """The linear-interpolation quantile of all elements of ``a`` (no cache).

    Equal to ``torch.quantile(a.flatten(), q)`` where that works, and defined
    for any size. Returns a 0-dim tensor on ``a``'s device.
    """
    flat = a.reshape(-1)
    n = flat.numel()
    if n == 0:
        return flat.new_zeros(())
    below, above, weight = quantile_rank(n, q, flat.device.type != "cpu")
    need_next = above != below and weight != 0.0
    lo, hi = _order_stats(flat, n - below, need_next)
    return _finish(lo, hi, weight if need_next else 0.0)


class QuantileCache:
    """Remembers where the largest magnitudes of one weight tensor live.

    Holds no state that affects results; safe to drop at any time. Not part
    of any ``state_dict``.
    """

    __slots__ = ("idx", "numel", "hits", "rebuilds")

    def __init__(self) -> None:
        self.idx: Tensor | None = None
        self.numel = -1
        self.hits = 0
        self.rebuilds = 0

    def quantile_abs(self, w_flat: Tensor, q: float) -> Tensor:
        """Exact ``quantile(|w_flat|, q)`` of a flat tensor (signs allowed)."""
        n = w_flat.numel()
        if n <= _SMALL or w_flat.device.type != "cpu" or _kernels.gpu_path():
            # Small tensors: selection is cheap. Accelerators: ``topk`` is a
            # radix select, and the proof below would need a host sync; the
            # GPU path on CPU (``CODEQ_KERNELS=torch``) takes the same road.
            return exact_quantile(w_flat.abs(), q)
        below, above, weight = quantile_rank(n, q)
        k = n - below
        need_next = above != below and weight != 0.0
        margin = max(64, n // 200)
        if k + margin >= n:
            return exact_quantile(w_flat.abs(), q)
        idx = self.idx
        # A set remembered for another size, device or a larger quantile is too small to hold the k largest.
        if idx is not None and (
            self.numel != n or idx.numel() < k or idx.device != w_flat.device or idx.is_inference()
        ):
            idx = None
        if idx is not None and _kernels.usable(w_flat):
            lo_f, hi_f, ok = _kernels.cached_order_stats(w_flat, idx, idx.numel() - k, need_next)
            if ok:
                self.hits += 1
                lo, hi = w_flat.new_tensor(lo_f), w_flat.new_tensor(hi_f)
                return _finish(lo, hi, weight if need_next else 0.0)
            idx = None
        if idx is not None:
            cand = w_flat.index_select(0, idx).abs_()
            lo, hi = _order_stats(cand, k, need_next)
            # Proof: the k-th largest of ``cand`` is the k-th largest overall
            # iff nothing outside ``cand`` is strictly larger than it (and then
            # the (k-1)-th largest is in ``cand`` as well).
            if int((w_flat.abs() > lo).count_nonzero()) == int((cand > lo).count_nonzero()):
                self.hits += 1
                return _finish(lo, hi, weight if need_next else 0.0)
        self.rebuilds += 1
        top = torch.topk(w_flat.abs(), k + margin, largest=True, sorted=False)
        if not torch.is_inference_mode_enabled():
            self.idx, self.numel = top.indices, n
        lo, hi = _order_stats(top.values, k, need_next)
        return _finish(lo, hi, weight if need_next else 0.0)

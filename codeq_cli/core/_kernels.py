"""Fused CPU loops for the quantizer (numba), with eager PyTorch as the fallback.

Eager PyTorch runs the dead-zone chain (abs, subtract, relu, divide, round,
clip, scale, shift, mask, sign) as a dozen passes over every weight tensor,
forward and backward: on CPU that alone costs a fifth of a ResNet-18 training
step. The loops below do the forward in one pass (read ``w``, write ``ŵ``) and
the backward in one read-only pass, with the same float32 operations in the
same order, so the forward is bit-identical to the eager chain (tested). Only
the two backward sums may be reassociated (``fastmath={'reassoc'}``): they are
sums, and vectorising them is what makes the pass cheap.

Used for float32 tensors on CPU whose memory is dense (contiguous or
channels-last).

**The GPU path on CPU.** ``CODEQ_KERNELS=torch`` makes the CPU run the sequence
of tensor operations a CUDA device runs: no numba loops, no cached quantile
(:mod:`codeq_cli.core._select`), the one-pass quantizer of every layer
(:mod:`codeq_cli.core._group`). Counting the operations of a CPU step under it
counts what a GPU would launch (``bench/launches.py``, ``tests/test_launches.py``).
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch
from torch import Tensor


def gpu_path() -> bool:
    """True under ``CODEQ_KERNELS=torch``: the CPU takes exactly the operations CUDA takes."""
    return os.environ.get("CODEQ_KERNELS", "").lower() == "torch"


@lru_cache(maxsize=1)
def _numba():
    if gpu_path():
        return None
    os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "codeq", "numba"))
    try:
        import numba
        import numpy as np
    except Exception:  # pragma: no cover - numba missing or broken: eager path
        return None
    return _build(numba, np)


def _build(numba, np):
    from codeq_cli.core import _numba_loops as k

    return {"np": np, "numba": numba, "forward": k.forward, "backward": k.backward,
            "encode": k.encode, "cached_order_stats": k.cached_order_stats}


def flat(t: Tensor) -> Tensor | None:
    """A 1-D view of ``t`` in memory order, or None when its memory is not dense."""
    if t.is_contiguous():
        return t.view(-1)
    if t.dim() in (4, 5):
        fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
        if t.is_contiguous(memory_format=fmt):
            return t.as_strided((t.numel(),), (1,))
    return None


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


def usable(w: Tensor) -> bool:
    """True when the fused loops can serve this tensor."""
    if _compiling():  # numba loops are opaque to dynamo: compiled graphs take the eager path
        return False
    return (
        w.device.type == "cpu"
        and w.dtype == torch.float32
        and w.numel() > 0
        and flat(w) is not None
        and _numba() is not None
    )


def _ready():
    k = _numba()
    threads = torch.get_num_threads()
    if k["numba"].get_num_threads() != min(threads, k["numba"].config.NUMBA_NUM_THREADS):
        k["numba"].set_num_threads(min(threads, k["numba"].config.NUMBA_NUM_THREADS))
    return k


def _f32(k, x) -> object:
    return k["np"].float32(x)


def forward(w: Tensor, s: float, shift: float, qmax: float) -> Tensor:
    """``ŵ`` of §1 steps 7-8 for a float32 CPU tensor, in one pass."""
    k = _ready()
    out = torch.empty_like(w)
    k["forward"](flat(w).numpy(), flat(out).numpy(), _f32(k, s), _f32(k, shift), _f32(k, qmax))
    return out


def encode(w: Tensor, s: float, shift: float, qmax: float) -> Tensor:
    """The int8 codes ``q`` of §1 step 7."""
    k = _ready()
    out = torch.empty_like(w, dtype=torch.int8)
    k["encode"](flat(w).numpy(), flat(out).numpy(), _f32(k, s), _f32(k, shift), _f32(k, qmax))
    return out


def backward(g: Tensor, w: Tensor, s: float, shift: float, qmax: float) -> tuple[float, float]:
    """``(Σ g·(q − r), Σ g·(sign(q) − sign(w)))``: the gradients of ``s`` and ``δ``."""
    k = _ready()
    if g.stride() != w.stride() or flat(g) is None:
        g, w = g.contiguous(), w.contiguous()
    gs, gd = k["backward"](flat(g).numpy(), flat(w).numpy(), _f32(k, s), _f32(k, shift), _f32(k, qmax))
    return float(gs), float(gd)


def cached_order_stats(w_flat: Tensor, idx: Tensor, pos: int, need_next: bool) -> tuple[float, float, bool]:
    """Order statistics of ``|w|`` at ``idx`` and whether they are those of all of ``w``.

    Returns the ``pos``-th and ``pos+1``-th smallest magnitudes among the
    indexed elements and True when no element outside ``idx`` exceeds the
    first, which makes them the order statistics of the whole tensor.
    """
    k = _ready()
    lo, hi, ok = k["cached_order_stats"](w_flat.numpy(), idx.numpy(), pos, need_next)
    return float(lo), float(hi), bool(ok)

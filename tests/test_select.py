"""Exact quantiles of |w| (``codeq_cli.core._select``): bit for bit ``torch.quantile``,
with and without the cached top set, on the numba and the eager path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from codeq_cli.core import _kernels
from codeq_cli.core._select import _SMALL, QuantileCache, exact_quantile, quantile_rank


@pytest.fixture(params=["numba", "eager"])
def path(request, monkeypatch):
    """The cache's proof runs in numba loops or in torch ops: test both."""
    monkeypatch.delenv("CODEQ_KERNELS", raising=False)
    _kernels._numba.cache_clear()
    assert _kernels._numba() is not None, "numba is a dependency: the fused path must be available"
    if request.param == "eager":
        monkeypatch.setattr(_kernels, "usable", lambda t: False)
    yield request.param
    _kernels._numba.cache_clear()


SIZES = [1, 2, 3, 7, 100, 101, 201, 1000, _SMALL - 1, _SMALL, _SMALL + 1, 20_000, 65_537, 100_003]
QS = [0.0, 0.37, 0.5, 0.9, 0.99, 1.0]


@pytest.mark.parametrize("n", SIZES)
def test_equals_torch_quantile(path, n):
    g = torch.Generator().manual_seed(n)
    for ties in (False, True):
        # ties: small integers, so equal values sit at and around the selected ranks
        w = torch.randint(-4, 5, (n,), generator=g).float() if ties else torch.randn(n, generator=g)
        for q in QS:
            expected = torch.quantile(w.abs(), q)
            assert torch.equal(exact_quantile(w.abs(), q), expected), (n, q, ties)
            assert torch.equal(exact_quantile(w.abs().view(1, -1, 1), q), expected)  # any shape
            cache = QuantileCache()
            assert torch.equal(cache.quantile_abs(w, q), expected), (n, q, ties)  # signs allowed
            assert torch.equal(cache.quantile_abs(w, q), expected)  # second call: from the cache


def test_quantile_rank_by_hand():
    # float32(0.99) = 0.99000000953674316; rank = q32·(n − 1) in double
    below, above, weight = quantile_rank(201, 0.99)  # 198.0000019073
    assert (below, above) == (198, 199)
    assert weight == pytest.approx(1.9073486e-06, rel=1e-6)
    below, above, weight = quantile_rank(101, 0.99)  # 99.00000095
    assert (below, above) == (99, 100) and weight == pytest.approx(9.5367432e-07, rel=1e-6)
    assert quantile_rank(4, 0.5) == (1, 2, 0.5)  # rank 1.5
    assert quantile_rank(5, 0.5) == (2, 2, 0.0)  # rank 2: one order statistic
    assert quantile_rank(10, 1.0) == (9, 9, 0.0)
    assert quantile_rank(1, 0.99) == (0, 0, 0.0)


def test_quantile_rank_in_float32_as_torch_computes_it_off_the_cpu():
    # n = 201: 198.0000019073 rounds to 198.0 in float32 (spacing 1.5e-5): one order statistic
    assert quantile_rank(201, 0.99, True) == (198, 198, 0.0)
    # n = 18432 (a 64x32x3x3 conv): rank 18246.6901758 in double, 18246.689453125 in float32
    assert quantile_rank(18432, 0.99)[2] == pytest.approx(0.6901758, abs=1e-6)
    assert quantile_rank(18432, 0.99, True) == (18246, 18247, 0.689453125)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("n", [201, 18432, 100_003, 2**22 + 3])
@pytest.mark.parametrize("q", [0.5, 0.9, 0.99, 0.999])
def test_exact_quantile_equals_torch_quantile_on_cuda(n, q):
    # order statistics 1e-3 apart, so the interpolation weight shows in the result
    x = torch.arange(n, dtype=torch.float32, device="cuda") * 1e-3
    x = x[torch.randperm(n, generator=torch.Generator().manual_seed(n)).cuda()]
    assert torch.equal(exact_quantile(x, q), torch.quantile(x, q))
    assert torch.equal(QuantileCache().quantile_abs(-x, q), torch.quantile(x, q))


def test_small_and_empty():
    assert exact_quantile(torch.tensor([-3.0]).abs(), 0.99).item() == 3.0
    # n = 2: rank 0.99 → 1 + 0.99·(4 − 1) in float32 arithmetic, as torch.quantile
    two = torch.tensor([1.0, 4.0])
    assert torch.equal(exact_quantile(two, 0.99), torch.quantile(two, 0.99))
    assert exact_quantile(two, 0.99).item() == pytest.approx(3.97, rel=1e-6)
    assert exact_quantile(torch.empty(0), 0.99).item() == 0.0


def test_cache_stays_exact_under_small_steps_and_rebuilds_after_a_jump(path):
    n = 60_000
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, generator=g)
    # one cache asked for several quantiles: the set kept for 0.99 (the top 1%
    # and a margin) cannot hold the top half, so 0.5 must rebuild, not index past it
    cache = QuantileCache()
    for q in (0.99, 0.5, 0.99, 0.9):
        assert torch.equal(cache.quantile_abs(w, q), torch.quantile(w.abs(), q))
    assert (cache.hits, cache.rebuilds) == (2, 2)
    cache = QuantileCache()
    cache.quantile_abs(w, 0.99)
    assert (cache.hits, cache.rebuilds) == (0, 1)

    # small optimizer-like steps: the top set barely moves, every call is a proven hit
    for _ in range(40):
        w.add_(torch.randn(n, generator=g), alpha=1e-3)
        assert torch.equal(cache.quantile_abs(w, 0.99), torch.quantile(w.abs(), 0.99))
    assert (cache.hits, cache.rebuilds) == (40, 1)

    # one weight from far below jumps above R: the proof fails, the set is rebuilt
    small = int(w.abs().argmin())
    w[small] = 50.0
    assert torch.equal(cache.quantile_abs(w, 0.99), torch.quantile(w.abs(), 0.99))
    assert (cache.hits, cache.rebuilds) == (40, 2)

    # a big jump: completely new weights
    w = torch.randn(n, generator=g) * 3
    assert torch.equal(cache.quantile_abs(w, 0.99), torch.quantile(w.abs(), 0.99))
    assert cache.rebuilds == 3
    for _ in range(5):  # and hits again from the new set
        w.mul_(1.0001)
        assert torch.equal(cache.quantile_abs(w, 0.99), torch.quantile(w.abs(), 0.99))
    assert (cache.hits, cache.rebuilds) == (45, 3)

    # ties at the selected rank: many copies of the same magnitude
    w = torch.randn(n, generator=g)
    w[w.abs() > 2.0] = -2.5
    for _ in range(3):
        assert torch.equal(cache.quantile_abs(w, 0.99), torch.quantile(w.abs(), 0.99))
    assert cache.hits == 47  # a rebuild for the new set, then two hits

    # another size: rebuilt, never mixed up
    w = torch.randn(n + 1, generator=g)
    assert torch.equal(cache.quantile_abs(w, 0.99), torch.quantile(w.abs(), 0.99))
    assert cache.rebuilds == 5


def test_cache_in_inference_mode(path):
    w = torch.randn(30_000)
    cache = QuantileCache()
    with torch.inference_mode():
        assert torch.equal(cache.quantile_abs(w, 0.99), torch.quantile(w.abs(), 0.99))
    assert cache.idx is None  # inference tensors are not kept
    cache.quantile_abs(w, 0.99)
    with torch.inference_mode():  # an index built outside is used inside
        assert torch.equal(cache.quantile_abs(w, 0.99), torch.quantile(w.abs(), 0.99))
    assert (cache.hits, cache.rebuilds) == (1, 2)


def _sorted_quantile(w: torch.Tensor, q: float, floor: float) -> torch.Tensor:
    """The linear-interpolation quantile of |w| by sorting, for ranks among the values ≥ floor.

    Sorting only the tail keeps this fast; the elements below ``floor`` are
    counted, not sorted. Ranks as ``torch.quantile``: float32(q)·(n − 1).
    """
    a = w.abs()
    n = a.numel()
    tail = a[a >= floor].sort().values
    offset = n - tail.numel()
    rank = float(np.float32(q)) * (n - 1)
    below, above = math.floor(rank), math.ceil(rank)
    assert below >= offset, "floor too high for this quantile"
    weight = float(np.float32(rank - below))
    return torch.lerp(tail[below - offset], tail[above - offset], weight)


def test_more_than_2_pow_24_elements():
    n = 2**24 + 3  # torch.quantile used to refuse inputs larger than 2**24
    w = torch.randn(n, generator=torch.Generator().manual_seed(5))
    expected = _sorted_quantile(w, 0.99, floor=2.0)
    assert torch.equal(exact_quantile(w.abs(), 0.99), expected)
    cache = QuantileCache()
    assert torch.equal(cache.quantile_abs(w, 0.99), expected)
    w.mul_(1.5)
    assert torch.equal(cache.quantile_abs(w, 0.99), _sorted_quantile(w, 0.99, floor=3.0))
    assert (cache.hits, cache.rebuilds) == (1, 1)


# -- the one-pass selection of every layer (core/_group.py) -----------------------------------
@pytest.mark.parametrize("ties", [False, True])
def test_segmented_selection_equals_torch_quantile_per_layer(ties):
    from codeq_cli.core import _group
    from codeq_cli.core.quantizer import DeadZoneQuantizer

    g = torch.Generator().manual_seed(7 + ties)
    sizes = [1, 2, 3, 100, 1023, 1024, 1025, 5000, 20_001]
    qs = [0.99, 0.5, 1.0, 0.01, 0.99, 0.37, 0.9, 0.99, 0.999]
    ws = [torch.randint(-3, 4, (n,), generator=g).float() if ties else torch.randn(n, generator=g) * 10 ** (i % 3 - 1)
          for i, n in enumerate(sizes)]
    ws[3][:50] = 0.0  # zeros below the rank: they sort with the slots' padding
    qzs = [DeadZoneQuantizer(4, quantile=q) for q in qs]
    layout = _group._Layout(qzs, ws)
    buf = _group._fill(layout, ws)
    R = _group.layer_quantiles(buf.abs(), layout)
    for i, (w, q) in enumerate(zip(ws, qs)):
        assert torch.equal(R[i], torch.quantile(w.abs(), q)), (sizes[i], q)


def test_segmented_selection_on_bit_patterns_that_differ_in_the_last_pass():
    # magnitudes one ulp apart: the first two passes (15 + 8 bits) cannot tell them apart
    from codeq_cli.core import _group
    from codeq_cli.core.quantizer import DeadZoneQuantizer

    base = torch.tensor(1.5).view(torch.int32)
    w = (base + torch.arange(256, dtype=torch.int32)).view(torch.float32)[torch.randperm(256)]
    w = torch.cat([w, -w[:40]])
    layout = _group._Layout([DeadZoneQuantizer(4)], [w])
    R = _group.layer_quantiles(_group._fill(layout, [w]).abs(), layout)
    assert torch.equal(R[0], torch.quantile(w.abs(), 0.99))

"""The dead-zone quantizer (``docs/method.md``, "The quantizer") against hand-computed
values, the literal transcription in ``codeq_cli.testing.reference`` and finite
differences of the straight-through surrogate, on both execution paths (numba
fused loops and eager PyTorch)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from codeq_cli.core import _kernels
from codeq_cli.testing.reference import reference_dequantize
from codeq_cli.core.quantizer import EPS, DeadZoneQuantizer, Encoded, dequantize

TANH3 = math.tanh(3.0)  # 0.9950547536867305


@pytest.fixture(params=["numba", "eager"])
def path(request, monkeypatch):
    """Run the test once on the fused numba loops and once on the eager chain.

    ``CODEQ_KERNELS`` is read once (``lru_cache`` on ``_kernels._numba``), so
    the cache is cleared on the way in and on the way out.
    """
    if request.param == "eager":
        monkeypatch.setenv("CODEQ_KERNELS", "torch")
    else:
        monkeypatch.delenv("CODEQ_KERNELS", raising=False)
    _kernels._numba.cache_clear()
    probe = torch.zeros(3)
    assert _kernels.usable(probe) == (request.param == "numba")
    yield request.param
    monkeypatch.delenv("CODEQ_KERNELS", raising=False)
    _kernels._numba.cache_clear()


@pytest.fixture
def numba_on(monkeypatch):
    """The fused loops enabled whatever the environment says (``CODEQ_KERNELS``)."""
    monkeypatch.delenv("CODEQ_KERNELS", raising=False)
    _kernels._numba.cache_clear()
    assert _kernels._numba() is not None, "numba is a dependency: the fused path must be available"
    yield
    _kernels._numba.cache_clear()


def r_one(values, n: int = 201, fill: float = 0.25) -> torch.Tensor:
    """``values`` padded with ``fill`` to ``n`` elements, plus a guarantee that R = 1.

    The caller puts exactly three entries of magnitude 1 and one of magnitude
    5 into ``values`` (everything else below 1). ``torch.quantile`` at 0.99
    with n = 201 interpolates between the order statistics 198 and 199
    (rank float32(0.99)·200 = 198.0000019), which are both 1.0: R = 1 exactly.
    """
    w = torch.tensor(list(values) + [fill] * (n - len(values)), dtype=torch.float32)
    assert torch.quantile(w.abs(), 0.99).item() == 1.0
    return w


# ---------------------------------------------------------------- hand-computed


BASE = [0.0, 0.002, -0.002, 0.008, -0.008, 0.3, -0.3, 0.5, -0.5, 0.9, -0.9, 1.0, -1.0, 1.0, 5.0]


def test_initial_state_4_bits(path):
    # θ_dz = 3, b = 4 → Q = 7, R = 1:
    #   d = 2R(1 − tanh 3) = 2(1 − 0.99505475) = 0.00989049      (d/2 = 0.00494525)
    #   s = (R − d/2)/(Q − ½) + ε = 0.99505475/6.5 + 1e-8 = 0.15308536
    #   δ = d/2 − s/2 = 0.00494525 − 0.07654268 = −0.07159743    (negative: d < s)
    #   q = round((|w| − δ)/s):  0.002 → 0.487 → 0;   0.008 → 0.507 → 1;
    #       0.3 → 2.427 → 2;  0.5 → 3.734 → 4;  0.9 → 6.347 → 6;  1.0 → 7.000 → 7;
    #       5.0 → 33.1 → clipped to 7;  0.25 (padding) → 2.101 → 2
    #   ŵ = s·q + δ·sign(q):  1 → 0.08148792,  2 → 0.23457328,  4 → 0.54074399,
    #       6 → 0.84691471,  7 → 7s + δ = R + ε(Q − ½) = 1.000000065
    qz = DeadZoneQuantizer(4)
    assert qz.theta_dz.item() == 3.0 and qz.theta_bit is None
    w = r_one(BASE)
    st = qz.stats(w)
    assert st["R"] == 1.0
    assert st["bits"] == 4
    assert_close(st["dead_zone"], 2 * (1 - TANH3), rtol=1e-5, atol=0)
    assert_close(st["step"], (1 - (1 - TANH3)) / 6.5 + EPS, rtol=1e-6, atol=0)
    assert_close(st["shift"], -0.07159743, rtol=1e-5, atol=0)
    assert st["shift"] < 0 and st["dead_zone"] < st["step"]

    e = qz.encode(w)
    assert e.codes.dtype == torch.int8
    assert e.codes[: len(BASE)].tolist() == [0, 0, 0, 1, -1, 2, -2, 4, -4, 6, -6, 7, -7, 7, 7]
    assert (e.codes[len(BASE):] == 2).all()
    out = qz(w)
    expected = torch.tensor(
        [0, 0, 0, 0.08148792, -0.08148792, 0.23457328, -0.23457328, 0.54074399, -0.54074399,
         0.84691471, -0.84691471, 1.0, -1.0, 1.0, 1.0]
    )
    assert_close(out[: len(BASE)], expected, rtol=0, atol=3e-7)
    # 3 of 201 weights are pruned (0 and ±0.002)
    assert st["sparsity"] == pytest.approx(3 / 201)


def test_two_bits_every_kept_weight_is_plus_minus_R(path):
    # b = 2 → Q = 1:  s = (R − d/2)/(1 − ½) = 2R − d = 1.99010951,
    # δ = d/2 − s/2 = d − R = −0.99010951; the single level s + δ = R.
    # Pruning threshold d/2 = 0.00494525: 0.002 → 0, 0.008 → ±1.
    qz = DeadZoneQuantizer(2)
    w = r_one(BASE)
    st = qz.stats(w)
    assert_close(st["step"], 2 - 2 * (1 - TANH3) + 2 * EPS, rtol=1e-6, atol=0)
    assert_close(st["shift"], 2 * (1 - TANH3) - 1.0, rtol=1e-6, atol=0)
    e = qz.encode(w)
    assert e.bits == 2
    assert e.codes[: len(BASE)].tolist() == [0, 0, 0, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, 1]
    out = qz(w)
    kept = e.codes != 0
    assert_close(out[kept].abs(), torch.ones(int(kept.sum())), rtol=0, atol=2.4e-7)
    assert (out[~kept] == 0).all()


def test_eight_bits(path):
    # b = 8 → Q = 127, θ_dz = 3:  d = 0.00989049,  s = 0.99505475/126.5 = 0.00786606,
    # δ = 0.00494525 − 0.00393303 = 0.00101222 (positive now: d > s).
    #   0.008 → (0.008 − 0.00101222)/0.00786606 = 0.888 → 1 → ŵ = s + δ = 0.00887827
    #   0.3   → 38.01 → 38 → 38s + δ = 0.29992233
    #   0.9   → 114.29 → 114 → 0.89774254;   5.0 → clip 127 → R + 126.5ε = 1.00000127
    qz = DeadZoneQuantizer(8)
    w = r_one(BASE)
    e = qz.encode(w)
    assert e.bits == 8
    assert e.codes[: len(BASE)].tolist() == [0, 0, 0, 1, -1, 38, -38, 63, -63, 114, -114, 127, -127, 127, 127]
    out = qz(w)
    assert_close(out[[3, 5, 9, 14]], torch.tensor([0.00887827, 0.29992233, 0.89774254, 1.00000127]), rtol=0, atol=1e-6)

    # θ_dz = atanh(½) → tanh|θ_dz| = ½ → d = R = 1 (prune every |w| ≤ ½),
    # s = (1 − ½)/126.5 + ε = 0.00395258, δ = ½ − s/2 = 0.49802371.
    #   0.45 → 0;  0.55 → (0.55 − 0.49802371)/0.00395258 = 13.15 → 13 → ŵ = 13s + δ = 0.54940724
    #   0.75 → 63.75 → 64 → 0.75098878;  0.9 → 101.70 → 102 → 0.90118679
    qz = DeadZoneQuantizer(8, init_dz=math.atanh(0.5))
    w = r_one([0.45, -0.45, 0.55, -0.75, 0.9, 1.0, -1.0, 1.0, 5.0])
    st = qz.stats(w)
    assert_close(st["dead_zone"], 1.0, rtol=1e-6, atol=0)
    e = qz.encode(w)
    assert e.codes[:5].tolist() == [0, 0, 13, -64, 102]
    assert_close(qz(w)[:5], torch.tensor([0.0, 0.0, 0.54940724, -0.75098878, 0.90118679]), rtol=0, atol=1e-6)
    # the padding (0.25) is inside the dead zone too: 7 kept of 201 (0.55 … 5.0)
    assert int(torch.count_nonzero(e.codes)) == 7


def test_all_zero_tensor(path):
    # R = 0 → d = 0, s = ε, δ = −ε/2: (0 + ε/2)/ε = 0.5 rounds (to even) to 0.
    qz = DeadZoneQuantizer(4)
    w = torch.zeros(5, 4, requires_grad=True)
    e = qz.encode(w)
    assert e.codes.dtype == torch.int8 and not e.codes.any()
    out = qz(w)
    assert not out.any()
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    assert torch.isfinite(qz.theta_dz.grad)
    assert qz.stats(w)["sparsity"] == 1.0


def test_dead_zone_exactly_2R_prunes_everything_but_outliers(path):
    # θ_dz = 0 → tanh 0 = 0 → d = 2R = 2, d/2 = R: every |w| ≤ 1 is pruned (the
    # three ±1 included). s = 0/6.5 + ε = 1e-8, δ = R − ε/2 ≈ 1: the outlier 5.0
    # saturates at Q = 7, level 7ε + δ = R + ε(Q − ½) = 1 + 6.5e-8.
    qz = DeadZoneQuantizer(4, init_dz=0.0)
    w = r_one(BASE)
    st = qz.stats(w)
    assert st["dead_zone"] == 2.0
    assert st["step"] == pytest.approx(1e-8, rel=1e-6)
    e = qz.encode(w)
    assert e.codes.nonzero().flatten().tolist() == [14] and e.codes[14] == 7
    out = qz(w)
    assert_close(out[14], torch.tensor(1.0 + 6.5e-8), rtol=0, atol=1.2e-7)
    assert torch.count_nonzero(out) == 1
    assert st["sparsity"] == pytest.approx(200 / 201)


def test_dead_zone_near_2R(path):
    # θ_dz = 1e-4: d/2 = R(1 − tanh 1e-4) = 0.9999; s = 1e-4/6.5 = 1.5385e-5,
    # δ = 0.9999 − s/2 = 0.99989231. Every non-outlier below 0.9999 is pruned;
    # ±1.0 → (1 − 0.99989231)/1.5385e-5 = 7.0 → top level R; 5.0 → clipped to 7.
    qz = DeadZoneQuantizer(4, init_dz=1e-4)
    w = r_one(BASE)
    st = qz.stats(w)
    assert_close(st["dead_zone"], 2 * (1 - math.tanh(1e-4)), rtol=1e-6, atol=0)
    e = qz.encode(w)
    assert e.codes[: len(BASE)].tolist() == [0] * 11 + [7, -7, 7, 7]
    assert int(torch.count_nonzero(e.codes)) == 4
    assert_close(qz(w)[11:15], torch.tensor([1.0, -1.0, 1.0, 1.0]), rtol=0, atol=2.4e-7)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("theta", [3.0, 1.2, 0.6, 0.2, -0.8])
def test_magnitude_pruning_levels_and_top(path, bits, theta):
    """Codes are magnitude pruning at d/2; levels sit at ±(d/2 + s/2 + k·s); the top one is R."""
    torch.manual_seed(bits * 100 + int(theta * 10))
    w = torch.randn(40, 30) * 0.1
    w[0, :3] = torch.tensor([0.5, -0.6, 0.7])  # outliers above R: saturate
    qz = DeadZoneQuantizer(bits, init_dz=theta)
    st = qz.stats(w)
    R, d, s, Q = st["R"], st["dead_zone"], st["step"], 2 ** (bits - 1) - 1
    e = qz.encode(w)
    out = qz(w)

    a = w.abs().double()
    near = (a - d / 2).abs() < 1e-6  # ulp-level ties with the threshold: not asserted
    assert near.sum() <= 1
    pruned = e.codes == 0
    assert torch.equal(pruned[~near], (a <= d / 2)[~near])
    assert (out[pruned] == 0).all()

    k = e.codes[~pruned].abs().double() - 1  # level index 0 … Q−1
    assert k.min() >= 0 and k.max() == Q - 1
    levels = d / 2 + s / 2 + k * s
    assert_close(out[~pruned].abs().double(), levels, rtol=1e-6, atol=1e-7)
    assert torch.equal(torch.sign(out[~pruned]), torch.sign(w[~pruned]))
    # the top level: R + ε(Q − ½)
    assert_close(out.abs().max().double(), torch.tensor(R + EPS * (Q - 0.5), dtype=torch.float64), rtol=3e-7, atol=0)


@pytest.mark.parametrize(
    "theta_bit, bits",
    [
        # round(tanh|θ| · (8 − 2) + 2)
        (0.0, 2),  # 0 · 6 + 2 = 2
        (0.1, 3),  # 0.0997 · 6 + 2 = 2.598 → 3
        (0.2, 3),  # 0.1974 · 6 + 2 = 3.184 → 3
        (0.35, 4),  # 0.3364 · 6 + 2 = 4.018 → 4
        (0.5, 5),  # 0.4621 · 6 + 2 = 4.773 → 5
        (-0.5, 5),  # |θ|
        (0.7, 6),  # 0.6044 · 6 + 2 = 5.626 → 6
        (1.0, 7),  # 0.7616 · 6 + 2 = 6.570 → 7
        (1.5, 7),  # 0.9051 · 6 + 2 = 7.431 → 7
        (3.0, 8),  # 0.9951 · 6 + 2 = 7.970 → 8 (the initial state)
    ],
)
def test_mixed_precision_bit_width(path, theta_bit, bits):
    qz = DeadZoneQuantizer(None, init_bit=theta_bit)
    assert qz.mixed
    assert qz.bit_width().item() == bits
    w = r_one(BASE)
    e = qz.encode(w)
    assert e.bits == bits == qz.stats(w)["bits"]
    assert e.codes.abs().max() == 2 ** (bits - 1) - 1  # the outlier saturates at Q


def test_mixed_precision_custom_range():
    # b_min = 3, b_max = 6: round(tanh|θ| · 3 + 3);  θ = 0.5 → 0.4621·3 + 3 = 4.386 → 4
    assert DeadZoneQuantizer(None, b_min=3, b_max=6, init_bit=0.5).bit_width().item() == 4
    assert DeadZoneQuantizer(None, b_min=3, b_max=6, init_bit=0.0).bit_width().item() == 3
    assert DeadZoneQuantizer(None, b_min=3, b_max=6, init_bit=5.0).bit_width().item() == 6


@pytest.mark.parametrize("bits", [2, 4, 8, None])
@pytest.mark.parametrize("shape", [(16, 8, 3, 3), (12, 20), (37,), (64, 32, 3, 3)])
def test_encode_decodes_to_forward_exactly(path, bits, shape):
    torch.manual_seed(len(shape))
    w = torch.randn(shape) * 0.05
    qz = DeadZoneQuantizer(bits, init_dz=1.1, init_bit=0.6)
    e = qz.encode(w)
    assert isinstance(e, Encoded)
    assert e.codes.dtype == torch.int8 and e.codes.shape == w.shape
    assert isinstance(e.step, float) and isinstance(e.shift, float) and isinstance(e.bits, int)
    out = qz(w)
    c = e.codes.to(torch.float32)
    assert torch.equal(e.step * c + e.shift * torch.sign(c), out)
    assert torch.equal(e.decode(), out)
    assert torch.equal(dequantize(e.codes, e.step, e.shift), out)


def test_validation():
    for bad in (1, 9, 4.5):
        with pytest.raises(ValueError, match="bits="):
            DeadZoneQuantizer(bad)
    with pytest.raises(ValueError, match="b_min"):
        DeadZoneQuantizer(None, b_min=6, b_max=3)
    with pytest.raises(ValueError, match="quantile"):
        DeadZoneQuantizer(4, quantile=0.0)


# ------------------------------------------------------------ the oracle


def _weights(shape, seed: int) -> torch.Tensor:
    """Random weights with exact zeros, ties and outliers (saturated codes)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.1
    flat = w.view(-1)
    flat[::7] = 0.0  # exactly zero
    flat[1::11] = 0.001  # inside the dead zone (pruned)
    flat[2:4] = torch.tensor([2.0, -3.0])  # far above R: saturated
    return w


CASES = [  # (bits, θ_dz, θ_bit)
    (2, 3.0, None),
    (4, 3.0, None),
    (8, 3.0, None),
    (4, 0.8, None),
    (4, -0.4, None),
    (None, 3.0, 3.0),
    (None, 0.7, 0.4),
    (None, -1.0, -0.8),
]


@pytest.mark.parametrize("bits, theta_dz, theta_bit", CASES)
@pytest.mark.parametrize("shape", [(6, 3, 3, 3), (12, 20), (37,), (64, 32, 3, 3)])
def test_matches_reference(path, shape, bits, theta_dz, theta_bit):
    w = _weights(shape, seed=len(shape) * 10 + (bits or 0))
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1))

    qz = DeadZoneQuantizer(bits, init_dz=theta_dz, init_bit=theta_bit if bits is None else 3.0)
    w1 = w.clone().requires_grad_()
    out = qz(w1)
    out.backward(g)

    w2 = w.clone().requires_grad_()
    tdz = torch.tensor(theta_dz, requires_grad=True)
    tbit = torch.tensor(theta_bit, requires_grad=True) if bits is None else None
    ref = reference_dequantize(w2, tdz, tbit, bits=bits)
    ref.backward(g)

    assert torch.equal(out, ref)  # forward: bit for bit
    # ∂ŵ/∂w = 1 exactly on our path, for pruned, saturated and zero weights alike;
    # the reference gets s·(1/s) ≈ 1, and freezes exact zeros (abs'(0) = 0)
    assert torch.equal(w1.grad, g)
    nz = w != 0
    assert_close(w2.grad[nz], g[nz])
    assert_close(qz.theta_dz.grad, tdz.grad, rtol=1e-4, atol=1e-5)
    if bits is None:
        assert_close(qz.theta_bit.grad, tbit.grad, rtol=1e-4, atol=1e-5)
    # no gradient through the quantile
    assert not qz.absmax(w1).requires_grad


def _surrogate(w: torch.Tensor, codes: torch.Tensor, R: float, bits, tdz: float, tbit: float | None,
               tdz0: float, tbit0: float | None) -> torch.Tensor:
    """``Σ g·ŵ`` with every straight-through op replaced by its linearisation at (θ_dz0, θ_bit0).

    Float64. At θ: b(θ) = b0 + 6(tanh|θ_bit| − tanh|θ_bit0|) (round is identity
    plus a constant), Q = 2^(b−1) − 1 only inside s (the clip is frozen),
    d = 2R(1 − tanh|θ_dz|), s = (R − d/2)/(Q − ½) + ε, δ = d/2 − s/2;
    x = x0 − sign(w)(δ − δ0) (relu straight through, value x0 = sign(w)·relu(|w| − δ0)),
    r = x/s, q = q0 + r − r0 (round and clip straight through), ŵ = s·q + δ·sign(q0).
    """

    def scalars(t_dz, t_bit):
        if bits is None:
            b0 = round(math.tanh(abs(tbit0)) * 6 + 2)
            b = b0 + 6 * (math.tanh(abs(t_bit)) - math.tanh(abs(tbit0)))
        else:
            b = bits
        Q = 2.0 ** (b - 1) - 1
        d = 2 * R * (1 - math.tanh(abs(t_dz)))
        s = (R - d / 2) / (Q - 0.5) + EPS
        return s, d / 2 - s / 2

    w = w.double()
    q0 = codes.double()
    s0, sh0 = scalars(tdz0, tbit0)
    x0 = torch.sign(w) * (w.abs() - sh0).clamp(min=0)
    r0 = x0 / s0
    s, sh = scalars(tdz, tbit)
    x = x0 - torch.sign(w) * (sh - sh0)
    q = q0 + x / s - r0
    return s * q + sh * torch.sign(q0)


@pytest.mark.parametrize("bits, theta_dz, theta_bit", [(4, 3.0, None), (2, 0.9, None), (8, -0.5, None),
                                                        (None, 3.0, 3.0), (None, 0.6, 0.45), (None, 1.3, -0.9)])
def test_theta_gradients_match_finite_differences(path, bits, theta_dz, theta_bit):
    w = _weights((24, 16), seed=7)
    g = torch.randn(24, 16, generator=torch.Generator().manual_seed(3)).double()
    qz = DeadZoneQuantizer(bits, init_dz=theta_dz, init_bit=theta_bit if bits is None else 3.0)
    qz(w).backward(g.float())
    R = float(qz.absmax(w))
    codes = qz.encode(w).codes

    def loss(tdz, tbit):
        return float((g * _surrogate(w, codes, R, bits, tdz, tbit, theta_dz, theta_bit)).sum())

    # sanity: at θ0 the surrogate is the quantizer's output
    assert_close(_surrogate(w, codes, R, bits, theta_dz, theta_bit, theta_dz, theta_bit).float(), qz(w),
                 rtol=0, atol=1e-6)
    h = 1e-5
    fd_dz = (loss(theta_dz + h, theta_bit) - loss(theta_dz - h, theta_bit)) / (2 * h)
    assert_close(qz.theta_dz.grad.item(), fd_dz, rtol=1e-4, atol=1e-4)
    if bits is None:
        fd_bit = (loss(theta_dz, theta_bit + h) - loss(theta_dz, theta_bit - h)) / (2 * h)
        assert_close(qz.theta_bit.grad.item(), fd_bit, rtol=1e-4, atol=1e-4)


def test_gradient_paths_agree(numba_on):
    """θ gradients of the fused and eager paths agree (same shapes, same weights)."""
    w = _weights((32, 16, 3, 3), seed=11)
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(2))
    grads = []
    for eager in (False, True):
        qz = DeadZoneQuantizer(None, init_dz=0.9, init_bit=0.5)
        w1 = w.clone().requires_grad_()
        orig = _kernels.usable
        try:
            if eager:
                _kernels.usable = lambda t: False
            qz(w1).backward(g)
        finally:
            _kernels.usable = orig
        assert torch.equal(w1.grad, g)
        grads.append((qz.theta_dz.grad, qz.theta_bit.grad))
    assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-6)
    assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-6)


# --------------------------------------------------- memory layouts, both paths


def _forward_and_codes(w: torch.Tensor, qz: DeadZoneQuantizer, eager: bool):
    orig = _kernels.usable
    try:
        if eager:
            _kernels.usable = lambda t: False
        w1 = w.detach().clone(memory_format=torch.preserve_format).requires_grad_()
        out = qz(w1)
        out.backward(torch.ones_like(out))
        return out.detach(), qz.encode(w1).codes, w1.grad
    finally:
        _kernels.usable = orig


@pytest.mark.parametrize("bits", [4, None])
def test_channels_last_and_non_contiguous_weights(numba_on, bits):
    qz = DeadZoneQuantizer(bits, init_dz=1.0, init_bit=0.5)
    torch.manual_seed(0)
    base = torch.randn(32, 16, 3, 3) * 0.1

    cl = base.to(memory_format=torch.channels_last)
    assert not cl.is_contiguous() and _kernels.usable(cl)  # served by the fused loops
    out_f, codes_f, grad_f = _forward_and_codes(cl, qz, eager=False)
    out_e, codes_e, _ = _forward_and_codes(cl, qz, eager=True)
    out_c, codes_c, _ = _forward_and_codes(base, qz, eager=False)
    assert out_f.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out_f, out_e) and torch.equal(out_f, out_c)
    assert torch.equal(codes_f, codes_e) and torch.equal(codes_f, codes_c)
    assert torch.equal(grad_f, torch.ones_like(grad_f))

    # not dense: every other input channel; and a transposed matrix
    for nc in (base[:, ::2], base.view(32, -1).t()):
        assert not nc.is_contiguous() and not _kernels.usable(nc)
        out_n, codes_n, grad_n = _forward_and_codes(nc, qz, eager=False)  # falls back to eager
        out_f, codes_f, _ = _forward_and_codes(nc.contiguous(), qz, eager=False)  # fused
        out_e, codes_e, _ = _forward_and_codes(nc.contiguous(), qz, eager=True)
        assert torch.equal(out_n, out_f) and torch.equal(out_f, out_e)
        assert torch.equal(codes_n, codes_f) and torch.equal(codes_f, codes_e)
        assert torch.equal(grad_n, torch.ones_like(grad_n))


def test_env_switch_forces_the_eager_path(monkeypatch):
    monkeypatch.setenv("CODEQ_KERNELS", "torch")
    _kernels._numba.cache_clear()
    try:
        assert _kernels._numba() is None
        assert not _kernels.usable(torch.zeros(4))
    finally:
        monkeypatch.delenv("CODEQ_KERNELS")
        _kernels._numba.cache_clear()
    assert _kernels.usable(torch.zeros(4))


def test_a_nan_weight_stays_nan_on_both_paths(numba_on):
    # the fused loop used to map NaN to a pruned 0 (NaN > 0 is false), hiding a
    # diverged weight from the loss; the eager chain propagates it
    torch.manual_seed(0)
    w = torch.randn(64, 32, 3, 3) * 0.1  # above the cache threshold: R stays finite
    w[0, 0, 0, 0] = float("nan")
    qz = DeadZoneQuantizer(4)
    fused, _, _ = _forward_and_codes(w, qz, eager=False)
    eager, _, _ = _forward_and_codes(w, qz, eager=True)
    assert torch.isnan(fused[0, 0, 0, 0]) and torch.isnan(fused).sum() == 1
    assert_close(fused, eager, rtol=0, atol=0, equal_nan=True)


def test_channels_last_3d_weight(numba_on):
    qz = DeadZoneQuantizer(None, init_dz=1.0, init_bit=0.5)
    base = torch.randn(8, 4, 3, 3, 3) * 0.1
    cl = base.to(memory_format=torch.channels_last_3d)
    assert not cl.is_contiguous() and _kernels.usable(cl)
    out_f, codes_f, _ = _forward_and_codes(cl, qz, eager=False)
    out_e, codes_e, _ = _forward_and_codes(cl, qz, eager=True)
    assert torch.equal(out_f, out_e) and torch.equal(codes_f, codes_e)
    assert torch.equal(out_f, _forward_and_codes(base, qz, eager=False)[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bits, theta_dz, theta_bit", CASES)
def test_matches_reference_on_cuda(bits, theta_dz, theta_bit):
    """On an accelerator the eager chain runs (and R comes from ``topk``): same oracle."""
    w = _weights((64, 32, 3, 3), seed=3).cuda()
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(1)).cuda()
    qz = DeadZoneQuantizer(bits, init_dz=theta_dz, init_bit=theta_bit if bits is None else 3.0).cuda()
    w1 = w.clone().requires_grad_()
    out = qz(w1)
    out.backward(g)
    tdz = torch.tensor(theta_dz, device="cuda", requires_grad=True)
    tbit = torch.tensor(theta_bit, device="cuda", requires_grad=True) if bits is None else None
    w2 = w.clone().requires_grad_()
    ref = reference_dequantize(w2, tdz, tbit, bits=bits)
    ref.backward(g)
    assert torch.equal(qz.absmax(w), torch.quantile(w.abs().flatten(), 0.99))
    assert torch.equal(out, ref)
    assert torch.equal(w1.grad, g)
    assert_close(qz.theta_dz.grad, tdz.grad, rtol=1e-4, atol=1e-5)
    e = qz.encode(w)
    assert e.codes.device.type == "cuda" and torch.equal(e.decode(), out)


# -- the one-pass quantizer of every layer (core/_group.py) against the per-layer chain ----------
def _layers_model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.Conv2d(16, 32, 3), torch.nn.Conv2d(32, 8, 1),
                            torch.nn.Flatten(), torch.nn.Linear(8 * 2 * 2, 10), torch.nn.Linear(10, 3, bias=False))
    m[1].to(memory_format=torch.channels_last)
    with torch.no_grad():
        m[4].weight.mul_(50.0)  # another scale
    m[5].weight = torch.nn.Parameter(torch.randn(10, 3).t())  # not contiguous: copied in row order
    return m


@pytest.mark.parametrize("bits", [None, 4, 2])
def test_one_pass_matches_the_per_layer_chain(bits, monkeypatch):
    from codeq_cli.core.insert import quantize_, quantized_weights

    monkeypatch.setenv("CODEQ_KERNELS", "torch")
    _kernels._numba.cache_clear()
    m = _layers_model()
    quantize_(m, bits=bits)
    g = torch.Generator().manual_seed(1)
    qws = list(quantized_weights(m))
    assert not qws[-1].original.is_contiguous()
    with torch.no_grad():
        for qw in qws:
            qw.quantizer.theta_dz.fill_(float(torch.empty(()).uniform_(0.3, 3.0, generator=g)))
            if qw.quantizer.theta_bit is not None:
                qw.quantizer.theta_bit.fill_(float(torch.empty(()).uniform_(0.0, 3.0, generator=g)))
    upstream = [torch.randn(qw.original.shape, generator=g) for qw in qws]
    seen = {}
    for name, fn in (("one pass", lambda qz, w: qz(w)), ("per layer", lambda qz, w: qz.forward_per_layer(w))):
        m.zero_grad(set_to_none=True)
        outs = [fn(qw.quantizer, qw.original) for qw in qws]
        sum((y * u).sum() for y, u in zip(outs, upstream)).backward()
        seen[name] = ([y.detach() for y in outs], [p.grad.clone() for p in m.parameters() if p.grad is not None])
    _kernels._numba.cache_clear()
    for a, b, qw in zip(seen["one pass"][0], seen["per layer"][0], qws):
        assert torch.equal(a, b)  # bit for bit
        dense = _kernels.flat(qw.original) is not None
        assert a.stride() == b.stride() or not dense  # in the weight's layout (others: row order)
    assert len(seen["one pass"][1]) == len(seen["per layer"][1]) == len(list(m.parameters())) - 4  # not the biases
    for a, b in zip(seen["one pass"][1], seen["per layer"][1]):
        assert_close(a, b, rtol=1e-5, atol=1e-7)  # the sums are reassociated


def test_one_pass_results_are_taken_once_and_only_while_valid(monkeypatch):
    from codeq_cli.core.insert import quantize_, quantized_weights

    monkeypatch.setenv("CODEQ_KERNELS", "torch")
    _kernels._numba.cache_clear()
    m = _layers_model()
    quantize_(m, bits=None)
    x = torch.randn(2, 3, 6, 6)
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    for _ in range(2):  # a step between two forwards: new weights, new pass
        opt.zero_grad()
        y = m(x)
        y.sum().backward()
        opt.step()
    for qw in quantized_weights(m):
        assert torch.equal(qw.module.weight, qw.quantizer.forward_per_layer(qw.original))
    # two forwards before one backward (no step between): two passes, both in the graph
    m.zero_grad(set_to_none=True)
    (m(x).sum() + m(x).sum()).backward()
    two = [p.grad.clone() for p in m.parameters()]
    m.zero_grad(set_to_none=True)
    (2 * m(x).sum()).backward()
    for a, b in zip(two, (p.grad for p in m.parameters())):
        assert_close(a, b)
    # a pass made under no_grad is not used where gradients are wanted
    with torch.no_grad():
        m[0].weight
    assert m[0].weight.requires_grad
    # a layer the forward does not use: no gradient for its weight; its logits take part in the
    # pass's logit vectors, and get exactly zero there (docs/method.md, "Decisions")
    m.zero_grad(set_to_none=True)
    m[0](x).sum().backward()
    first = list(quantized_weights(m))[0].quantizer
    assert first.theta_dz.grad is not None and m[0].parametrizations.weight.original.grad is not None
    assert torch.count_nonzero(first.theta_dz.grad) == 1
    assert m[4].parametrizations.weight.original.grad is None
    unused = list(quantized_weights(m))[3].quantizer
    assert torch.equal(unused.theta_dz.grad, torch.zeros(())) and torch.equal(unused.theta_bit.grad, torch.zeros(()))
    _kernels._numba.cache_clear()


def test_one_pass_of_many_layers_is_bit_for_bit_and_encodes_what_it_gives(monkeypatch):
    """More layers than a vector register holds: the vectorised scalar chain equals each layer's own."""
    from codeq_cli.core.insert import quantize_, quantized_weights

    monkeypatch.setenv("CODEQ_KERNELS", "torch")
    _kernels._numba.cache_clear()
    torch.manual_seed(3)
    m = torch.nn.Sequential(*[torch.nn.Linear(12, 12) for _ in range(24)])
    quantize_(m, bits=None)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for qw in quantized_weights(m):
            qw.quantizer.theta_dz.fill_(float(torch.empty(()).uniform_(-3.0, 3.0, generator=g)))
            qw.quantizer.theta_bit.fill_(float(torch.empty(()).uniform_(-3.0, 3.0, generator=g)))
    for qw in quantized_weights(m):
        w_hat = qw.module.weight
        assert torch.equal(w_hat, qw.quantizer.forward_per_layer(qw.original))
        assert torch.equal(qw.quantizer.encode(qw.original).decode(), w_hat.detach())
    _kernels._numba.cache_clear()


def test_a_quantized_model_copies_between_passes(monkeypatch):
    import copy

    from codeq_cli.core.insert import quantize_

    monkeypatch.setenv("CODEQ_KERNELS", "torch")
    _kernels._numba.cache_clear()
    m = _layers_model()
    quantize_(m, bits=4)
    m[0].weight  # a pass whose other results wait in the group (tensors in an autograd graph)
    twin = copy.deepcopy(m)
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(twin(x), m(x))
    with torch.inference_mode():
        assert torch.equal(twin(x), m(x))
    _kernels._numba.cache_clear()

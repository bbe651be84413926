r"""The CoDeQ dead-zone quantizer.

Wenshøj, Chen, Pepin, Selvan (2025), *CoDeQ: joint pruning and quantization
through a learnable dead zone*, arXiv:2512.12981; reference code
github.com/saintslab/CoDeQ. The specification codeq follows is
``docs/method.md``, "The quantizer"; this module is pure tensor code.

For one weight tensor ``w`` with learnable scalars ``θ_dz`` (and ``θ_bit`` in
mixed precision):

1. ``R = quantile(|w|, 0.99)`` (linear interpolation, no gradient)
2. ``b`` = the fixed bit-width, or ``round(tanh|θ_bit| · (b_max − b_min) + b_min)``
   with a straight-through round
3. ``Q = 2^(b−1) − 1`` (codes ``−Q … Q``)
4. ``d = 2R (1 − tanh|θ_dz|)``                      dead-zone width, in ``[0, 2R]``
5. ``s = (R − d/2) / (Q − 1/2) + ε``, ``ε = 1e-8``  step
6. ``δ = d/2 − s/2``                                shift
7. ``q = clip(round(sign(w) · relu(|w| − δ) / s), −Q, Q)``
8. ``ŵ = s · q + δ · sign(q)``

Every ``|w| ≤ d/2`` is pruned; non-zero levels sit at ``±(d/2 + s/2 + k s)``.

Gradients: straight-through on round, relu and clip, none through the quantile
and none through ``sign``. Hence ``∂ŵ/∂w = 1`` for every weight, and with
``r = sign(w)·relu(|w| − δ)/s`` (the unrounded code)

    ∂L/∂s = Σ g · (q − r)              ∂L/∂δ = Σ g · (sign(q) − sign(w))

from which autograd carries the gradient to ``θ_dz`` and ``θ_bit`` through
``d``, ``s`` and ``δ``. :class:`_DeadZoneSTE` computes ``ŵ`` and these two
sums in one autograd node, without the chain of straight-through nodes a
literal transcription builds (that one lives in :mod:`codeq_cli.testing.reference`).

**Decision** (the specification says ``∂ŵ/∂w ≈ 1`` for every weight): a weight
that is exactly zero also gets gradient 1; in the reference code ``abs'(0) = 0``
freezes it.

codeq's extension, ``grid`` (``docs/method.md``, "Training on the export's
grid"): the levels' offset ``δ`` is replaced in the forward pass by ``δ'``, the
nearest value at which every level ``s·k + δ'`` is an integer code of an int8
grid ``s/m`` with codes up to ``grid`` (:func:`grid_shift`), straight through:
the codes (so the dead zone) and every gradient are those of ``δ``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from codeq_cli.core import _group, _kernels
from codeq_cli.core._select import QuantileCache
from codeq_cli.core.granularity import Granularity, PerTensor, check as _check_granularity

EPS = 1e-8
B_MIN, B_MAX = 2, 8
# Weight code limits of the int8 export (``--reduce-range``: 7-bit codes, the default; ``--full-range``)
CODE_LIMIT = {"reduce-range": 63, "full-range": 127}


def widest_bits(limit: int) -> int:
    """The most bits whose levels ``s·k + δ`` (``k ≤ Q = 2^(b−1) − 1``) fit codes up to ``limit`` for some ``δ > 0``: ``Q < limit``."""
    return max(b for b in range(B_MIN, B_MAX + 1) if 2 ** (b - 1) - 1 < limit)


@dataclass(frozen=True)
class Encoded:
    """The integer form of a quantized weight.

    ``step * codes + shift * sign(codes)`` (float32 arithmetic, in that order)
    reproduces the quantizer's output bit for bit.
    """

    codes: Tensor  # int8, the shape of the weight
    step: float
    shift: float
    bits: int
    nonzero: int | None = field(default=None, compare=False)  # non-zero codes, when the encoder counted them

    def decode(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize(self.codes, self.step, self.shift, dtype)


def grid_shift(step: Tensor, shift: Tensor, qmax: Tensor | float, limit: int) -> Tensor:
    """``δ'``: the offset nearest ``δ`` at which the levels ``±(s·k + δ')``, ``k = 1 … Q``, sit on an integer grid.

    The grids are ``σ = s/m``, ``m = 1 … limit``, with codes ``Q·m + j ≤ limit``
    where ``j = round(m·δ/s)`` (the levels keep their spacing ``s``; only ``δ``
    moves, to ``j·s/m``). Of the grids that fit, the one nearest ``δ``, the
    coarser on a tie. Where none fits (``δ/s > limit − Q − 1/2``: a wide dead
    zone at a fine step) ``δ`` itself: no grid of that spacing holds the levels,
    the export rounds them to a coarser one and reports the error (moving them
    in to fit would put the first level far inside the dead zone). These are the candidates
    of the export's :func:`codeq_cli.formats.onnx_int8.int8_grid` that keep the
    spacing, so a layer trained on ``δ'`` exports without rounding. On device,
    no read back (it runs inside the forward pass). ``Q ≤ limit`` is assumed.
    """
    with torch.no_grad():
        m = torch.arange(1, limit + 1, device=step.device, dtype=step.dtype)
        j = torch.round(m * (shift / step))
        fits = qmax * m + j <= limit
        err = torch.where(fits, (j * (step / m) - shift).abs(), torch.full_like(m, math.inf))
        i = torch.argmin(err)  # the first minimum: the coarsest grid among equals
        return torch.where(torch.isfinite(err[i]), j[i] * (step / m[i]), shift)


def _eager_codes(w: Tensor, qmax, s: Tensor, shift: Tensor) -> Tensor:
    """Step 7 in ``w``'s dtype, without gradients: ``clip(round(sign(w)·relu(|w| − δ)/s), −Q, Q)``."""
    return torch.sub(w.abs(), shift).clamp_(min=0).div_(s).round_().clamp_(max=qmax).copysign_(w)


def dequantize(codes: Tensor, step: float, shift: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """``ŵ = step · q + shift · sign(q)`` evaluated as the quantizer does."""
    q = codes.to(dtype)
    s = torch.tensor(step, dtype=dtype, device=q.device)
    d = torch.tensor(shift, dtype=dtype, device=q.device)
    return s * q + d * torch.sign(q)


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return torch.round(x)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # type: ignore[override]
        return g


class _FusedDeadZone(torch.autograd.Function):
    """Steps 2-8 and their gradients as one node, the elementwise work in fused
    CPU loops (:mod:`codeq_cli.core._kernels`).

    The scalars ``s``, ``δ``, ``Q`` are computed exactly as on the eager path
    (same float32 operations, no graph); the backward applies the chain rule
    from ``∂L/∂s`` and ``∂L/∂δ`` to ``θ_dz`` and ``θ_bit`` by hand. Nothing but
    ``w`` is kept for the backward pass, which recomputes the codes on the fly.
    """

    @staticmethod
    def forward(ctx, w: Tensor, theta_dz: Tensor, theta_bit: Tensor | None, qz: "DeadZoneQuantizer", R: Tensor):  # type: ignore[override]
        qmax, d, s, shift = qz._scalars(R, w.dtype)
        values = (float(s), float(shift), float(qmax))
        ctx.values, ctx.R, ctx.d, ctx.span = values, float(R), float(d), qz.b_max - qz.b_min
        ctx.save_for_backward(w, theta_dz, theta_bit if theta_bit is not None else theta_dz.new_zeros(()))
        ctx.mixed = theta_bit is not None
        return _kernels.forward(w.detach(), *values)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        w, theta_dz, theta_bit = ctx.saved_tensors
        grad_dz = grad_bit = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            s, _, qmax = ctx.values
            g_s, g_shift = _kernels.backward(g, w.detach(), *ctx.values)
            # δ = d/2 − s/2 and s = (R − d/2)/(Q − 1/2) + ε
            g_s_total = g_s - 0.5 * g_shift
            g_d = 0.5 * g_shift - g_s_total * 0.5 / (qmax - 0.5)
            # d = 2R(1 − tanh|θ_dz|)
            t = math.tanh(abs(float(theta_dz)))
            grad_dz = theta_dz.new_tensor(g_d * -2.0 * ctx.R * (1.0 - t * t) * _sign(float(theta_dz)))
            if ctx.mixed:
                # Q = 2^(b−1) − 1, b = round(tanh|θ_bit|·span + b_min) (straight-through)
                g_q = -g_s_total * (ctx.R - ctx.d / 2.0) / (qmax - 0.5) ** 2
                tb = math.tanh(abs(float(theta_bit)))
                db = ctx.span * (1.0 - tb * tb) * _sign(float(theta_bit))
                grad_bit = theta_bit.new_tensor(g_q * (qmax + 1.0) * math.log(2.0) * db)
        return g, grad_dz, grad_bit, None, None


def flat_alike(*ts: Tensor) -> tuple[Tensor, ...]:
    """1-D views of same-layout tensors in memory order (no copy), for sums of their products.

    ``reshape(-1)`` of a channels_last tensor copies it into NCHW order; the
    element-wise products and sums above only need the elements paired, which
    any common order gives. Tensors of different layouts fall back to ``reshape``.
    """
    views = [_kernels.flat(t) for t in ts]
    if all(v is not None for v in views) and len({t.stride() for t in ts}) == 1:
        return tuple(views)  # type: ignore[return-value]
    return tuple(t.reshape(-1) for t in ts)


def _sign(x: float) -> float:
    return (x > 0) - (x < 0)


class _DeadZoneSTE(torch.autograd.Function):
    """Steps 7-8 with their straight-through gradients, as one node.

    Inputs: ``w``, its magnitudes ``a = |w|`` (already computed for the
    quantile), the scalars ``s`` and ``δ``, and ``Q`` (a float, or a 0-dim
    tensor whose gradient is not needed: clip bounds pass none).
    """

    @staticmethod
    def forward(ctx, w: Tensor, a: Tensor, s: Tensor, shift: Tensor, qmax) -> Tensor:  # type: ignore[override]
        r = torch.sub(a, shift).clamp_(min=0).div_(s)  # |unrounded code| ≥ 0
        m = torch.round(r).clamp_(max=qmax)  # |q|
        kept = m > 0
        err = r.sub_(m)  # |unrounded code| − |q|; times sign(w) it is r − q
        level = m.mul_(s).add_(shift).mul_(kept)  # |ŵ| = s|q| + δ·[q ≠ 0]
        w_hat = level.copysign_(w)
        ctx.save_for_backward(w, err, kept)
        return w_hat

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        w, err, kept = ctx.saved_tensors
        grad_s = grad_shift = None
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            g_sign, err, kept = flat_alike(torch.sign(w).mul_(g), err, kept)  # g · sign(w), in w's layout
            # Σ g·(q − r) = −Σ g·sign(w)·(|r| − |q|)
            grad_s = -torch.dot(g_sign, err)
            # Σ g·(sign(q) − sign(w)) = −Σ_{q = 0} g·sign(w)
            grad_shift = -g_sign.masked_fill_(kept, 0).sum()
        return g, None, grad_s, grad_shift, None


class DeadZoneQuantizer(nn.Module):
    """One layer's dead-zone quantizer (a ``torch.nn.utils.parametrize`` module).

    ``bits=int`` is fixed precision; ``bits=None`` learns the bit-width in
    ``[b_min, b_max]`` through ``theta_bit``. ``init_dz``/``init_bit`` are the
    initial logits (3.0: about 1% of the weights pruned, 8 bits);
    ``quantile`` is the fraction of ``|w|`` that defines ``R``;
    ``granularity`` over which elements one range is taken (:class:`PerTensor`,
    the only one implemented); ``grid`` (codeq's extension, None by default):
    train on the int8 export's grid with weight codes up to ``grid`` (63 or
    127), :func:`grid_shift`; at most :func:`widest_bits` of ``grid`` bits.

    Paths: on CPU, float32 weights run the fused numba loops layer by layer.
    Elsewhere (CUDA, and the CPU under ``CODEQ_KERNELS=torch``) the layers wrapped
    by one :func:`~codeq_cli.core.insert.quantize_` call run together, in one
    pass (:mod:`codeq_cli.core._group`); a quantizer on its own runs that pass
    for its one layer. Under ``torch.compile`` each layer runs the eager
    per-layer chain (``_DeadZoneSTE``), which is also the oracle of the pass.
    """

    def __init__(
        self,
        bits: int | None = 4,
        *,
        b_min: int = B_MIN,
        b_max: int = B_MAX,
        init_dz: float = 3.0,
        init_bit: float = 3.0,
        quantile: float = 0.99,
        granularity: Granularity = PerTensor(),
        grid: int | None = None,
    ) -> None:
        super().__init__()
        self.granularity = _check_granularity(granularity)
        if bits is not None and not (B_MIN <= int(bits) <= B_MAX and int(bits) == bits):
            raise ValueError(f"bits={bits!r}: use an integer from {B_MIN} to {B_MAX}, or None for mixed precision")
        if not (B_MIN <= b_min <= b_max <= B_MAX):
            raise ValueError(f"b_min={b_min!r}, b_max={b_max!r}: need {B_MIN} <= b_min <= b_max <= {B_MAX}")
        if not (0.0 < quantile <= 1.0):
            raise ValueError(f"quantile={quantile!r}: use a value in (0, 1]")
        top = int(bits) if bits is not None else int(b_max)
        if grid is not None and not (int(grid) == grid and 2 <= grid <= 127 and top <= widest_bits(grid)):
            raise ValueError(f"grid={grid!r}: use null or an integer code limit from {2 ** (top - 1)} "
                             f"(above the largest code of {top} bits) to 127")
        self.grid = None if grid is None else int(grid)
        self.bits = None if bits is None else int(bits)
        self.b_min, self.b_max = int(b_min), int(b_max)
        self.quantile = float(quantile)
        self.theta_dz = nn.Parameter(torch.tensor(float(init_dz)))
        if self.bits is None:
            self.theta_bit = nn.Parameter(torch.tensor(float(init_bit)))
        else:
            self.register_parameter("theta_bit", None)
        self._cache = QuantileCache()

    @property
    def mixed(self) -> bool:
        return self.bits is None

    def extra_repr(self) -> str:
        bits = f"learned[{self.b_min},{self.b_max}]" if self.mixed else self.bits
        return f"bits={bits}, quantile={self.quantile}" + (f", grid={self.grid}" if self.grid else "")

    # -- the scalars of steps 1-6 -------------------------------------------
    def bit_width(self) -> Tensor:
        """Step 2: the bit-width as a float tensor (straight-through round)."""
        if self.theta_bit is None:
            return self.theta_dz.new_tensor(float(self.bits))
        span = self.b_max - self.b_min
        return _RoundSTE.apply(torch.tanh(self.theta_bit.abs()) * span + self.b_min)

    @torch.no_grad()
    def set_threshold(self, t: float, R: float, *, floor: float = 0.0) -> None:
        """``θ_dz`` for a dead zone of half-width ``t``: ``d/2 = R(1 − tanh|θ_dz|)``, so ``θ_dz = atanh(1 − t/R)``,
        with ``1 − t/R`` clamped to ``[floor, 1 − 10⁻⁷]`` (``floor > 0`` keeps ``θ_dz`` off 0, where its sign has no gradient)."""
        self.theta_dz.fill_(math.atanh(min(1.0 - 1e-7, max(floor, 1.0 - t / R))))

    def absmax(self, w: Tensor) -> Tensor:
        """Step 1: ``R``, the exact ``quantile`` of ``|w|`` (no gradient)."""
        with torch.no_grad():
            w = w.detach()
            flat = _kernels.flat(w)
            return self._cache.quantile_abs(flat if flat is not None else w.reshape(-1), self.quantile)

    def _scalars(self, R: Tensor, dtype: torch.dtype):
        theta_dz = self.theta_dz.to(dtype)
        if self.theta_bit is None:
            qmax: Tensor | float = float(2 ** (self.bits - 1) - 1)
        else:
            qmax = torch.pow(2.0, self.bit_width().to(dtype) - 1.0) - 1.0
        d = 2.0 * R * (1.0 - torch.tanh(theta_dz.abs()))
        # A 0-dim tensor divisor, not a Python float: CUDA divides by a host
        # scalar as a product with its reciprocal, one ulp off true division.
        denom = qmax - 0.5 if isinstance(qmax, Tensor) else torch.full_like(R, qmax - 0.5, dtype=dtype)
        s = (R - d / 2.0) / denom + EPS
        shift = d / 2.0 - s / 2.0
        return qmax, d, s, shift

    # -- forward and encoding ------------------------------------------------
    def forward(self, w: Tensor) -> Tensor:
        """Step 8: the dequantized weight ``ŵ`` used in the forward pass (on the export's grid with ``grid``)."""
        if _kernels.usable(w):
            out = _FusedDeadZone.apply(w, self.theta_dz, self.theta_bit, self, self.absmax(w))
        elif w.numel() == 0 or _kernels._compiling():
            out = self.forward_per_layer(w)
        else:
            group = self.__dict__.get("_group")
            out = group.take(self, w) if group is not None else None
            if out is None:
                out = _group.run([self], [w], self.__dict__.setdefault("_layouts", {}))[0][0]
        return out if self.grid is None else self._on_grid(w, out)

    def _on_grid(self, w: Tensor, out: Tensor) -> Tensor:
        """``out`` with its levels at ``δ'`` instead of ``δ`` (same codes), straight through to ``out``'s gradients.

        The value is exactly :func:`dequantize` of :meth:`encode` (``0 + x`` is ``x``).
        """
        with torch.no_grad():
            w = w.detach()
            qmax, _, s, shift = self._scalars(self.absmax(w), w.dtype)
            q = _eager_codes(w, qmax, s, shift)
            snapped = s * q + grid_shift(s, shift, qmax, self.grid) * torch.sign(q)  # dequantize's operations
        return (out - out.detach()) + snapped

    def forward_per_layer(self, w: Tensor) -> Tensor:
        """``ŵ`` by the eager chain of this layer alone (the one-pass quantizer's oracle)."""
        R = self.absmax(w)
        qmax, _, s, shift = self._scalars(R, w.dtype)
        q_clip = qmax.detach() if isinstance(qmax, Tensor) else qmax
        return _DeadZoneSTE.apply(w, w.detach().abs(), s, shift, q_clip)

    @torch.no_grad()
    def encode(self, w: Tensor) -> Encoded:
        """Integer codes, step, shift and bit-width of ``w`` as the forward sees it."""
        w = w.detach()
        qmax, _, s, shift = self._scalars(self.absmax(w), w.dtype)
        return self._encode(w, qmax, s, shift)

    def _encode(self, w: Tensor, qmax, s: Tensor, shift: Tensor) -> Encoded:
        if _kernels.usable(w):
            codes = _kernels.encode(w, float(s), float(shift), float(qmax))
        else:
            codes = _eager_codes(w, qmax, s, shift).to(torch.int8)
        return Encoded(codes=codes, step=float(s), shift=self.level_shift(s, shift, qmax), bits=int(self.bit_width()))

    def level_shift(self, s: Tensor, shift: Tensor, qmax) -> float:
        """The levels' offset as the forward pass uses it: ``δ``, or ``δ'`` on the export's grid."""
        return float(shift) if self.grid is None else float(grid_shift(s, shift, qmax, self.grid))

    @torch.no_grad()
    def stats(self, w: Tensor) -> dict[str, float]:
        """Readings for logs and reports: R, d, s, δ, bits, sparsity."""
        w = w.detach()
        R = self.absmax(w)
        qmax, d, s, shift = self._scalars(R, w.dtype)
        kept = int(torch.count_nonzero(self._encode(w, qmax, s, shift).codes))
        return {
            "R": float(R),
            "dead_zone": float(d),
            "step": float(s),
            "shift": self.level_shift(s, shift, qmax),
            "bits": int(self.bit_width()),
            "sparsity": 1.0 - kept / max(1, w.numel()),
        }

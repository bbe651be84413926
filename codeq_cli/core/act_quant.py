r"""Learned activation quantizers: codeq's extension of CoDeQ to integer activations.

CoDeQ (arXiv:2512.12981) quantizes weights only; ``docs/method.md``,
"codeq's extension: activation quantizers", states what is added and why. One
:class:`ActQuantizer` sits on the input of every quantized convolution and
linear layer (a child module ``act_quant`` run by a forward pre-hook). For an
input ``x``, bit-width ``b`` and step ``s``::

    unsigned (input never negative on the calibration batches):  Q_n = 0,          Q_p = 2^b − 1
    signed:                                                       Q_n = −2^(b−1),  Q_p = 2^(b−1) − 1
    x̂ = s · clamp(round(x / s), Q_n, Q_p)

Gradients (LSQ, Esser et al. 2020): straight-through on round, so with
``v = x/s``::

    ∂x̂/∂x = 1 if Q_n ≤ v ≤ Q_p else 0
    ∂x̂/∂s = round(v) − v inside, Q_n below, Q_p above          (times g = 1/√(N·Q_p) on the step)

``N`` is the number of elements of one sample's input. The bit-width is fixed
or learned in ``[b_min, b_max]`` through a bit logit as the weights' ``θ_bit``:
``b = round(tanh|θ_bit|·(b_max − b_min) + b_min)`` (straight-through round).
With a learned width the parameter ``step`` is the step at ``b_max``, and the
step used is ``s = step · Q_p(b_max) / Q_p(b)``: the clipping range stays put
and the width sets the resolution, so ``θ_bit`` gets its gradient through
``s`` (the clip bounds pass none), as in the weight quantizer.

Where the quantizers sit (``core/_act_places.py``): on every tensor that an
integer runtime holds in 8 bits (layer inputs, conv outputs, both inputs and
the output of residual adds), one per tensor, shared by all its readers. A
quantizer is a child ``act_quant`` of a module, on its input (forward
pre-hook) or its output (forward hook); ``feeds`` names the quantized layers
whose input it is. A quantizer that feeds no layer (only an add reads its
tensor) keeps ``bits``, or ``b_max`` when the widths are learned.

The step in use is ``max(|step|, 1e-8)``: an optimizer update that carries
the parameter through zero must not flip or zero it. The step is initialised once, before training, from the first batches
(:func:`calibrate_`): ``s = quantile(|x|, 0.999) / Q_p`` averaged over the
batches; the sign is fixed then too. Pure tensor code, no I/O.
"""

from __future__ import annotations

import math
import fnmatch
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from codeq_cli.core import _act_places, _taps
from codeq_cli.core.layers import CONV as _CONV
from codeq_cli.core.quantizer import _RoundSTE

INPUT, OUTPUT = _act_places.INPUT, _act_places.OUTPUT

ATTR = "act_quant"  # the child module's name on the layer it serves
A_MIN, A_MAX = 2, 8
CALIB_QUANTILE = 0.999
MIN_STEP = 1e-8


@dataclass(frozen=True)
class ActSpec:
    """What :func:`codeq_cli.core.insert.quantize_` puts on activations (``activations=``).

    ``bits`` an integer (fixed) or ``None`` (learned in ``[b_min, b_max]``);
    ``exclude``: fnmatch patterns of layers whose input stays float.
    """

    bits: int | None = 8
    b_min: int = 4
    b_max: int = A_MAX
    init_bit: float = 3.0
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.bits is not None and not (A_MIN <= int(self.bits) <= A_MAX):
            raise ValueError(f"activation bits={self.bits!r}: use an integer from {A_MIN} to {A_MAX}, or None to learn them")
        if not (A_MIN <= self.b_min <= self.b_max <= A_MAX):
            raise ValueError(f"act_b_min={self.b_min!r}, act_b_max={self.b_max!r}: need {A_MIN} <= act_b_min <= act_b_max <= {A_MAX}")


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """``(Q_n, Q_p)`` of a ``bits``-wide code."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


class _LSQ(torch.autograd.Function):
    """``x̂ = s·clamp(round(x/s), Q_n, Q_p)`` with LSQ's straight-through gradients (no scale)."""

    @staticmethod
    def forward(ctx, x: Tensor, s: Tensor, qn: float, qp: float) -> Tensor:  # type: ignore[override]
        v = x / s
        q = torch.round(v).clamp_(qn, qp)
        ctx.save_for_backward(v, q)
        ctx.bounds = (qn, qp)
        return q * s

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        v, q = ctx.saved_tensors
        qn, qp = ctx.bounds
        inside = (v >= qn) & (v <= qp)
        grad_x = g * inside if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[1]:
            # inside: round(v) − v; outside: the bound it was clipped to (q equals it there)
            grad_s = (g * torch.where(inside, q - v, q)).sum()
        return grad_x, grad_s, None, None


class _GradScale(torch.autograd.Function):
    """``p`` unchanged in the forward (bit for bit), ``g·∂L/∂p`` in the backward."""

    @staticmethod
    def forward(ctx, p: Tensor, g: float) -> Tensor:  # type: ignore[override]
        ctx.g = g
        return p.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad * ctx.g, None


class ActQuantizer(nn.Module):
    """One layer's input quantizer; ``bits=None`` learns the width in ``[b_min, b_max]``.

    State (all in the model's state dict, so a run state restores it):
    ``step`` (the learned step, at ``b_max`` when the width is learned),
    ``theta_bit`` (learned width only), and the buffers ``signed`` and
    ``calibrated``. Until :func:`calibrate_` has run, the quantizer passes its
    input through unchanged.
    """

    def __init__(self, bits: int | None = 8, *, b_min: int = 4, b_max: int = A_MAX, init_bit: float = 3.0) -> None:
        super().__init__()
        ActSpec(bits, b_min, b_max)  # the range checks
        self.bits = None if bits is None else int(bits)
        self.b_min, self.b_max = int(b_min), int(b_max)
        self.step = nn.Parameter(torch.tensor(1.0))
        if self.bits is None:
            self.theta_bit = nn.Parameter(torch.tensor(float(init_bit)))
        else:
            self.register_parameter("theta_bit", None)
        self.register_buffer("signed", torch.tensor(False))
        self.register_buffer("calibrated", torch.tensor(False))
        self.at, self.feeds = INPUT, ()  # set by attach(): where it sits and which layers read it
        self._observed: list[tuple[float, float]] | None = None  # (quantile of |x|, min x) per calibration batch

    def extra_repr(self) -> str:
        width = f"learned[{self.b_min},{self.b_max}]" if self.bits is None else str(self.bits)
        return f"bits={width}, signed={bool(self.signed)}"

    def bit_width(self) -> Tensor:
        """The bit-width as a float tensor (straight-through round when learned)."""
        if self.theta_bit is None:
            return self.step.new_tensor(float(self.bits))
        return _RoundSTE.apply(torch.tanh(self.theta_bit.abs()) * (self.b_max - self.b_min) + self.b_min)

    def _ref_bits(self) -> int:
        return self.b_max if self.bits is None else self.bits

    def scale(self, g: float = 1.0) -> Tensor:
        """The step in use, ``s`` (with the step parameter's gradient scaled by ``g``)."""
        step = _GradScale.apply(self.step, g) if g != 1.0 else self.step
        step = step.abs().clamp_min(MIN_STEP)  # an optimizer step through zero must not flip or zero it
        if self.theta_bit is None:
            return step
        signed = bool(self.signed)
        qp_ref = float(qrange(self.b_max, signed)[1])
        b = self.bit_width()
        qp = torch.pow(2.0, b - 1.0) - 1.0 if signed else torch.pow(2.0, b) - 1.0
        return step * (qp_ref / qp)

    def forward(self, x: Tensor) -> Tensor:
        if self._observed is not None:
            self._observe(x)
            return x
        if not bool(self.calibrated):
            return x
        bits = int(self.bit_width().detach())
        qn, qp = qrange(bits, bool(self.signed))
        per_sample = x[0].numel() if x.dim() > 1 else x.numel()
        g = 1.0 / math.sqrt(max(1, per_sample) * qp)
        xf = x.float()
        return _LSQ.apply(xf, self.scale(g).float(), float(qn), float(qp)).to(x.dtype)

    # -- calibration ---------------------------------------------------------------
    @torch.no_grad()
    def _observe(self, x: Tensor) -> None:
        a = x.detach().float().reshape(-1)
        k = max(1, math.ceil(CALIB_QUANTILE * a.numel()))
        top = torch.kthvalue(a.abs().cpu(), k).values
        self._observed.append((float(top), float(a.min())))

    @torch.no_grad()
    def _finish_calibration(self) -> None:
        seen, self._observed = self._observed, None
        if not seen:  # the layer never ran: keep it transparent (and say so in its state)
            return
        signed = min(m for _, m in seen) < 0
        self.signed.fill_(signed)
        width = sum(q for q, _ in seen) / len(seen)
        b0 = int(self.bit_width())
        s = max(width, 1e-8) / qrange(b0, signed)[1]  # the step at the starting width
        if self.theta_bit is not None:  # store it as the step at b_max
            s = s * qrange(b0, signed)[1] / qrange(self.b_max, signed)[1]
        self.step.fill_(s)
        self.calibrated.fill_(True)

    # -- the deployed form -----------------------------------------------------------
    @torch.no_grad()
    def frozen(self) -> dict:
        """``{"bits", "signed", "step"}``: everything the decoded forward needs (step as float32)."""
        return {"bits": int(self.bit_width()), "signed": bool(self.signed), "step": float(self.scale().float())}


class FrozenActQuantizer(nn.Module):
    """The decoded form: ``x̂ = s·clamp(round(x/s), Q_n, Q_p)`` with constants; no parameters, no state."""

    def __init__(self, bits: int, signed: bool, step: float) -> None:
        super().__init__()
        self.bits, self.signed_, self.step_ = int(bits), bool(signed), float(step)
        self.qn, self.qp = qrange(self.bits, self.signed_)
        self.at, self.feeds = INPUT, ()
        self.export_qdq = False  # True: write ONNX QuantizeLinear/DequantizeLinear (formats/onnx_int8.py)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed_}, step={self.step_!r}, at={self.at}"

    def forward(self, x: Tensor) -> Tensor:
        if self.export_qdq:
            return self._qdq(x)
        s = torch.tensor(self.step_, dtype=torch.float32, device=x.device)
        return (torch.round(x.float() / s).clamp_(self.qn, self.qp) * s).to(x.dtype)

    def _qdq(self, x: Tensor) -> Tensor:
        """The same values as a uint8 QuantizeLinear/DequantizeLinear pair (zero point 128 for a signed code).

        A width below 8 bits clips at ``[Q_n·s, Q_p·s]`` first (ONNX saturates at the 8-bit limits only).
        """
        if self.qp - self.qn < 255:
            x = torch.clamp(x, self.qn * self.step_, self.qp * self.step_)
        zp = 128 if self.signed_ else 0
        return torch.fake_quantize_per_tensor_affine(x, self.step_, zp, 0, 255)


def _pre_hook(module: nn.Module, args: tuple):
    qz = getattr(module, ATTR, None)
    if qz is None or qz.at != INPUT or not args or not isinstance(args[0], Tensor):
        return None
    return (qz(args[0]), *args[1:])


def _post_hook(module: nn.Module, args: tuple, out):
    qz = getattr(module, ATTR, None)
    if qz is None or qz.at != OUTPUT or not isinstance(out, Tensor):
        return None
    return qz(out)


def attach(module: nn.Module, quantizer: nn.Module, at: str = INPUT, feeds: Iterable[str] | None = None,
           name: str = "") -> None:
    """Put ``quantizer`` on the input (pre-hook) or output (hook) of ``module``, as its child ``act_quant``.

    ``feeds``: the quantized layers that read the quantized tensor (default:
    ``name``, the module's own, for an input quantizer; none for an output one).
    """
    if at not in (INPUT, OUTPUT):
        raise ValueError(f"at={at!r}: use {INPUT!r} or {OUTPUT!r}")
    if getattr(module, ATTR, None) is not None:
        raise ValueError(f"{type(module).__name__} {name!r} already has an activation quantizer")
    quantizer.at = at
    quantizer.feeds = tuple(feeds) if feeds is not None else ((name,) if at == INPUT else ())
    module.add_module(ATTR, quantizer)
    if at == INPUT:
        module.register_forward_pre_hook(_pre_hook)
    else:
        module.register_forward_hook(_post_hook)


def rehook_(model: nn.Module) -> int:
    """Register the hook again on every module whose ``act_quant`` child lost it; returns how many.

    A converter that builds new modules and copies the children over (torch's
    and timm's ``convert_sync_batchnorm``) keeps the quantizer but drops the
    hook, and a quantizer may sit on a batch norm's output.
    """
    n = 0
    for module in model.modules():
        qz = getattr(module, ATTR, None)
        if not isinstance(qz, (ActQuantizer, FrozenActQuantizer)):
            continue
        hook, table = (_pre_hook, module._forward_pre_hooks) if qz.at == INPUT else (_post_hook, module._forward_hooks)
        if hook not in table.values():
            (module.register_forward_pre_hook if qz.at == INPUT else module.register_forward_hook)(hook)
            n += 1
    return n


def eligible(model: nn.Module, layer_names: Iterable[str], exclude: Iterable[str] = ()) -> list[str]:
    """Which of the quantized ``layer_names`` get an input quantizer.

    Convolutions and ``nn.Linear`` whose ``weight`` is quantized; not
    ``nn.MultiheadAttention``'s matrices (its ``out_proj`` is never called as a
    module, so a hook on it would never run), not ``nn.Bilinear`` (two inputs),
    not layers matching ``exclude``.
    """
    mha_children = {f"{n}.out_proj" if n else "out_proj" for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    out = []
    for name in layer_names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue  # a matrix such as encoder.self_attn.in_proj_weight
        if not isinstance(module, (*_CONV, nn.Linear)) or name in mha_children:
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        out.append(name)
    return out


def add_(model: nn.Module, layer_names: Iterable[str], spec: ActSpec) -> list[str]:
    """Attach :class:`ActQuantizer` s where the deployed graph holds 8-bit tensors; returns the eligible layers.

    The places (``core/_act_places.py``): every eligible layer's input, every
    convolution's output, both inputs and the output of every residual add;
    one quantizer per tensor. One that feeds a quantized layer learns its
    width when ``spec.bits`` is ``None``; one that only an add reads keeps
    ``spec.bits`` or ``spec.b_max`` (no BOPs depend on it).
    """
    names = eligible(model, layer_names, spec.exclude)
    if not names:
        return names
    device = next(model.parameters()).device
    fixed = spec.bits if spec.bits is not None else spec.b_max
    for p in _act_places.find(model, names):
        bits = spec.bits if p.feeds else fixed  # a width no layer's BOPs depend on is not learned
        qz = ActQuantizer(bits, b_min=min(spec.b_min, bits or spec.b_min), b_max=spec.b_max, init_bit=spec.init_bit)
        attach(model.get_submodule(p.module), qz.to(device), p.at, p.feeds, p.module)
    return names


def act_quantizers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(layer name, quantizer)`` of every activation quantizer (trained or frozen), in module order."""
    for name, module in model.named_modules():
        if isinstance(module, (ActQuantizer, FrozenActQuantizer)):
            yield name.rpartition(".")[0], module


def learns_width(qz: nn.Module) -> bool:
    """Whether an activation quantizer learns its bit-width (``act_bits: learned``)."""
    return isinstance(qz, ActQuantizer) and qz.theta_bit is not None


def act_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(steps, bit logits)`` of every trainable activation quantizer, for optimizer groups and the loss."""
    steps, bits = [], []
    for _, qz in act_quantizers(model):
        if isinstance(qz, ActQuantizer):
            steps.append(qz.step)
            if learns_width(qz):
                bits.append(qz.theta_bit)
    return steps, bits


def act_bits(model: nn.Module, planned: bool = False) -> dict[str, int]:
    """Layer name → the bit-width of its input, for every layer a calibrated (or frozen) quantizer feeds.

    ``planned``: also the quantizers not calibrated yet, at the width they
    start with (a budget checked before calibration counts them).
    """
    out = {}
    for _, qz in act_quantizers(model):
        if isinstance(qz, FrozenActQuantizer):
            bits = qz.bits
        elif planned or bool(qz.calibrated):
            bits = int(qz.bit_width())
        else:
            continue
        for layer in qz.feeds:
            out[layer] = bits
    return out


def lowest_act_bits(model: nn.Module) -> dict[str, int]:
    """Layer name → the fewest bits its input's quantizer can reach (``b_min`` when learned)."""
    return {layer: qz.b_min if learns_width(qz) else int(qz.bits) for _, qz in act_quantizers(model) for layer in qz.feeds}


@torch.no_grad()
def calibrate_(model: nn.Module, batches: Iterable[Tensor]) -> int:
    """Initialise every uncalibrated :class:`ActQuantizer` from ``batches`` (inputs of the model).

    Runs the model in eval mode (normalization statistics untouched); each
    quantizer records the 0.999 quantile of ``|x|`` and the minimum of its
    input per batch, then sets its sign (signed if any input was negative) and
    its step (the mean quantile over ``Q_p``). Deterministic for given
    batches. Returns the number of batches used.
    """
    pending = [qz for _, qz in act_quantizers(model) if isinstance(qz, ActQuantizer) and not bool(qz.calibrated)]
    if not pending:
        return 0
    for qz in pending:
        qz._observed = []
    was_training = model.training
    model.eval()
    n = 0
    try:
        for x in batches:
            model(x)
            n += 1
    finally:
        model.train(was_training)
        for qz in pending:
            qz._finish_calibration()
    return n


def freeze_into(model: nn.Module, entries: Iterable[dict]) -> None:
    """Attach :class:`FrozenActQuantizer` s to a plain model from :func:`frozen_entries`' entries.

    ``at`` and ``feeds`` may be absent or ``None`` (files written before
    them): a quantizer on its layer's input. An entry named after a tap
    (``<owner>.codeq_tap_<op>``, ``core/_taps.py``) rewrites its owner's
    forward as :func:`add_` did (``ValueError`` where the op is not there).
    """
    entries = list(entries)
    if any(e["name"].endswith(".codeq_sigmoid") for e in entries):  # written with SiLU split (core/_taps.py)
        _taps.split_silu_(model)
    taps: dict[str, list[str]] = {}
    for e in entries:
        owner, _, child = e["name"].rpartition(".")
        if child.startswith(_taps.PREFIX):
            taps.setdefault(owner, []).append(child[len(_taps.PREFIX):])
    if taps:
        fixed = _act_places.calls(model)
        _taps.prepare(model, fixed, set(taps))
        for owner, ops in taps.items():
            _taps.tap_(model.get_submodule(owner), ops, fixed.get(owner, {}))
    for e in entries:
        at = e.get("at") or INPUT
        feeds = e.get("feeds")
        attach(model.get_submodule(e["name"]), FrozenActQuantizer(e["bits"], e["signed"], e["step"]), at,
               None if feeds is None else tuple(feeds), e["name"])


def frozen_entries(model: nn.Module) -> list[dict]:
    """``{"name", "bits", "signed", "step"}`` of every calibrated quantizer, in module order.

    Plus ``"at": "output"`` for one on a module's output, and ``"feeds"``
    (the layers it feeds) where that is not just the module itself.
    """
    out = []
    for name, qz in act_quantizers(model):
        if isinstance(qz, FrozenActQuantizer):
            e = {"name": name, "bits": qz.bits, "signed": qz.signed_, "step": qz.step_}
        elif bool(qz.calibrated):
            e = {"name": name, **qz.frozen()}
        else:
            continue
        if qz.at != INPUT:
            e["at"] = qz.at
        if tuple(qz.feeds) != ((name,) if qz.at == INPUT else ()):
            e["feeds"] = list(qz.feeds)
        out.append(e)
    return out

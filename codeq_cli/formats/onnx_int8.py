"""``codeq export --format onnx-int8``: a QDQ ONNX graph that ONNX Runtime runs on integer kernels.

Needs a checkpoint with activation quantizers (``act_bits``, codeq's extension,
``docs/method.md``). The graph follows ONNX Runtime's QDQ fusion rules
(``docs/deploy.md``): an operator becomes an integer kernel when every input
comes through a ``DequantizeLinear`` and its output goes to a ``QuantizeLinear``.

* **Activations.** Every activation quantizer of the checkpoint (on layer
  inputs, conv outputs, both inputs and the output of residual adds; one per
  tensor, ``core/_act_places.py``) is a ``QuantizeLinear``/``DequantizeLinear``
  pair with its step as scale: uint8 with zero point 0 for a non-negative
  tensor, uint8 with zero point 128 for a signed one (the same codes shifted,
  so that both inputs of an add and its output share one type). The codes are
  exactly the quantizer's (both round half to even). A width below 8 bits adds
  a ``Clip`` at ``[Q_n·s, Q_p·s]`` in front, since ONNX saturates at the 8-bit
  limits only (that blocks the fusion: 8 bits are the deployed width).
* **Weights.** int8 initializers with one scale per output channel, read by a
  ``DequantizeLinear``. Batch normalization is folded into the preceding
  convolution first (found on the ``torch.fx`` trace); the fold scales each
  output channel by ``f_c = γ/√(var+ε)``, and the per-channel scale ``σ·|f_c|``
  carries it, so the integer codes do not change (their sign flips where
  ``f_c < 0``; they are 0 where ``f_c = 0``).
* **Dead-zone levels on an affine grid.** A layer's levels are
  ``s·q + δ·sign(q)``: equally spaced by ``s`` but shifted by ``δ`` away from
  zero, which an affine grid through 0 does not hold in general. codeq picks
  the grid step ``σ`` per layer among ``s/m`` (``m = 1, 2, …`` while the top
  level fits in the code limit) and ``max|ŵ|/limit``, the one with the smallest
  largest error over the levels; codes are ``round(ŵ/σ)``. The mapping is exact
  when ``m·δ/s`` is an integer (and always for the zero level); otherwise every
  weight is off by at most ``σ/2`` (per layer in :class:`Int8Export`).
* **7-bit weight codes** (``reduce_range``, the default): codes in ``[−63, 63]``.
  x86 CPUs without VNNI multiply uint8 by int8 with ``VPMADDUBSW``, which sums
  two products into int16 and saturates once ``255·|w|·2 > 32767``; ONNX
  Runtime's own quantizer has the same ``reduce_range`` switch. ``reduce_range=False``
  keeps codes up to 127 (exact on VNNI CPUs and GPUs).
* **Biases** as int32 with scale ``s_x·σ_c``; rounding error at most ``s_x·σ_c/2``.

Layers whose input no quantizer feeds (excluded, or left in float) stay float.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from codeq_cli._io import write_bytes
from codeq_cli.errors import CodeqError, UsageError, one_line

if TYPE_CHECKING:  # pragma: no cover
    from codeq_cli.formats.checkpoint import CompressedModel

INSTALL_HINT = "pip install 'codeq[onnx]' (the onnx and onnxruntime packages)"


@dataclass
class Int8Export:
    """What :func:`export_onnx_int8` wrote."""

    path: Path
    bytes: int
    int8_layers: int
    float_layers: list[str]
    bn_folded: bool
    exact_layers: int  # layers whose dead-zone levels sit exactly on their int8 grid
    max_weight_error: float  # largest |int8 level − ŵ| over all layers, in weight units (before the BN factor)
    weight_errors: dict[str, float] = field(default_factory=dict)
    activation_quantizers: int = 0  # QuantizeLinear/DequantizeLinear pairs on activations
    weight_code_limit: int = 63  # 63: reduce_range (7-bit codes); 127: full int8
    # Layers with more weight bits than the codes hold at their level spacing: the levels ±(s·k + δ), k ≤ 2^(b-1) − 1,
    # need codes up to 2^(b-1) − 1 + δ/s, so 7-bit layers overflow 7-bit codes (reduce_range) once δ ≥ s/2 and are
    # rounded on a grid of about s (docs/deploy.md): more than 6 bits under reduce_range, more than 7 at full range.
    wide_layers: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def int8_grid(step: float, shift: float, qmax: int, limit: int = 127) -> tuple[float, float]:
    """``(σ, largest error)``: the grid step for the levels ``±(s·k + δ)``, ``k = 1 … Q``, and 0, codes ``≤ limit``.

    Candidates: ``s/m`` for ``m = 1, 2, …`` while ``Q·m + round(m·δ/s) ≤ limit``
    (the spacing then stays exact, only ``δ`` is rounded), and ``max|ŵ|/limit``.
    """
    levels = step * np.arange(1, qmax + 1, dtype=np.float64) + shift
    top = float(levels[-1]) if qmax else 0.0
    if top <= 0:
        return 1.0, 0.0
    candidates = [top / float(limit)]
    m = 1
    while qmax * m + round(m * shift / step) <= limit:
        candidates.append(step / m)
        m += 1
    best = None
    for sigma in candidates:
        codes = np.rint(levels / sigma)
        if np.abs(codes).max() > limit:
            continue
        err = float(np.abs(codes * sigma - levels).max())
        if best is None or err < best[1] - 1e-9 * step:  # equal errors: keep the coarser (earlier) grid
            best = (sigma, err)
    return best


def _modules():
    import importlib.util

    if importlib.util.find_spec("onnx") is None:
        raise CodeqError("the int8 ONNX export needs the onnx package, which is not installed", hint=INSTALL_HINT)


def fold_bn_(model) -> dict:
    """Fold every batch norm that reads a convolution's output alone into it, in place; ``{conv name: f_c}``.

    The pairs come from the ``torch.fx`` trace; the batch norm becomes an
    ``nn.Identity`` (its activation, for timm's ``BatchNormAct2d``) at the same
    name, so quantizers on its output still find it. A model that does not
    trace is left as it is (``{}``).
    """
    import torch
    from torch import nn

    from codeq_cli.core.layers import CONV

    class BNLeaf(torch.fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return isinstance(m, nn.modules.batchnorm._BatchNorm) or super().is_leaf_module(m, qualname)

    try:
        graph = BNLeaf().trace(model)
    except Exception:
        return {}
    counts: dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            counts[n.target] = counts.get(n.target, 0) + 1
    factors = {}
    for n in graph.nodes:
        if n.op != "call_module" or not isinstance(model.get_submodule(n.target), CONV) or len(n.users) != 1:
            continue
        (u,) = n.users
        if u.op != "call_module" or counts.get(u.target) != 1 or counts.get(n.target) != 1:
            continue
        bn = model.get_submodule(u.target)
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not bn.track_running_stats or bn.running_var is None:
            continue
        conv = model.get_submodule(n.target)
        with torch.no_grad():
            inv = torch.rsqrt(bn.running_var.double() + bn.eps)
            gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(inv)
            beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(inv)
            f = gamma * inv
            b = conv.bias.double() if conv.bias is not None else torch.zeros_like(f)
            w = conv.weight.double() * f.reshape(-1, *([1] * (conv.weight.dim() - 1)))
            conv.weight = nn.Parameter(w.to(conv.weight.dtype), requires_grad=False)
            conv.bias = nn.Parameter(((b - bn.running_mean.double()) * f + beta).float(), requires_grad=False)
        parent, _, child = u.target.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, _AfterNorm(bn))
        factors[n.target] = f
    return factors


class _AfterNorm:
    """What is left of a folded batch norm: nothing, or timm's ``drop`` and ``act`` under the same names."""

    def __new__(cls, bn):
        from torch import nn

        drop, act = getattr(bn, "drop", None), getattr(bn, "act", None)
        if not isinstance(drop, nn.Module) and not isinstance(act, nn.Module):
            return nn.Identity()

        class AfterNorm(nn.Module):
            def __init__(self):
                super().__init__()
                self.drop = drop if isinstance(drop, nn.Module) else nn.Identity()
                self.act = act if isinstance(act, nn.Module) else nn.Identity()

            def forward(self, x):
                return self.act(self.drop(x))

        return AfterNorm()


def _qdq_weight(layer, codes, scales):
    """``layer`` computing with ``fake_quantize_per_channel(codes·scales)`` (exported as Q/DQ of the weight)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class QDQWeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer
            self.register_buffer("w", codes.float() * scales.float().reshape(-1, *([1] * (codes.dim() - 1))))
            self.register_buffer("scales", scales.float())
            self.register_buffer("zps", torch.zeros(codes.shape[0], dtype=torch.int32))

        def forward(self, x):
            w = torch.fake_quantize_per_channel_affine(self.w, self.scales, self.zps, 0, -128, 127)
            if isinstance(self.layer, nn.Linear):
                return F.linear(x, w, self.layer.bias)
            return self.layer._conv_forward(x, w, self.layer.bias)

    return QDQWeight()


def fed_layers(entries: list[dict]) -> set[str]:
    """The layers whose input one of the activation quantizers ``entries`` quantizes."""
    out = set()
    for e in entries:
        feeds = e.get("feeds")
        out.update(feeds if feeds is not None else ([e["name"]] if (e.get("at") or "input") == "input" else []))
    return out


def qdq_model(plain, weights: dict, entries: list[dict], *, reduce_range: bool = True):
    """``plain`` (a float model, changed in place) as the QDQ model: BN folded, int8 weights on every
    layer an activation quantizer feeds, the quantizers ``entries`` (:func:`~codeq_cli.core.act_quant.frozen_entries`)
    as QDQ pairs. ``weights``: layer name → ``(ŵ, s, δ, bits)``, its dead-zone levels.

    Returns ``(model, Int8Export figures without path/bytes)``.
    """
    import torch
    from torch import nn

    from codeq_cli.core import act_quant

    from codeq_cli.core.quantizer import CODE_LIMIT

    limit = CODE_LIMIT["reduce-range" if reduce_range else "full-range"]
    plain.eval()
    factors = fold_bn_(plain)
    errors, floats, exact, wide = {}, [], 0, 0
    for name in sorted(fed_layers(entries)):
        module = plain.get_submodule(name)
        if name not in weights or not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            floats.append(name)
            continue
        w_hat, step, shift, bits = weights[name]
        sigma, err = int8_grid(step, shift, 2 ** (bits - 1) - 1, limit)
        codes = torch.round(w_hat.double() / sigma).clamp_(-limit, limit).to(torch.int8)
        f = factors.get(name, torch.ones(codes.shape[0], dtype=torch.float64))
        # Scales must be positive: a negative BN factor flips the channel's codes; a zero one
        # (a BN with γ = 0, as timm initialises the last BN of a block) zeroes them.
        view = (-1, *([1] * (codes.dim() - 1)))
        dead = f.abs() < 1e-12
        codes = torch.where(dead.reshape(view), torch.zeros_like(codes), codes * torch.sign(f).to(torch.int8).reshape(view))
        scales = (sigma * torch.where(dead, torch.ones_like(f), f.abs())).float()
        errors[name] = err
        exact += err <= 1e-6 * max(abs(step), 1e-30)
        wide += bits > (6 if reduce_range else 7)
        parent, _, child = name.rpartition(".")
        setattr(plain.get_submodule(parent) if parent else plain, child, _qdq_weight(module, codes, scales))
    act_quant.freeze_into(plain, entries)
    for _, qz in act_quant.act_quantizers(plain):
        qz.export_qdq = True
    return plain.eval(), Int8Export(Path(), 0, len(errors), floats, bool(factors), exact,
                                    max(errors.values(), default=0.0), errors, len(entries), limit, wide)


def build_qdq_model(ckpt: CompressedModel, *, reduce_range: bool = True):
    """:func:`qdq_model` of the checkpoint's decoded model, dead-zone levels and activation quantizers."""
    from codeq_cli.models.factory import create

    plain = create(ckpt.spec, pretrained=False)
    plain.load_state_dict(ckpt.state_dict(), strict=True)
    weights = {layer.name: (layer.decode(), layer.step, layer.shift, layer.bits) for layer in ckpt.layers.values()}
    return qdq_model(plain, weights, ckpt.activations, reduce_range=reduce_range)


def to_onnx(model, shape: tuple[int, ...], path: Path, *, opset: int = 18, dynamic_batch: bool = True) -> bytes:
    """Export a :func:`qdq_model` to ONNX (TorchScript exporter) with int8 weights and int32 biases; the bytes."""
    import warnings

    import onnx
    import torch

    from codeq_cli.formats._onnx_qdq import int8_initializers

    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(*shape),), str(path), dynamo=False, opset_version=opset,
                          input_names=["input"], output_names=["logits"], dynamic_axes=axes, do_constant_folding=True)
    proto = onnx.load(str(path))
    int8_initializers(proto)
    return proto.SerializeToString()


def export_onnx_int8(ckpt: CompressedModel, path: str | os.PathLike, *, opset: int = 18,
                     img_size: int | None = None, dynamic_batch: bool = True, reduce_range: bool = True) -> Int8Export:
    """Write the int8 QDQ ONNX graph of ``ckpt`` (atomically); see the module docstring."""
    _modules()
    if not ckpt.activations:
        raise UsageError(f"{ckpt.path} has no activation quantizers, so there is no integer graph to export",
                         hint="compress with --set act_bits=8 (or act_bits=learned), or export --format onnx (float)")
    if opset < 13:
        raise UsageError(f"--opset {opset} is too old for per-channel int8 weights", hint="use --opset 13 or newer (default 18)")
    p = Path(path)
    folder = p.parent if str(p.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"folder {str(folder)!r} for {str(p)!r} does not exist", hint="create it first or choose another output path")
    model, info = build_qdq_model(ckpt, reduce_range=reduce_range)
    c, h, w = ckpt.data_config.input_size
    if img_size is not None:
        h = w = int(img_size)
    with tempfile.TemporaryDirectory(prefix=".codeq-onnx-", dir=folder) as tmp:
        try:
            data = to_onnx(model, (1, c, h, w), Path(tmp) / "model.onnx", opset=opset, dynamic_batch=dynamic_batch)
        except CodeqError:
            raise
        except Exception as exc:
            raise CodeqError(f"int8 ONNX export of {ckpt.spec.label} failed ({type(exc).__name__}: {one_line(exc, 200)})",
                             hint="export --format onnx (float) instead, or report this as a codeq bug") from exc
        write_bytes(p, data)
    info.path, info.bytes = p, len(data)
    if not math.isfinite(info.max_weight_error):  # pragma: no cover - defensive
        raise CodeqError("the int8 weight mapping produced a non-finite error", hint="please report this as a codeq bug")
    return info

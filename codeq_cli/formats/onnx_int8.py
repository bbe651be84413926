"""``codeq export --format onnx-int8``: a QDQ ONNX graph that ONNX Runtime runs on integer kernels.

Needs a checkpoint with activation quantizers (``act_bits``, codeq's extension,
``docs/method.md``). The graph (``docs/format.md``, "int8 ONNX"):

* **Activations.** Before every quantized convolution and linear layer, a
  ``QuantizeLinear``/``DequantizeLinear`` pair with the layer's step as scale
  and zero point 0: uint8 for unsigned inputs, int8 for signed ones. The codes
  are exactly the activation quantizer's (both round half to even). A width
  below 8 bits adds a ``Clip`` at ``[Q_n·s, Q_p·s]`` in front, since ONNX
  saturates at the 8-bit limits only.
* **Weights.** int8 initializers with one scale per output channel, read by a
  ``DequantizeLinear``. Batch normalization is folded into the convolution
  first (``torch.fx``); the fold scales each output channel by ``f_c``, and the
  per-channel scale ``σ·|f_c|`` carries it, so the integer codes do not change
  (their sign flips where ``f_c < 0``; they are 0 where ``f_c = 0``).
* **Dead-zone levels on an affine grid.** A layer's levels are
  ``s·q + δ·sign(q)``: equally spaced by ``s`` but shifted by ``δ`` away from
  zero, which an affine grid through 0 does not hold in general. codeq picks
  the grid step ``σ`` per layer among ``s/m`` (``m = 1, 2, …`` while the top
  level fits in 127) and ``max|ŵ|/127``, the one with the smallest largest
  error over the levels; codes are ``round(ŵ/σ)``. The mapping is exact when
  ``m·δ/s`` is an integer (and always for the zero level); otherwise every
  weight is off by at most ``σ/2`` (per layer in :class:`Int8Export`).
* **Biases** as int32 with scale ``s_x·σ_c`` (ONNX Runtime fuses a convolution
  only when its bias is quantized too); rounding error at most ``s_x·σ_c/2``.

Layers without an activation quantizer (excluded, or left in float) stay float.
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

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def int8_grid(step: float, shift: float, qmax: int) -> tuple[float, float]:
    """``(σ, largest error)``: the int8 grid step for the levels ``±(s·k + δ)``, ``k = 1 … Q``, and 0.

    Candidates: ``s/m`` for ``m = 1, 2, …`` while ``Q·m + round(m·δ/s) ≤ 127``
    (the spacing then stays exact, only ``δ`` is rounded), and ``max|ŵ|/127``.
    """
    levels = step * np.arange(1, qmax + 1, dtype=np.float64) + shift
    top = float(levels[-1]) if qmax else 0.0
    if top <= 0:
        return 1.0, 0.0
    candidates = [top / 127.0]
    m = 1
    while qmax * m + round(m * shift / step) <= 127:
        candidates.append(step / m)
        m += 1
    best = None
    for sigma in candidates:
        codes = np.rint(levels / sigma)
        if np.abs(codes).max() > 127:
            continue
        err = float(np.abs(codes * sigma - levels).max())
        if best is None or err < best[1] - 1e-9 * step:  # equal errors: keep the coarser (earlier) grid
            best = (sigma, err)
    return best


def _modules():
    import importlib.util

    if importlib.util.find_spec("onnx") is None:
        raise CodeqError("the int8 ONNX export needs the onnx package, which is not installed", hint=INSTALL_HINT)


def _fold_bn(model):
    """Batch normalization folded into the preceding convolutions (torch.fx); ``(model, folded)``."""
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(model, inplace=False), True
    except Exception:  # not symbolically traceable: export unfolded (fewer integer kernels)
        return model, False


def _channel_factor(folded_w, w_hat):
    """``f_c`` with ``folded = f_c · ŵ`` per output channel (least squares; 1 where the channel is all zero)."""
    import torch

    a = folded_w.detach().double().reshape(folded_w.shape[0], -1)
    b = w_hat.double().reshape(w_hat.shape[0], -1)
    den = (b * b).sum(1)
    return torch.where(den > 0, (a * b).sum(1) / den.clamp_min(1e-300), torch.ones_like(den))


def _qdq_module(layer, codes, scales, act: dict):
    import torch
    import torch.nn.functional as F
    from torch import nn

    from codeq_cli.core.act_quant import qrange

    class QDQLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer
            self.register_buffer("w", codes.float() * scales.float().reshape(-1, *([1] * (codes.dim() - 1))))
            self.register_buffer("scales", scales.float())
            self.register_buffer("zps", torch.zeros(codes.shape[0], dtype=torch.int32))
            self.s = float(act["step"])
            self.qn, self.qp = qrange(int(act["bits"]), bool(act["signed"]))
            self.lo, self.hi = (-128, 127) if act["signed"] else (0, 255)

        def forward(self, x):
            if (self.qn, self.qp) != (self.lo, self.hi):
                x = torch.clamp(x, self.qn * self.s, self.qp * self.s)
            x = torch.fake_quantize_per_tensor_affine(x, self.s, 0, self.lo, self.hi)
            w = torch.fake_quantize_per_channel_affine(self.w, self.scales, self.zps, 0, -128, 127)
            if isinstance(self.layer, nn.Linear):
                return F.linear(x, w, self.layer.bias)
            return self.layer._conv_forward(x, w, self.layer.bias)

    return QDQLayer()


def build_qdq_model(ckpt: CompressedModel):
    """The decoded model, BN folded, each quantized layer with an activation quantizer as a QDQ layer.

    Returns ``(model, Int8Export figures without path/bytes)``.
    """
    import torch
    from torch import nn

    from codeq_cli.models.factory import create

    plain = create(ckpt.spec, pretrained=False)
    plain.load_state_dict(ckpt.state_dict(), strict=True)
    plain.eval()
    fused, folded = _fold_bn(plain)
    by_name = {layer.name: layer for layer in ckpt.layers.values()}
    errors, floats, exact = {}, [], 0
    for act in ckpt.activations:
        name = act["name"]
        layer = by_name.get(name)
        module = fused.get_submodule(name)
        if layer is None or not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            floats.append(name)
            continue
        w_hat = layer.decode()
        sigma, err = int8_grid(layer.step, layer.shift, 2 ** (layer.bits - 1) - 1)
        codes = torch.round(w_hat.double() / sigma).clamp_(-127, 127).to(torch.int8)
        f = _channel_factor(module.weight, w_hat)
        # Scales must be positive: a negative BN factor flips the channel's codes; a zero one
        # (a BN with γ = 0, as timm initialises the last BN of a block) zeroes them.
        view = (-1, *([1] * (codes.dim() - 1)))
        dead = f.abs() < 1e-12
        codes = torch.where(dead.reshape(view), torch.zeros_like(codes), codes * torch.sign(f).to(torch.int8).reshape(view))
        scales = (sigma * torch.where(dead, torch.ones_like(f), f.abs())).float()
        errors[name] = err
        exact += err <= 1e-6 * max(abs(layer.step), 1e-30)
        parent, _, child = name.rpartition(".")
        setattr(fused.get_submodule(parent) if parent else fused, child, _qdq_module(module, codes, scales, act))
    return fused.eval(), Int8Export(Path(), 0, len(errors), floats, folded, exact,
                                    max(errors.values(), default=0.0), errors)


def _int8_initializers(model_proto) -> None:
    """Replace ``QuantizeLinear(float initializer)`` by an int8 initializer; quantize float biases of QDQ convs to int32."""
    import onnx
    from onnx import helper, numpy_helper

    g = model_proto.graph
    inits = {i.name: i for i in g.initializer}
    # The exporter shares equal tensors through Identity nodes: read the initializer directly.
    alias = {n.output[0]: n.input[0] for n in g.node if n.op_type == "Identity" and n.input[0] in inits}
    rest = [n for n in g.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    for n in rest:
        for i, name in enumerate(n.input):
            if name in alias:
                n.input[i] = alias[name]
    del g.node[:]
    g.node.extend(rest)
    consts = {}
    for n in g.node:  # the TorchScript exporter writes some scalars as Constant nodes
        if n.op_type == "Constant" and n.attribute:
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)

    def value(name):
        if name in inits:
            return numpy_helper.to_array(inits[name])
        return consts.get(name)

    keep = []
    for n in g.node:
        if n.op_type == "QuantizeLinear" and n.input[0] in inits:
            w, scale = value(n.input[0]), value(n.input[1])
            zp = value(n.input[2]) if len(n.input) > 2 and n.input[2] else np.zeros((), np.int8)
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            if scale.ndim == 1 and w.ndim > 1:
                shape = [1] * w.ndim
                shape[axis] = -1
                scale, zp = scale.reshape(shape), zp.reshape(shape)
            lo, hi = (-128, 127) if zp.dtype == np.int8 else (0, 255)
            q = np.clip(np.rint(w.astype(np.float64) / scale.astype(np.float64)) + zp, lo, hi).astype(zp.dtype)
            g.initializer.append(numpy_helper.from_array(q, n.output[0]))
            continue
        keep.append(n)
    del g.node[:]
    g.node.extend(keep)
    # Biases: int32 at scale s_x·σ_c, so that the Conv/Gemm is a full QDQ group.
    producers = {o: n for n in g.node for o in n.output}
    inits = {i.name: i for i in g.initializer}
    extra = []
    for n in g.node:
        if n.op_type not in ("Conv", "Gemm") or len(n.input) < 3 or n.input[2] not in inits:
            continue
        dx, dw = producers.get(n.input[0]), producers.get(n.input[1])
        if not (dx and dw and dx.op_type == dw.op_type == "DequantizeLinear"):
            continue
        sx, sw = value(dx.input[1]), value(dw.input[1])
        if sx is None or sw is None:
            continue
        bias = numpy_helper.to_array(inits[n.input[2]]).astype(np.float64)
        bscale = (float(sx) * sw.astype(np.float64)).astype(np.float32).reshape(-1)
        if bscale.size == 1:
            bscale = np.full(bias.shape, bscale[0], np.float32)
        qb = np.clip(np.rint(bias / bscale.astype(np.float64)), -(2**31), 2**31 - 1).astype(np.int32)
        base = n.input[2]
        g.initializer.extend([numpy_helper.from_array(qb, base + "_int32"), numpy_helper.from_array(bscale, base + "_scale"),
                              numpy_helper.from_array(np.zeros(bias.shape, np.int32), base + "_zp")])
        extra.append(helper.make_node("DequantizeLinear", [base + "_int32", base + "_scale", base + "_zp"], [base + "_dq"], axis=0))
        n.input[2] = base + "_dq"
    # Put the new nodes first (their inputs are initializers), then drop initializers nobody reads.
    nodes = extra + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in g.node for i in n.input}
    alive = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(alive)
    onnx.checker.check_model(model_proto)


def export_onnx_int8(ckpt: CompressedModel, path: str | os.PathLike, *, opset: int = 18,
                     img_size: int | None = None, dynamic_batch: bool = True) -> Int8Export:
    """Write the int8 QDQ ONNX graph of ``ckpt`` (atomically); see the module docstring."""
    import torch

    _modules()
    import onnx

    if not ckpt.activations:
        raise UsageError(f"{ckpt.path} has no activation quantizers, so there is no integer graph to export",
                         hint="compress with --set act_bits=8 (or act_bits=learned), or export --format onnx (float)")
    if opset < 13:
        raise UsageError(f"--opset {opset} is too old for per-channel int8 weights", hint="use --opset 13 or newer (default 18)")
    p = Path(path)
    folder = p.parent if str(p.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"folder {str(folder)!r} for {str(p)!r} does not exist", hint="create it first or choose another output path")
    model, info = build_qdq_model(ckpt)
    c, h, w = ckpt.data_config.input_size
    if img_size is not None:
        h = w = int(img_size)
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    import warnings

    with tempfile.TemporaryDirectory(prefix=".codeq-onnx-", dir=folder) as tmp:
        out = Path(tmp) / "model.onnx"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (torch.zeros(1, c, h, w),), str(out), dynamo=False, opset_version=opset,
                                  input_names=["input"], output_names=["logits"], dynamic_axes=axes,
                                  do_constant_folding=True)
            proto = onnx.load(str(out))
            _int8_initializers(proto)
        except CodeqError:
            raise
        except Exception as exc:
            raise CodeqError(f"int8 ONNX export of {ckpt.spec.label} failed ({type(exc).__name__}: {one_line(exc, 200)})",
                             hint="export --format onnx (float) instead, or report this as a codeq bug") from exc
        data = proto.SerializeToString()
        write_bytes(p, data)
    info.path, info.bytes = p, len(data)
    if not math.isfinite(info.max_weight_error):  # pragma: no cover - defensive
        raise CodeqError("the int8 weight mapping produced a non-finite error", hint="please report this as a codeq bug")
    return info

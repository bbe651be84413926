"""Cost accounting: dense MACs per layer, and BOPs (``docs/method.md``, "BOPs").

Per convolution or linear layer ℓ::

    MACs_dense = (c_in / groups) · c_out · k_h · k_w · m_h · m_w     (linear: in · out per token)
    BOPs       = density · MACs_dense · w_bits · a_bits

``a_bits`` is 32 (the paper's setting) unless the layer's input carries an
activation quantizer (codeq's extension, :mod:`codeq_cli.core.act_quant`),
then its bit-width: every BOPs figure, and so anything built on
:func:`bops_rows`/:func:`bops_totals`, counts activation bits.
Relative BOPs = Σ BOPs / Σ (MACs_dense · 32 · 32); a layer left in float counts
at 32 × 32, dense. MACs are measured by running the model once at its input
resolution with batch 1 (forward hooks, no tracing). Products of two
activations (attention's ``QKᵀ`` and ``AV``) have no weights and are left out
of both sums.

Rows are plain data (:class:`LayerRow`) so that training, the checkpoint and
``codeq report`` share one definition; rendering lives elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from codeq_cli.core.act_quant import act_bits as _act_bits
from codeq_cli.core.insert import encode_all, layer_name, plan
from codeq_cli.core.layers import CONV as _CONV, LINEAR as _LINEAR

A_BITS = 32
FP_BITS = 32


def _tokens(x: torch.Tensor, features: int) -> int:
    return x.numel() // max(1, features)


def _conv_macs(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    w = module.weight
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        # Each input element meets (c_out/groups)·k weights.
        return inp.numel() * (w.numel() // w.shape[0])
    # Each output element is a dot product of (c_in/groups)·k weights.
    return out.numel() * (w.numel() // w.shape[0])


def _mha_macs(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> dict[str, int]:
    query = args[0] if args else kwargs["query"]
    key = args[1] if len(args) > 1 else kwargs.get("key", query)
    value = args[2] if len(args) > 2 else kwargs.get("value", key)
    e = module.embed_dim
    lq, lk, lv = _tokens(query, e), _tokens(key, module.kdim), _tokens(value, module.vdim)
    in_proj = lq * e * e + lk * module.kdim * e + lv * module.vdim * e
    macs = {}
    if module._qkv_same_embed_dim:
        macs["in_proj_weight"] = in_proj
    else:
        macs["q_proj_weight"] = lq * e * e
        macs["k_proj_weight"] = lk * module.kdim * e
        macs["v_proj_weight"] = lv * module.vdim * e
    macs["out_proj"] = lq * e * e  # MHA calls F.linear on out_proj.weight: its hook never fires
    return macs


@torch.no_grad()
def measure_macs(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    """Dense MACs of every convolution and linear weight, from one forward pass at batch 1.

    ``input_shape`` is ``(C, H, W)`` (or any per-sample shape). Keys are layer
    names (:func:`codeq_cli.core.insert.layer_name`); a layer that is called several
    times accumulates, a layer never called has 0.
    """
    macs: dict[str, int] = {}
    handles = []
    names = {}
    for mname, module in model.named_modules():
        if isinstance(module, (*_CONV, *_LINEAR)):
            names[module] = mname
            macs.setdefault(mname, 0)

            def hook(mod, inputs, output, _name=mname):
                inp = inputs[0]
                if isinstance(mod, _CONV):
                    n = _conv_macs(mod, inp, output)
                elif isinstance(mod, nn.Bilinear):
                    n = _tokens(inp, mod.in1_features) * mod.weight.numel()
                else:
                    n = _tokens(inp, mod.in_features) * mod.weight.numel()
                macs[_name] += int(n)

            handles.append(module.register_forward_hook(hook))
        elif isinstance(module, nn.MultiheadAttention):

            def mha_hook(mod, args, kwargs, output, _name=mname):
                for pname, n in _mha_macs(mod, args, kwargs).items():
                    key = f"{_name}.out_proj" if pname == "out_proj" else layer_name(_name, pname)
                    macs[key] = macs.get(key, 0) + int(n)

            handles.append(module.register_forward_hook(mha_hook, with_kwargs=True))
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(1, *input_shape, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return macs


@dataclass
class LayerRow:
    """One layer's figures, as ``codeq report`` shows them."""

    name: str
    kind: str
    shape: list[int]
    params: int
    macs: int
    bits: int  # 32 for a layer left in float
    sparsity: float  # fraction of zero codes (0.0 for float layers)
    bops: float
    quantized: bool
    act_bits: int = A_BITS  # the input's bit-width; 32: float activations

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["act_bits"] == A_BITS:  # float activations: the row as codeq has always written it
            del d["act_bits"]
        return d


def make_row(name: str, kind: str, shape: Sequence[int], macs: int, *, bits: int | None = None,
             nonzero: int | None = None, act_bits: int | None = None) -> LayerRow:
    """A row from plain figures; without ``bits`` and ``nonzero`` the layer is left in float (dense, 32 bits);
    ``act_bits=None`` means float activations (32 bits)."""
    params = math.prod(shape)
    if bits is None or nonzero is None:
        return LayerRow(name, kind, list(shape), params, int(macs), FP_BITS, 0.0, float(macs) * FP_BITS * A_BITS, False)
    a = A_BITS if act_bits is None else int(act_bits)
    density = nonzero / params if params else 0.0
    return LayerRow(
        name, kind, list(shape), params, int(macs), int(bits), 1.0 - density, density * macs * bits * a, True, a
    )


@torch.no_grad()
def bops_rows(model: nn.Module, macs: dict[str, int], encoded: dict | None = None,
              act_bits: dict[str, int] | None = None) -> list[LayerRow]:
    """Rows for every convolution and linear weight of a live model (quantized or not).

    ``encoded`` (layer name → :class:`~codeq_cli.core.quantizer.Encoded`) reuses
    encodings the caller already made instead of encoding every layer again.
    ``act_bits`` (layer name → input bit-width) replaces the model's calibrated
    activation quantizers' widths (:func:`~codeq_cli.core.act_quant.act_bits`).
    """
    if encoded is None:
        encoded = encode_all(model)  # on a GPU: one read back to the host for all layers
    abits = _act_bits(model) if act_bits is None else act_bits
    rows = []
    for t in plan(model):
        if t.kind == "other":
            continue
        e = encoded.get(t.name)
        if e is not None:
            nonzero = e.nonzero if e.nonzero is not None else int(torch.count_nonzero(e.codes))
            rows.append(make_row(t.name, t.kind, tuple(e.codes.shape), macs.get(t.name, 0), bits=e.bits,
                                 nonzero=nonzero, act_bits=abits.get(t.name)))
        else:
            rows.append(make_row(t.name, t.kind, t.shape, macs.get(t.name, 0)))
    # out_proj of nn.MultiheadAttention is found by plan() as a Linear: nothing more to add.
    return rows


def bops_totals(rows: Iterable[LayerRow]) -> dict:
    """Totals over rows: params, MACs, BOPs, relative BOPs (%), sparsity and bits.

    ``sparsity`` and ``avg_bits`` are weighted by parameters over all rows
    (float layers count dense at 32 bits); ``mean_layer_sparsity`` and
    ``mean_layer_bits`` are plain means over the quantized layers (the paper's
    per-layer averages).
    """
    rows = list(rows)
    params = sum(r.params for r in rows)
    macs = sum(r.macs for r in rows)
    bops = sum(r.bops for r in rows)
    dense = macs * FP_BITS * A_BITS
    zeros = sum(r.sparsity * r.params for r in rows)
    q = [r for r in rows if r.quantized]
    return {
        "layers": len(rows),
        "quantized_layers": len(q),
        "params": params,
        "quantized_params": sum(r.params for r in q),
        "macs": macs,
        "bops": bops,
        "rel_bops": 100.0 * bops / dense if dense else 0.0,
        "sparsity": zeros / params if params else 0.0,
        "avg_bits": sum(r.bits * r.params for r in rows) / params if params else 0.0,
        "mean_layer_sparsity": sum(r.sparsity for r in q) / len(q) if q else 0.0,
        "mean_layer_bits": sum(r.bits for r in q) / len(q) if q else 0.0,
        # the per-layer spread: learned bit-widths and sparsities that differ where the layers differ
        "min_layer_bits": min((r.bits for r in q), default=0),
        "max_layer_bits": max((r.bits for r in q), default=0),
        "min_layer_sparsity": min((r.sparsity for r in q), default=0.0),
        "max_layer_sparsity": max((r.sparsity for r in q), default=0.0),
    }

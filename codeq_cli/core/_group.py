"""The one-pass quantizer: steps 1-8 of ``docs/method.md`` for every layer of a model at once.

Issue 22: on a GPU, the per-layer quantizer is bound by kernel launches (about
78 per layer and step, most of them on single numbers). Here the same
arithmetic runs for all quantized layers of a model together, so the number of
launches does not grow with the number of layers:

- **One flat buffer.** The weights are copied (one multi-tensor copy,
  ``torch._foreach_copy_``) into one buffer, each layer in its own slot of whole
  rows of ``ROW`` elements (the rest of its last row is zeros). Each weight is
  copied in its memory order, so a channels_last weight costs no reordering.
- **One exact selection** (:func:`segmented_order_stats`): ``R = quantile(|w|, q)``
  of every layer by a radix selection over the bit patterns of ``|w|`` (as
  int32, which order like the floats): three counting passes over the buffer
  (15, 8 and 8 bits), each one histogram of all layers at once, find the two
  order statistics of each layer around its rank exactly; the padding zeros
  only shift the ranks. The interpolation is ``torch.quantile``'s, with the
  same float32 rank rule as :func:`codeq_cli.core._select.quantile_rank`.
- **The scalar chain as vectors**: ``θ → b → Q → d → s → δ``, one entry per
  layer, in the float32 operations of :meth:`DeadZoneQuantizer._scalars`.
- **The elementwise forward** over the whole buffer, each row with its
  layer's ``s``, ``δ``, ``Q`` (the operations of ``_DeadZoneSTE``, so values are
  bit for bit those of the per-layer eager path for the same scalars); each
  layer gets a view of its slot in its own shape and strides.
- **The backward**: the incoming gradients copied into one buffer (one
  multi-tensor copy), the two sums ``Σ g·(q − r)`` and ``Σ_{q=0} g·sign(w)``
  per row, then per layer with one ``segment_reduce`` (deterministic, no
  atomics), and the chain rule to ``θ_dz``/``θ_bit`` by hand, as vectors.
  ``∂ŵ/∂w = 1``: each weight's gradient is the incoming one, uncopied.

No host syncs: every size is known from the shapes. The layers are grouped
once by :func:`codeq_cli.core.insert.quantize_` (a :class:`Group`); the first
layer a forward pass asks for runs the pass for all of them and each other
layer then takes its result (:meth:`Group.take`); a result is used once, and
only while its weight and logits are unchanged (their version counters) and
in the grad mode it was made in, so a second forward, an optimizer step or
``no_grad`` evaluation all make a new pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from codeq_cli.core import _kernels
from codeq_cli.core._select import exact_quantile, quantile_rank

ROW = 1024  # elements per row of the flat buffer: the unit of the per-row sums
# Radix selection: (shift, bits) of each pass over the 31 bits of |w| as int32.
_PASSES = ((16, 15), (8, 8), (0, 8))
EPS = 1e-8
_LN2 = math.log(2.0)


@dataclass(frozen=True)
class _Member:
    """One layer of a pass: its quantizer and where its slot is."""

    qz: object  # DeadZoneQuantizer (not imported: quantizer.py imports this module)
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dense: bool  # memory dense: copied in memory order, the output has the weight's strides
    numel: int
    offset: int
    rows: int


class _Layout:
    """Slots, ranks and per-layer constants of one set of layers (built once, reused every step)."""

    def __init__(self, qzs: list, ws: list[Tensor]) -> None:
        w0 = ws[0]
        self.device, self.dtype = w0.device, w0.dtype
        self.mixed = qzs[0].theta_bit is not None
        members, offset = [], 0
        for qz, w in zip(qzs, ws):
            # One segment (one R, s, δ) per layer: the granularity's ranges. Per-channel
            # ranges would make each output channel a segment here (see core/granularity.py).
            if qz.granularity.ranges(tuple(w.shape)) != 1:
                raise NotImplementedError(f"{qz.granularity!r}: the one-pass quantizer has one range per layer")
            n = w.numel()
            rows = -(-n // ROW)
            dense = _kernels.flat(w) is not None
            members.append(_Member(qz, tuple(w.shape), tuple(w.stride()) if dense else (), dense, n, offset, rows))
            offset += rows * ROW
        self.members = members
        self.size = offset
        self.rows = offset // ROW
        dev = self.device
        seg = torch.tensor([i for i, m in enumerate(members) for _ in range(m.rows)], dtype=torch.int64)
        self.row_seg = seg.to(dev)
        self.lengths = torch.tensor([m.rows for m in members], device=dev)
        off_cpu = self.device.type != "cpu"
        ranks, weights = [], []
        for m in members:
            below, above, weight = quantile_rank(m.numel, m.qz.quantile, off_cpu)
            pad = m.rows * ROW - m.numel  # the zeros of the slot's last row sort first
            ranks.append((pad + below, pad + above))
            weights.append(weight)
        self.ranks = torch.tensor(ranks, dtype=torch.int64, device=dev)
        self.weight = torch.tensor(weights, dtype=self.dtype, device=dev)
        self.interp = torch.tensor([w != 0.0 for w in weights], device=dev)
        first = _PASSES[0][1]
        self.base_first = (seg * (1 << first)).to(torch.int32).view(-1, 1).to(dev)
        self.base_next = [(seg * (2 << bits)).to(torch.int32).view(-1, 1).to(dev) for _, bits in _PASSES[1:]]
        if self.mixed:
            self.span = torch.tensor([float(q.b_max - q.b_min) for q in qzs], dtype=self.dtype, device=dev)
            self.b_min = torch.tensor([float(q.b_min) for q in qzs], dtype=self.dtype, device=dev)
        else:
            self.denom = torch.tensor([float(2 ** (q.bits - 1) - 1) - 0.5 for q in qzs], dtype=self.dtype, device=dev)
            self.qmax = torch.tensor([float(2 ** (q.bits - 1) - 1) for q in qzs], dtype=self.dtype, device=dev)

    def slots(self, buf: Tensor) -> list[Tensor]:
        """Each layer's slot in ``buf``, in the layout of the flat view it was filled from."""
        return [buf[m.offset:m.offset + m.numel] for m in self.members]

    def views(self, buf: Tensor) -> list[Tensor]:
        """Each layer's slot of ``buf`` in the layer's own shape and strides."""
        out = []
        for m in self.members:
            if m.dense:
                out.append(buf.as_strided(m.shape, m.stride, buf.storage_offset() + m.offset))
            else:
                out.append(buf[m.offset:m.offset + m.numel].view(m.shape))
        return out


def _same_order(t: Tensor, member: _Member) -> bool:
    """True when ``t`` lies in memory as the weight does (strides of size-1 dimensions do not matter)."""
    return all(a == b for a, b, n in zip(t.stride(), member.stride, member.shape) if n > 1)


def _flat_of(t: Tensor, member: _Member) -> Tensor:
    """``t`` (a weight or its gradient) as 1-D in the order its slot holds it."""
    if member.dense:
        if _same_order(t, member):
            f = _kernels.flat(t)
            if f is not None:
                return f
        # a gradient in another layout: lay it out as the weight is
        return torch.empty_strided(member.shape, member.stride, dtype=t.dtype, device=t.device).copy_(t).as_strided(
            (member.numel,), (1,))
    return t.reshape(-1)


def _fill(layout: _Layout, ts: list[Tensor | None]) -> Tensor:
    """One zero-padded buffer holding ``ts`` in their slots (``None``: zeros)."""
    buf = torch.zeros(layout.size, dtype=layout.dtype, device=layout.device)
    pairs = [(slot, _flat_of(t, m)) for slot, t, m in zip(layout.slots(buf), ts, layout.members) if t is not None]
    if pairs:
        dst, src = zip(*pairs)
        torch._foreach_copy_(list(dst), list(src))
    return buf


def segmented_order_stats(a: Tensor, layout: _Layout) -> tuple[Tensor, Tensor]:
    """``(lo, hi)``: for every layer, the ``ranks[:, 0]``-th and ``ranks[:, 1]``-th smallest of its rows of ``a``.

    ``a`` holds non-negative float32 values (``|w|``; NaN sorts above +inf) in
    ``layout``'s rows. Exact: a radix selection on the int32 bit patterns,
    which order as the values do. No host sync; three counting passes.
    """
    L = len(layout.members)
    keys = a.view(torch.int32).view(layout.rows, ROW)
    rank = layout.ranks.clone()  # rank within what is still undecided, per (layer, query)
    prefix = None  # the bits decided so far, per (layer, query)
    for p, (shift, bits) in enumerate(_PASSES):
        size = 1 << bits
        digit = keys >> shift if p == 0 else (keys >> shift) & (size - 1)
        if p == 0:  # one histogram per layer, shared by both queries
            counts = torch.zeros(L * size, dtype=torch.int32, device=a.device)
            counts.index_add_(0, (digit + layout.base_first).view(-1),
                              torch.ones((), dtype=torch.int32, device=a.device).expand(keys.numel()))
            counts = counts.view(L, 1, size)
            channel = torch.zeros_like(rank)
        else:  # elements under each query's prefix; the second query's own channel where the prefixes differ
            upper = keys >> (shift + bits)
            per_row = prefix.index_select(0, layout.row_seg)  # (rows, 2)
            first = upper == per_row[:, :1]
            second = (upper == per_row[:, 1:]) & ~first
            counts = torch.zeros(L * 2 * size, dtype=torch.int32, device=a.device)
            index = digit + layout.base_next[p - 1] + second.to(torch.int32) * size
            counts.index_add_(0, index.view(-1), (first | second).to(torch.int32).view(-1))
            counts = counts.view(L, 2, size)
            channel = torch.stack((torch.zeros_like(rank[:, 0]), (prefix[:, 1] != prefix[:, 0]).long()), 1)
        cum = counts.cumsum(2, dtype=torch.int32)
        rows_q = cum.gather(1, channel.unsqueeze(2).expand(L, 2, size))  # (L, 2, size): each query's histogram
        d = torch.searchsorted(rows_q, rank.unsqueeze(2).to(torch.int32), right=True)  # (L, 2, 1)
        before = rows_q.gather(2, d) - counts.gather(1, channel.unsqueeze(2).expand(L, 2, size)).gather(2, d)
        rank = rank - before.squeeze(2)
        d = d.squeeze(2).to(torch.int32)
        prefix = d if prefix is None else (prefix << bits) | d
    lohi = prefix.view(torch.float32)
    return lohi[:, 0], lohi[:, 1]


def layer_quantiles(a: Tensor, layout: _Layout) -> Tensor:
    """``R`` of every layer: ``torch.quantile(|w|, q)`` of its slot, exactly (``a = |buffer|``)."""
    if layout.dtype == torch.float32:
        lo, hi = segmented_order_stats(a, layout)
        return torch.where(layout.interp, torch.lerp(lo, hi, layout.weight), lo)
    # other dtypes: one selection per layer (not the GPU's training path)
    return torch.stack([exact_quantile(s, m.qz.quantile) for s, m in zip(layout.slots(a), layout.members)])


def scalars(layout: _Layout, R: Tensor, theta_dz: Tensor, theta_bit: Tensor | None):
    """Steps 2-6 for every layer: ``(Q, d, s, δ, denominator)``, the operations of ``DeadZoneQuantizer._scalars``."""
    if theta_bit is not None:
        b = torch.round(torch.tanh(theta_bit.abs()) * layout.span + layout.b_min)
        qmax = torch.pow(2.0, b.to(layout.dtype) - 1.0) - 1.0
        denom = qmax - 0.5
    else:
        qmax, denom = layout.qmax, layout.denom
    d = 2.0 * R * (1.0 - torch.tanh(theta_dz.to(layout.dtype).abs()))
    s = (R - d / 2.0) / denom + EPS
    shift = d / 2.0 - s / 2.0
    return qmax, d, s, shift, denom


class _OnePass(torch.autograd.Function):
    """Steps 1-8 of every layer of ``layout`` and their gradients, as one autograd node.

    Inputs: the layout, the number of layers ``L``, the dead-zone logits
    stacked into one vector of ``L``, the bit logits likewise (``None`` for
    fixed layouts) and ``L`` weights. Outputs: ``L`` dequantized weights, views
    of one buffer. The logits' gradients come back as vectors too (a layer
    whose output the forward did not use gets zero there), so that autograd
    adds the penalty's gradient once per vector, not once per logit.
    """

    @staticmethod
    def forward(ctx, layout: _Layout, L: int, dz_vec: Tensor, bit_vec: Tensor | None, *ws):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        dz = dz_vec.detach().to(layout.dtype)
        bit = bit_vec.detach().to(layout.dtype) if bit_vec is not None else None
        buf = _fill(layout, [w.detach() for w in ws])
        a = buf.abs()
        R = layer_quantiles(a, layout)
        qmax, d, s, shift, denom = scalars(layout, R, dz, bit)
        per_row = torch.stack((s, shift, qmax)).index_select(1, layout.row_seg).unsqueeze(2)  # (3, rows, 1)
        s_r, shift_r, qmax_r = per_row
        a2, w2 = a.view(layout.rows, ROW), buf.view(layout.rows, ROW)
        # _DeadZoneSTE's operations, in its order
        r = a2.sub_(shift_r).clamp_(min=0).div_(s_r)
        m = torch.round(r).clamp_(max=qmax_r)
        kept = m > 0
        err = r.sub_(m)
        w_hat = m.mul_(s_r).add_(shift_r).mul_(kept).copysign_(w2)
        ctx.layout, ctx.L = layout, L
        ctx.save_for_backward(buf, err, kept, R, d, s, qmax, denom, dz, bit if bit is not None else dz)
        return tuple(layout.views(w_hat.view(-1)))

    @staticmethod
    def backward(ctx, *gs):  # type: ignore[override]
        layout = ctx.layout
        buf, err, kept, R, d, s, qmax, denom, dz, bit = ctx.saved_tensors
        mixed = layout.mixed
        if all(g is None for g in gs):
            return (None,) * (4 + len(gs))
        grad_dz = grad_bit = None
        if any(ctx.needs_input_grad[2:4]):
            g = _fill(layout, list(gs)).view(layout.rows, ROW)
            g_sign = torch.sign(buf).view(layout.rows, ROW).mul_(g)
            # Σ g·(q − r) = −Σ g·sign(w)·(|r| − |q|);  Σ g·(sign(q) − sign(w)) = −Σ_{q = 0} g·sign(w)
            per_row = torch.stack(((g_sign * err).sum(1), g_sign.masked_fill_(kept, 0).sum(1)), 1)
            sums = torch.segment_reduce(per_row, "sum", lengths=layout.lengths, axis=0, unsafe=True)
            g_s, g_shift = -sums[:, 0], -sums[:, 1]
            # δ = d/2 − s/2 and s = (R − d/2)/(Q − 1/2) + ε
            g_s_total = g_s - 0.5 * g_shift
            g_d = 0.5 * g_shift - g_s_total * 0.5 / denom
            # d = 2R(1 − tanh|θ_dz|)
            t = torch.tanh(dz.abs())
            grad_dz = g_d * -2.0 * R * (1.0 - t * t) * torch.sign(dz)
            if mixed:
                # Q = 2^(b−1) − 1, b = round(tanh|θ_bit|·span + b_min) (straight-through)
                g_q = -g_s_total * (R - d / 2.0) / (denom * denom)
                tb = torch.tanh(bit.abs())
                grad_bit = g_q * (qmax + 1.0) * _LN2 * layout.span * (1.0 - tb * tb) * torch.sign(bit)
        return (None, None, grad_dz, grad_bit, *gs)


@dataclass(frozen=True)
class StackedLogits:
    """One pass's logits as the vectors its autograd node took (``bit`` is None in fixed precision).

    A loss term that reads these rather than stacking the parameters again
    sends its gradient into the same vector, so each logit receives one
    gradient per step (:meth:`Group.logit_vectors`).
    """

    quantizers: tuple
    dz: Tensor
    bit: Tensor | None
    stamps: tuple  # (data_ptr, version) of each logit when stacked


def _theta_stamps(qzs) -> tuple:
    ts = [q.theta_dz for q in qzs] + [q.theta_bit for q in qzs if q.theta_bit is not None]
    return tuple((t.data_ptr(), t._version) for t in ts)


def run(qzs: list, ws: list[Tensor], layouts: dict) -> tuple[list[Tensor], list[StackedLogits]]:
    """``ŵ`` of every ``(quantizer, weight)``, the layers in as few passes as their kinds allow,
    and each pass's stacked logits.

    One pass per (device, dtype, fixed or mixed precision); ``layouts`` remembers
    the layout of each from one call to the next.
    """
    parts: dict[tuple, list[int]] = {}
    for i, (qz, w) in enumerate(zip(qzs, ws)):
        parts.setdefault((w.device, w.dtype, qz.theta_bit is None), []).append(i)
    out: list[Tensor | None] = [None] * len(ws)
    logits = []
    for idx in parts.values():
        q, w = [qzs[i] for i in idx], [ws[i] for i in idx]
        layout = _layout_for(q, w, layouts)
        dz = torch.stack([x.theta_dz for x in q])
        bit = torch.stack([x.theta_bit for x in q]) if layout.mixed else None
        logits.append(StackedLogits(tuple(q), dz, bit, _theta_stamps(q)))
        for i, y in zip(idx, _OnePass.apply(layout, len(q), dz, bit, *w)):
            out[i] = y
    return out, logits  # type: ignore[return-value]


@torch.no_grad()
def encode(qzs: list, ws: list[Tensor], layouts: dict) -> list[tuple[Tensor, float, float, int, int]]:
    """``(codes, step, shift, bits, nonzero)`` of every layer, with one read back to the host for all.

    The operations of ``DeadZoneQuantizer._encode``'s eager path, on the flat
    buffer; the codes are int8 views in each weight's shape and strides.
    """
    parts: dict[tuple, list[int]] = {}
    for i, (qz, w) in enumerate(zip(qzs, ws)):
        parts.setdefault((w.device, w.dtype, qz.theta_bit is None), []).append(i)
    out: list = [None] * len(ws)
    for idx in parts.values():
        q, w = [qzs[i] for i in idx], [ws[i].detach() for i in idx]
        layout = _layout_for(q, w, layouts)
        dz = torch.stack([x.theta_dz for x in q]).to(layout.dtype)
        bit = torch.stack([x.theta_bit for x in q]).to(layout.dtype) if layout.mixed else None
        buf = _fill(layout, w)
        a = buf.abs()
        R = layer_quantiles(a, layout)
        qmax, _, step, shift, _ = scalars(layout, R, dz, bit)
        s_r, shift_r, qmax_r = torch.stack((step, shift, qmax)).index_select(1, layout.row_seg).unsqueeze(2)
        m = a.view(layout.rows, ROW).sub_(shift_r).clamp_(min=0).div_(s_r).round_().clamp_(max=qmax_r)
        codes = m.copysign_(buf.view(layout.rows, ROW)).to(torch.int8)
        kept = torch.segment_reduce((codes != 0).sum(1, dtype=torch.float64), "sum", lengths=layout.lengths,
                                    axis=0, unsafe=True)
        bits = torch.log2(qmax + 1.0) + 1.0  # Q = 2^(b−1) − 1, exact for b in 2..8
        host = torch.stack((step.double(), shift.double(), bits.double(), kept)).tolist()  # the one read
        for j, (i, c) in enumerate(zip(idx, layout.views(codes.view(-1)))):
            out[i] = (c, host[0][j], host[1][j], int(round(host[2][j])), int(host[3][j]))
    return out


def _layout_key(qzs: list, ws: list[Tensor]) -> tuple:
    return tuple((id(q), q.quantile, q.bits, q.b_min, q.b_max, tuple(w.shape), w.stride(), w.device, w.dtype)
                 for q, w in zip(qzs, ws))


def _layout_for(qzs: list, ws: list[Tensor], layouts: dict) -> _Layout:
    key = _layout_key(qzs, ws)
    part = key[0][-2:] + (qzs[0].theta_bit is None,)
    cached = layouts.get(part)
    if cached is not None and cached[0] == key:
        return cached[1]
    layout = _Layout(qzs, ws)
    layouts[part] = (key, layout)
    return layout


class Group:
    """The quantized weights of one model, quantized together (see the module docstring).

    Held by each of its quantizers (a plain attribute: not in any state dict).
    """

    def __init__(self) -> None:
        self.members: list[tuple[object, object, str]] = []  # (quantizer, module, parameter name)
        self.entries: dict[int, tuple[Tensor, tuple]] = {}
        self.layouts: dict = {}
        self.encode_layouts: dict = {}  # those of insert.encode_all (the same layers, usually)
        self.logits: list[StackedLogits] = []  # the last pass's stacked logits (see logit_vectors)

    def add(self, qz, module, pname: str) -> None:
        self.members.append((qz, module, pname))
        qz.__dict__["_group"] = self

    def _live(self):
        from torch.nn.utils import parametrize

        for qz, module, pname in self.members:
            if parametrize.is_parametrized(module, pname):
                plist = module.parametrizations[pname]
                if any(p is qz for p in plist) and hasattr(plist, "original"):
                    yield qz, plist.original

    def __getstate__(self) -> dict:
        # deepcopy and pickle: the layers, not this forward's results (tensors in an autograd graph)
        return {"members": self.members, "entries": {}, "layouts": {}, "encode_layouts": {}, "logits": []}

    @staticmethod
    def _stamp(qz, w: Tensor) -> tuple:
        """What a result depends on: the weight and logits (object, storage, version) and the grad mode."""
        ts = (w, qz.theta_dz) if qz.theta_bit is None else (w, qz.theta_dz, qz.theta_bit)
        if any(t.is_inference() for t in ts):  # no version counter: never reused
            return (object(),)
        return (w, *((t.data_ptr(), t._version) for t in ts), torch.is_grad_enabled(),
                torch.is_inference_mode_enabled())

    @staticmethod
    def _same(a: tuple, b: tuple) -> bool:
        return a[0] is b[0] and a[1:] == b[1:]

    def take(self, qz, w: Tensor) -> Tensor | None:
        """``qz``'s output for ``w`` from this forward's pass (running the pass if needed); None if ``w`` is not its weight."""
        entry = self.entries.pop(id(qz), None)
        if entry is not None and self._same(entry[1], self._stamp(qz, w)):
            return entry[0]
        live = [(q, x) for q, x in self._live() if x.numel() > 0 and not _kernels.usable(x)]
        if not any(q is qz and x is w for q, x in live):
            return None
        outs, self.logits = run([q for q, _ in live], [x for _, x in live], self.layouts)
        self.entries = {id(q): (y, self._stamp(q, x)) for (q, x), y in zip(live, outs)}
        entry = self.entries.pop(id(qz))
        return entry[0]

    def logit_vectors(self, qzs: list) -> tuple[Tensor, Tensor | None] | None:
        """``(θ_dz, θ_bit)`` of ``qzs`` as the last pass stacked them, or None.

        Only when that pass took exactly these quantizers in this order, in
        one part, with grad enabled, and no logit has changed since (an
        optimizer step, a load); otherwise the caller stacks the parameters
        itself. Reading them makes each logit's two gradients (the
        quantizer's and the penalty's) meet in one vector.
        """
        if len(self.logits) != 1:
            return None
        lg = self.logits[0]
        if (len(lg.quantizers) != len(qzs) or any(a is not b for a, b in zip(lg.quantizers, qzs))
                or not lg.dz.requires_grad or lg.stamps != _theta_stamps(qzs)):
            return None
        return lg.dz, lg.bit

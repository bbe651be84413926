"""The ONNX graph passes of the int8 export (``formats/onnx_int8.py``): int8 weights, int32 biases.

After ``torch.onnx.export`` of the QDQ model, each weight is a float initializer
read by ``QuantizeLinear``/``DequantizeLinear``. ONNX Runtime's QDQ fusion
wants the int8 initializer itself read by the ``DequantizeLinear``, and a bias
as int32 at scale ``s_x·σ_c`` (input scale × weight scale) so that the
Conv/Gemm is a full QDQ group.
"""

from __future__ import annotations

import numpy as np


def int8_initializers(model_proto) -> None:
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
        base = f"{n.input[2]}_{len(extra)}"  # one bias tensor may be shared by several convolutions
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

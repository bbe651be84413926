"""Where the activation quantizers go (core/_act_places.py) and what ONNX Runtime makes of the export.

The gate is the op count of the graph ONNX Runtime runs (after its optimizer): every convolution and
linear layer an integer kernel, every residual add a QLinearAdd. Counts do not depend on the machine.
The architectures are the real timm/torchvision ones (or a member of the family with the same blocks),
random weights, 32×32 inputs, no training: insert, calibrate on random data, export.
"""

from __future__ import annotations

import collections
import copy
import inspect
import importlib.util

import numpy as np
import pytest
import torch
from torch import nn

from codeq_cli.core import _act_places, _taps, act_quant
from codeq_cli.core.insert import plan
from codeq_cli.formats import onnx_int8

HAS_ORT = importlib.util.find_spec("onnx") is not None and importlib.util.find_spec("onnxruntime") is not None
needs_ort = pytest.mark.skipif(not HAS_ORT, reason="pip install 'codeq[onnx]' (onnx, onnxruntime)")


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name.startswith("tv:"):
        import torchvision

        kw = {"width_mult": 0.25} if name == "tv:mobilenet_v2" else {}
        return getattr(torchvision.models, name[3:])(num_classes=10, **kw)
    import timm

    kw = {"img_size": 32, "depth": 2} if name.startswith("timm:vit_") else {}  # ViT-S's blocks, two of them
    return timm.create_model(name.removeprefix("timm:"), pretrained=False, num_classes=10, **kw)


def _layers(model: nn.Module) -> list[str]:
    return [t.module_name for t in plan(model) if t.quantize]


def _grid_weights(model: nn.Module, names: list[str]) -> dict:
    """4-bit levels on a plain uniform grid (step max|w|/7, no shift): the export maps them exactly."""
    out = {}
    with torch.no_grad():
        for n in names:
            m = model.get_submodule(n)
            s = float(m.weight.abs().max()) / 7 or 1.0
            s = float(np.float32(s))
            w_hat = torch.round(m.weight / s).clamp_(-7, 7) * s
            m.weight.copy_(w_hat)
            out[n] = (w_hat.detach().clone(), s, 0.0, 4)
    return out


def _quantized(name: str, size: int = 32):
    """``(live model with calibrated quantizers, plain copy, weights, entries, x)``."""
    model = _build(name).eval()
    names = _layers(model)
    weights = _grid_weights(model, names)
    plain = copy.deepcopy(model)
    act_quant.add_(model, names, act_quant.ActSpec(bits=8))
    x = torch.randn(2, 3, size, size)
    act_quant.calibrate_(model, [x])
    return model.eval(), plain, weights, act_quant.frozen_entries(model), x


def _ort_ops(path, tmp_path) -> collections.Counter:
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


def _residual_adds(model: nn.Module) -> int:
    tracer = _act_places._Tracer()
    graph = tracer.trace(model)
    memo: dict = {}
    n = 0
    for node in graph.nodes:
        if (node.op == "call_function" and node.target in _act_places._ADD_FUNCS) or \
                (node.op == "call_method" and node.target in _act_places._ADD_METHODS):
            n += sum(isinstance(a, torch.fx.Node) and _act_places._is_activation(a, memo) for a in node.args[:2]) == 2
    return n


def _attention_matmuls(model: nn.Module) -> int:
    """Matmuls of two activations in ``model``'s trace; ``scaled_dot_product_attention`` counts two."""
    graph = _act_places._Tracer().trace(model)
    memo: dict = {}
    n = 0
    for node in graph.nodes:
        if node.op == "call_function" and node.target is nn.functional.scaled_dot_product_attention:
            n += 2
        elif node.op == "call_function" and node.target in _act_places._MATMUL_FUNCS:
            n += sum(isinstance(a, torch.fx.Node) and _act_places._is_activation(a, memo) for a in node.args[:2]) == 2
    return n


# -- the places, by hand on a small residual block -----------------------------------------------------
class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.down = nn.Conv2d(4, 4, 1)
        self.relu2 = nn.ReLU()

    def forward(self, x):
        return self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))) + self.down(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.act, self.pool = nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2)
        self.block = Block()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = self.block(self.pool(self.act(self.stem(x))))
        return self.head(x.mean((2, 3)))


def test_places_of_a_residual_block_by_hand():
    net = Net()
    places = {(p.module, p.at): p.feeds for p in _act_places.find(net, _layers(net))}
    assert places == {
        ("stem", "input"): ("stem",),  # the image
        ("pool", "input"): ("block.conv1", "block.down"),  # the stem, before the max-pool; one for both readers
        ("block.conv2", "input"): ("block.conv2",),
        ("block.bn2", "output"): (),  # the branch into the add
        ("block.down", "output"): (),  # the shortcut into the add
        ("block.relu2", "output"): (),  # the add's output (after its ReLU)
        ("head", "input"): ("head",),
    }


def test_shared_quantizer_feeds_both_layers_in_bops_and_the_checkpoint_entry():
    net = Net()
    act_quant.add_(net, _layers(net), act_quant.ActSpec(bits=None))
    act_quant.calibrate_(net, [torch.randn(2, 3, 9, 9)])
    bits = act_quant.act_bits(net)
    assert set(bits) == {"stem", "block.conv1", "block.down", "block.conv2", "head"}
    shared = net.pool.act_quant
    assert act_quant.learns_width(shared) and not act_quant.learns_width(net.block.bn2.act_quant)  # no BOPs on it
    entry = next(e for e in act_quant.frozen_entries(net) if e["name"] == "pool")
    assert entry.get("at", "input") == "input" and entry["feeds"] == ["block.conv1", "block.down"]
    # the frozen model computes what the live one does
    plain = Net()
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if ".act_quant." not in k and not k.startswith("act_quant")})
    act_quant.freeze_into(plain, act_quant.frozen_entries(net))
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), net.eval()(x))


def test_a_model_that_does_not_trace_keeps_one_quantizer_per_layer():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x):
            return self.a(x) if x.sum() > 0 else self.b(x)  # data-dependent: fx cannot trace it

    places = _act_places.find(Branchy(), ["a", "b"])
    assert [(p.module, p.at, p.feeds) for p in places] == [("a", "input", ("a",)), ("b", "input", ("b",))]


# -- taps: tensors no module holds (core/_taps.py) ------------------------------------------------------
class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(8, 24), nn.Linear(8, 8)

    def forward(self, x, attn_mask=None):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
        x = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class VBlock(nn.Module):  # ViT's block: the first add's output is read by a norm and by the second add
    def __init__(self):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.fc = nn.LayerNorm(8), Attn(), nn.LayerNorm(8), nn.Linear(8, 8)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc(self.norm2(x))


class VNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.block, self.head = nn.Linear(4, 8), VBlock(), nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.block(self.embed(x)).mean(1))


def _vnet():
    torch.manual_seed(0)
    net = VNet().eval()
    act_quant.add_(net, _layers(net), act_quant.ActSpec(bits=8))
    act_quant.calibrate_(net, [torch.randn(4, 5, 4)])
    return net


def test_attention_matmuls_and_an_add_no_module_returns_are_quantized_through_taps_by_hand():
    places = {(p.module, p.at) for p in _act_places.find(VNet(), _layers(VNet()))}
    taps = sorted(m for m, _ in places if "codeq_tap_" in m)
    assert taps == ["block.attn.codeq_tap_getitem_5", "block.attn.codeq_tap_mul", "block.attn.codeq_tap_softmax",
                    "block.attn.codeq_tap_transpose_1",  # v, q·s, p, kᵀ: the matmuls' inputs
                    "block.codeq_tap_add", "block.codeq_tap_fc",  # the first add's output, the second's branch
                    "codeq_tap_embed"]  # the shortcut (embed holds its own input's quantizer)
    # The forward written out, with the model's own quantizers where the places say:
    net = _vnet()
    qz = dict(act_quant.act_quantizers(net))
    attn, blk = net.block.attn, net.block
    x = torch.randn(3, 5, 4)
    with torch.no_grad():
        e = qz["codeq_tap_embed"](net.embed(x))  # a layer call runs its own input quantizer (its hook)
        q, k, v = attn.qkv(blk.norm1(e)).reshape(3, 5, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
        qs = qz["block.attn.codeq_tap_mul"](q * 0.5)  # the default scale 1/√4
        kt = qz["block.attn.codeq_tap_transpose_1"](k.transpose(-2, -1))
        p = qz["block.attn.codeq_tap_softmax"]((qs @ kt).softmax(-1))
        o = p @ qz["block.attn.codeq_tap_getitem_5"](v)
        y = qz["block.codeq_tap_add"](e + qz["block.attn"](attn.proj(o.transpose(1, 2).reshape(3, 5, 8))))
        z = qz["block"](y + qz["block.codeq_tap_fc"](blk.fc(blk.norm2(y))))
        torch.testing.assert_close(net(x), net.head(z.mean(1)))
    assert all(qz[t].at == "output" and qz[t].feeds == () and qz[t].bits == 8 for t in taps)


def test_a_checkpoints_tap_entries_rebuild_the_same_forward_and_a_wrong_one_is_refused():
    net = _vnet()
    entries = act_quant.frozen_entries(net)
    assert sum("codeq_tap_" in e["name"] for e in entries) == 7
    plain = VNet()
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if "act_quant" not in k})
    act_quant.freeze_into(plain, entries)
    x = torch.randn(3, 5, 4)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), net(x))
    assert set(plain.state_dict()) == {k for k in net.state_dict() if "act_quant" not in k}  # taps hold nothing
    with pytest.raises(ValueError, match="no op softmax_9"):
        act_quant.freeze_into(VNet(), [{**entries[0], "name": "block.attn.codeq_tap_softmax_9"}])


def test_a_rewritten_forward_takes_its_signature_and_refuses_a_mask_it_was_not_traced_with(monkeypatch):
    net = _vnet()
    x = torch.randn(3, 5, 8)
    mask = torch.ones(5, 5, dtype=torch.bool)
    with torch.no_grad():
        want = net.block.attn(x, None)  # positional, the default: fine
        torch.testing.assert_close(net.block.attn(x=x), want)
        with pytest.raises(ValueError, match="attn_mask"):
            net.block.attn(x, attn_mask=mask)
        with pytest.raises(ValueError, match="attn_mask"):
            net.block.attn(x, mask)  # by position too
        # the common call binds nothing: the free argument by position, the fixed one at its default
        monkeypatch.setattr(inspect.Signature, "bind", lambda *a, **k: pytest.fail("bound a plain call"))
        torch.testing.assert_close(net.block.attn(x), want)
    copied = copy.deepcopy(net)  # the rewritten forward follows the copy, not the original
    assert copied.block.attn.forward.__self__ is copied.block.attn


class Mixer(nn.Module):  # a block its parent gives an optional tensor (GC ViT's q_global)
    def __init__(self):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(8), nn.Linear(8, 8)

    def forward(self, x, extra=None):
        if extra is not None:
            x = x + extra  # read by the norm and by the last add: no module returns it
        return x + self.fc(self.norm(x))


class MNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.ctx, self.mix, self.head = nn.Linear(4, 8), nn.Linear(4, 8), Mixer(), nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.mix(self.embed(x), extra=self.ctx(x)).mean(1))


def test_an_argument_the_parent_passes_as_a_tensor_stays_an_input_of_the_rewritten_forward():
    torch.manual_seed(0)
    net = MNet().eval()
    plain = copy.deepcopy(net)
    act_quant.add_(net, _layers(net), act_quant.ActSpec(bits=8))
    assert "mix.codeq_tap_add" in dict(act_quant.act_quantizers(net))  # x + extra, traced with extra given
    act_quant.calibrate_(net, [torch.randn(4, 5, 4)])
    x = torch.randn(3, 5, 4)
    with torch.no_grad():
        e, c = net.embed(x), net.ctx(x)  # each quantized by its output's hook
        mix = net.mix
        y = mix.codeq_tap_add.act_quant(e + c)
        want = mix.act_quant(y + mix.codeq_tap_fc.act_quant(mix.fc(mix.norm(y))))
        torch.testing.assert_close(mix(e, extra=c), want)
        act_quant.freeze_into(plain, act_quant.frozen_entries(net))
        torch.testing.assert_close(plain.eval()(x), net(x))


def test_a_forward_that_depends_on_the_training_flag_is_not_rewritten():
    class Flagged(VBlock):
        def forward(self, x):
            x = x + self.attn(self.norm1(x))
            if self.training:  # fx would fix one branch
                x = x * 1.0
            return x + self.fc(self.norm2(x))

    class FNet(VNet):
        def __init__(self):
            super().__init__()
            self.block = Flagged()

    net = FNet()
    places = {p.module for p in _act_places.find(net, _layers(net))}
    assert not any(m.startswith("block.codeq_tap_") for m in places)  # the add stays in float
    assert sum(m.startswith("block.attn.codeq_tap_") for m in places) == 4  # the attention's own forward is fine
    assert "forward" not in net.block.__dict__


class SE(nn.Module):  # EfficientNet's squeeze-excitation: a sigmoid gate on the channel means
    def __init__(self):
        super().__init__()
        self.conv_reduce, self.act1, self.conv_expand = nn.Conv2d(4, 2, 1), nn.SiLU(), nn.Conv2d(2, 4, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        s = self.conv_expand(self.act1(self.conv_reduce(x.mean((2, 3), keepdim=True))))
        return x * self.gate(s)


class ENet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.bn, self.act, self.se = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.SiLU(), SE()
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.se(self.act(self.bn(self.stem(x))))).mean((2, 3))


def test_silu_and_a_squeeze_excitation_gate_are_quantized_as_sigmoid_and_mul_by_hand():
    net = ENet()
    places = {(p.module, p.at) for p in _act_places.find(net, _layers(net))}
    assert type(net.act) is _taps.SplitSiLU and type(net.se.act1) is _taps.SplitSiLU
    assert places == {
        ("stem", "input"), ("head", "input"), ("se.conv_expand", "input"),
        ("bn", "output"),  # the conv's output: σ's input and the product's
        ("act.codeq_sigmoid", "output"),  # σ(x): QLinearSigmoid
        ("act", "output"),  # x·σ(x): QLinearMul, read by the gate's product and the means
        ("se.conv_reduce", "output"),  # σ's input and the product's
        ("se.codeq_tap_mean", "output"),  # the means, conv_reduce's input (conv_reduce holds its output's)
        ("se.act1.codeq_sigmoid", "output"),
        ("se.gate", "input"),  # conv_expand's output
        ("se.codeq_tap_gate", "output"),  # the gate (se.gate holds its input's): the product's second input
        ("codeq_tap_head", "output"),  # head's output (head holds its input's)
    }, places
    torch.manual_seed(0)
    live = ENet().eval()
    act_quant.add_(live, _layers(live), act_quant.ActSpec(bits=8))
    act_quant.calibrate_(live, [torch.randn(4, 3, 9, 9)])
    qz = dict(act_quant.act_quantizers(live))
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():  # the forward written out with the model's quantizers (a module call runs its own)
        b = live.bn(live.stem(x))
        a = qz["act"](b * qz["act.codeq_sigmoid"](torch.sigmoid(b)))
        r = live.se.conv_reduce(qz["se.codeq_tap_mean"](a.mean((2, 3), keepdim=True)))
        e = live.se.conv_expand(r * qz["se.act1.codeq_sigmoid"](torch.sigmoid(r)))
        g = qz["se.codeq_tap_gate"](torch.sigmoid(qz["se.gate"](e)))
        torch.testing.assert_close(live(x), qz["codeq_tap_head"](live.head(a * g)).mean((2, 3)))
        plain = ENet()  # a checkpoint's entries split the SiLUs and rebuild the taps on a plain model
        plain.load_state_dict({k: v for k, v in live.state_dict().items() if "act_quant" not in k})
        act_quant.freeze_into(plain, act_quant.frozen_entries(live))
        torch.testing.assert_close(plain.eval()(x), live(x))


# -- integer kernels after ONNX Runtime's optimizer ------------------------------------------------------
FAMILIES = [
    "tv:resnet18",
    "tv:mobilenet_v2",  # width 0.25: the same blocks
    "timm:mobilenetv3_small_050",  # MobileNet-V3's blocks (SE, hard-swish) at a fraction of the size
    "timm:efficientnet_b0",
    "timm:convnext_atto",  # ConvNeXt-T's block (dw conv, LayerNorm, two linears, layer scale) at 1/8 of the size
    "timm:vit_small_patch16_224",  # two of ViT-S's blocks: attention matmuls and residual adds through taps
]


@pytest.fixture(scope="module", params=FAMILIES)
def exported(request, tmp_path_factory):
    """One architecture quantized, calibrated and exported (shared by the count and the equality tests)."""
    if not HAS_ORT:
        pytest.skip("pip install 'codeq[onnx]' (onnx, onnxruntime)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only contend with each other
    try:
        name = request.param
        model, plain, weights, entries, x = _quantized(name)
        convs = sum(isinstance(model.get_submodule(n), (nn.Conv1d, nn.Conv2d, nn.Conv3d)) for n in weights)
        adds, matmuls = _residual_adds(plain), _attention_matmuls(plain)
        gates = sum(type(m) in (nn.SiLU, nn.Sigmoid) for m in plain.modules())  # x·σ(x) and squeeze-excitation
        qdq, info = onnx_int8.qdq_model(plain, weights, entries)
        path = tmp_path_factory.mktemp("int8") / "m.onnx"
        path.write_bytes(onnx_int8.to_onnx(qdq, (1, 3, 32, 32), path))
        ops = _ort_ops(path, path.parent)
    finally:
        torch.set_num_threads(threads)
    return {"name": name, "model": model, "qdq": qdq, "info": info, "weights": weights, "convs": convs,
            "adds": adds, "matmuls": matmuls, "gates": gates, "path": path, "ops": ops, "x": x}


def test_every_conv_linear_and_residual_add_runs_on_integer_kernels(exported):
    ops, info, weights = exported["ops"], exported["info"], exported["weights"]
    assert info.int8_layers == len(weights) and not info.float_layers
    linears = len(weights) - exported["convs"]
    assert ops["QLinearConv"] == exported["convs"] and ops["Conv"] == ops["FusedConv"] == 0, ops
    integer_matmuls = ops["QGemm"] + ops["MatMulIntegerToFloat"] + ops["QLinearMatMul"]
    assert integer_matmuls == linears + exported["matmuls"] and ops["Gemm"] == ops["MatMul"] == 0, ops
    assert exported["matmuls"] == (4 if "vit" in exported["name"] else 0)
    # SiLU and sigmoid gates: QLinearSigmoid and QLinearMul (EfficientNet: 49 SiLU + 16 gates)
    assert ops["QLinearSigmoid"] == ops["QLinearMul"] == exported["gates"] and ops["Sigmoid"] == 0, ops
    assert exported["gates"] == (65 if "efficientnet" in exported["name"] else 0)
    assert exported["adds"] > 0 and ops["QLinearAdd"] == exported["adds"], ops


def test_onnx_runtime_computes_what_the_fake_quantized_model_does(exported):
    import onnxruntime as ort

    x, qdq, model = exported["x"], exported["qdq"], exported["model"]
    # the graph as written, in float (its integer kernels on this CPU are the next check's business):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    got = ort.InferenceSession(str(exported["path"]), so, providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
        qdq_torch = qdq(x).numpy()
    # ViT: a softmax or attention-matmul input a float rounding away from a tie moves one code, and the
    # code moves the logits by a few per cent (the CNNs have no such long chain of 8-bit tensors)
    tol = 0.05 if "vit" in exported["name"] else 1e-4
    np.testing.assert_allclose(got, qdq_torch, rtol=0, atol=tol * np.abs(qdq_torch).max() + 1e-6)
    # The trained (fake-quantized) model, up to BN folding in float, which can move a code by one step:
    assert np.abs(got - ref).max() <= 0.1 * np.abs(ref).max()
    # and on integer kernels (all optimizations), still the same logits to within a few steps
    fast = ort.InferenceSession(str(exported["path"]), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    assert np.abs(fast - ref).max() <= 0.1 * np.abs(ref).max()


def test_a_batch_norm_replaced_by_a_converter_gets_its_quantizer_hook_back():
    net = Net()
    act_quant.add_(net, _layers(net), act_quant.ActSpec(bits=8))
    act_quant.calibrate_(net, [torch.randn(2, 3, 9, 9)])
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        want = net.eval()(x)
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(net)  # copies the children, drops the hooks
    assert converted.block.bn2.act_quant.at == "output" and not converted.block.bn2._forward_hooks
    assert act_quant.rehook_(converted) == 1 and act_quant.rehook_(converted) == 0

    class Plain(nn.SyncBatchNorm):  # SyncBatchNorm runs only distributed; same arithmetic as BN in eval
        def forward(self, x):
            return nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)

    converted.block.bn2.__class__ = Plain
    with torch.no_grad():
        torch.testing.assert_close(converted.eval()(x), want)

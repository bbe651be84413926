"""Inserting dead-zone quantizers into timm and torchvision models and taking them out.

Models are built with random weights (no downloads) at the smallest input
they take; timm's ``test_*`` architectures and tiny configurations keep the
whole table within a few seconds per family.
"""

from __future__ import annotations

import functools

import pytest
import timm
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm
from torch.testing import assert_close
from torchvision import models as tvm

from codeq_cli.core.insert import bake_, dequantized_state_dict, plan, quantize_, quantized_weights, quantizer_parameters
from codeq_cli.core.quantizer import DeadZoneQuantizer

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
NORM = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def _timm(name: str, **kwargs):
    return functools.partial(timm.create_model, name, pretrained=False, **kwargs)


def _tiny_bit():
    """timm's BiT ResNetV2 (weight-standardized ``StdConv2d`` + GroupNorm), one block per stage."""
    from timm.layers import GroupNormAct, StdConv2d
    from timm.models.resnetv2 import ResNetV2

    return ResNetV2(
        layers=(1, 1, 1, 1), channels=(32, 64, 128, 256), num_classes=10, stem_chs=16, stem_type="fixed",
        conv_layer=functools.partial(StdConv2d, eps=1e-8), norm_layer=functools.partial(GroupNormAct, num_groups=8),
    )


def _tiny_mixer():
    from timm.models.mlp_mixer import MlpMixer

    return MlpMixer(num_classes=10, img_size=64, patch_size=16, num_blocks=2, embed_dim=32)


def _tv_vit():
    # torchvision's encoder uses nn.MultiheadAttention: in_proj_weight is a bare Parameter
    return tvm.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                                 num_classes=10)


ARCHS = [
    # id, builder, input size, bits (None: mixed precision)
    ("timm_resnet10t", _timm("resnet10t", num_classes=10), 32, 4),
    ("timm_test_resnet", _timm("test_resnet"), 32, None),
    ("timm_regnetx_002", _timm("regnetx_002", num_classes=10), 32, 4),
    ("timm_mobilenetv3_small_050", _timm("mobilenetv3_small_050", num_classes=10), 32, None),
    ("timm_test_efficientnet", _timm("test_efficientnet"), 32, 4),
    ("timm_test_efficientnet_gn", _timm("test_efficientnet_gn"), 32, 2),
    ("timm_convnext_atto", _timm("convnext_atto", num_classes=10), 32, None),
    ("timm_test_vit", _timm("test_vit", img_size=64), 64, 4),
    ("timm_test_vit_relpos", _timm("test_vit_relpos", img_size=64), 64, None),
    ("timm_test_vit3_attn_pool", _timm("test_vit3", img_size=64), 64, 8),
    ("timm_deit_tiny_distilled", _timm("deit_tiny_distilled_patch16_224", img_size=32, depth=2, num_classes=10), 32, 4),
    ("timm_swin", _timm("swin_tiny_patch4_window7_224", img_size=32, window_size=2, embed_dim=16, depths=(1, 1, 1),
                        num_heads=(1, 2, 4), num_classes=10), 32, None),
    ("timm_mlp_mixer", _tiny_mixer, 64, 4),
    ("timm_resnetv2_stdconv", _tiny_bit, 32, None),
    ("timm_test_nfnet_scaled_stdconv", _timm("test_nfnet"), 32, 4),
    ("timm_test_byobnet", _timm("test_byobnet"), 32, None),
    ("timm_test_coatnet", _timm("test_coatnet", img_size=64), 64, 4),
    ("timm_levit_128s", _timm("levit_128s", img_size=64, num_classes=10), 64, None),
    ("timm_mobilevit_xxs", _timm("mobilevit_xxs", num_classes=10), 64, 4),
    ("timm_test_mambaout", _timm("test_mambaout"), 32, None),
    ("timm_efficientvit_m0", _timm("efficientvit_m0", img_size=64, num_classes=10), 64, 4),
    ("timm_inception_next_atto", _timm("inception_next_atto", num_classes=10), 32, None),
    ("tv_resnet18", functools.partial(tvm.resnet18, num_classes=10), 32, 4),
    ("tv_resnext", functools.partial(tvm.ResNet, tvm.resnet.Bottleneck, [1, 1, 1, 1], groups=4, width_per_group=8,
                                     num_classes=10), 32, None),
    ("tv_mobilenet_v2", functools.partial(tvm.mobilenet_v2, width_mult=0.35, num_classes=10), 32, 4),
    ("tv_mobilenet_v3_small", functools.partial(tvm.mobilenet_v3_small, num_classes=10), 32, None),
    ("tv_efficientnet_b0", functools.partial(tvm.efficientnet_b0, num_classes=10), 32, 4),
    ("tv_regnet_y_400mf", functools.partial(tvm.regnet_y_400mf, num_classes=10), 32, None),
    ("tv_convnext", functools.partial(tvm.ConvNeXt, [tvm.convnext.CNBlockConfig(16, 32, 1),
                                                     tvm.convnext.CNBlockConfig(32, None, 1)], num_classes=10), 32, 4),
    ("tv_vit_mha", _tv_vit, 32, None),
    ("tv_swin", functools.partial(tvm.SwinTransformer, patch_size=[4, 4], embed_dim=16, depths=[1, 1],
                                  num_heads=[1, 2], window_size=[2, 2], num_classes=10), 32, 4),
    ("tv_densenet", functools.partial(tvm.DenseNet, growth_rate=8, block_config=(2, 2), num_init_features=16,
                                      num_classes=10), 32, None),
    ("tv_shufflenet_v2", functools.partial(tvm.shufflenet_v2_x0_5, num_classes=10), 32, 4),
    ("tv_squeezenet", functools.partial(tvm.squeezenet1_1, num_classes=10), 64, None),
    ("tv_googlenet", functools.partial(tvm.googlenet, aux_logits=False, init_weights=False, num_classes=10), 64, 4),
    ("tv_mnasnet", functools.partial(tvm.mnasnet0_5, num_classes=10), 32, None),
]


def _expected_names(model: nn.Module) -> list[str]:
    """Every convolution and linear weight, and every MHA input projection, by layer name."""
    names = []
    for mname, m in model.named_modules():
        if isinstance(m, (*CONV, nn.Linear, nn.Bilinear)):
            names.append(mname)
        elif isinstance(m, nn.MultiheadAttention):
            names.append(f"{mname}.in_proj_weight" if mname else "in_proj_weight")
    return names


def _is_normalization(m: nn.Module) -> bool:
    return isinstance(m, NORM) or ("norm" in type(m).__name__.lower() and not isinstance(m, (*CONV, nn.Linear)))


@pytest.mark.parametrize("builder, size, bits", [pytest.param(*a[1:], id=a[0]) for a in ARCHS])
def test_quantize_any_architecture(builder, size, bits):
    torch.manual_seed(0)
    model = builder().train()
    expected = _expected_names(model)
    names = quantize_(model, bits=bits)

    assert len(names) == len(set(names))
    assert sorted(names) == sorted(expected)
    assert [qw.name for qw in quantized_weights(model)] == names  # module order
    for mname, m in model.named_modules():
        if parametrize.is_parametrized(m):
            assert isinstance(m, (*CONV, nn.Linear, nn.MultiheadAttention)), mname
        if _is_normalization(m):
            assert not parametrize.is_parametrized(m), mname
    # float leftovers (position embeddings, tokens, bias tables) stay plain parameters
    for t in plan(model):
        if t.kind == "other":
            owner = model.get_submodule(t.module_name)
            assert isinstance(getattr(owner, t.param_name), nn.Parameter)
            assert not parametrize.is_parametrized(owner, t.param_name)

    out = model(torch.randn(2, 3, size, size))
    out = out[0] if isinstance(out, (tuple, list)) else out
    assert out.shape[0] == 2 and torch.isfinite(out).all()
    out.float().square().mean().backward()

    dz, bit = quantizer_parameters(model)
    assert len(dz) == len(names) and len(bit) == (len(names) if bits is None else 0)
    for p in dz + bit:
        assert p.grad is not None and torch.isfinite(p.grad)
    for qw in quantized_weights(model):
        assert qw.original.grad is not None, qw.name
        assert qw.quantizer.bits == bits


# --------------------------------------------------------------- plan, patterns


class _Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.Conv2d(8, 8, 1))
        self.ln = nn.LayerNorm(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.block(self.bn(self.stem(x)))
        return self.head(self.ln(x.mean((2, 3))))


def test_include_exclude_patterns():
    names = quantize_(_Small(), exclude=["stem", "head"])  # the first and last layer left in float
    assert names == ["block.0", "block.2"]
    assert quantize_(_Small(), include="block.*") == ["block.0", "block.2"]
    assert quantize_(_Small(), include=["block.*", "head"], exclude="*.2") == ["block.0", "head"]
    assert quantize_(_Small(), exclude="*") == []

    reasons = {t.name: t.reason for t in plan(_Small(), include=["block.*"], exclude=["block.2"])}
    assert reasons == {
        "stem": "not matched by include patterns",
        "block.0": None,
        "block.2": "excluded by pattern",
        "head": "not matched by include patterns",
    }  # no normalization layer is even listed


def test_torchvision_first_and_last_layer_patterns():
    model = tvm.resnet18(num_classes=10)
    names = quantize_(model, exclude=["conv1", "fc"])
    assert len(names) == 19 and "conv1" not in names and "fc" not in names and "layer1.0.conv1" in names
    assert quantize_(tvm.resnet18(num_classes=10), include="layer4.*") == [
        "layer4.0.conv1", "layer4.0.conv2", "layer4.0.downsample.0", "layer4.1.conv1", "layer4.1.conv2",
    ]


def test_normalization_layers_never_wrapped():
    from timm.layers import LayerNorm2d, RmsNorm

    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.GroupNorm(2, 4), LayerNorm2d(4), nn.InstanceNorm2d(4, affine=True),
        nn.Flatten(1), nn.Linear(4 * 5 * 5, 6), nn.LayerNorm(6), RmsNorm(6), nn.Linear(6, 2),
    )
    names = quantize_(model)
    assert names == ["0", "6", "9"]
    assert [t.name for t in plan(model)] == names  # norm weights are not even listed
    model(torch.randn(2, 3, 5, 5)).sum().backward()


def test_tied_weights_are_skipped_with_the_reason():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.body = nn.Linear(8, 8)
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 8)
            self.head = nn.Linear(8, 10, bias=False)
            self.head.weight = self.emb.weight  # language-model style tying
            self.b.weight = self.a.weight

        def forward(self, idx):
            return self.head(self.b(self.a(self.body(self.emb(idx)))))

    model = Tied()
    reasons = {t.name: t.reason for t in plan(model)}
    assert reasons["body"] is None
    # the other holders by layer name (a module's ``weight`` is named after the module)
    assert reasons["head"] == "shared (tied) with emb"
    assert reasons["a"] == "shared (tied) with b"
    assert reasons["b"] == "shared (tied) with a"
    assert quantize_(model) == ["body"]
    assert model.head.weight is model.emb.weight and model.a.weight is model.b.weight  # still tied
    model(torch.tensor([1, 2, 3])).sum().backward()


def test_a_weight_that_is_not_a_parameter_is_skipped():
    buffered = nn.Linear(4, 4)
    w = buffered.weight.detach().clone()
    del buffered.weight
    buffered.register_buffer("weight", w)
    plain = nn.Linear(4, 4)
    del plain.weight
    plain.weight = torch.ones(4, 4)  # a plain tensor attribute (as hooks computing weights do)
    model = nn.Sequential(buffered, plain, nn.Linear(4, 2))
    reasons = {t.name: t.reason for t in plan(model)}
    assert reasons["0"].startswith("not a plain Parameter")
    assert reasons["1"].startswith("not a plain Parameter")
    assert reasons["2"] is None
    assert quantize_(model) == ["2"]
    assert torch.equal(model[0].weight, w)
    model(torch.randn(3, 4))


def test_lazy_modules_are_skipped_until_initialised():
    model = nn.Sequential(nn.LazyLinear(3), nn.Linear(3, 2))
    reasons = {t.name: t.reason for t in plan(model)}
    assert reasons["0"].startswith("lazy module") and reasons["1"] is None
    assert quantize_(model) == ["1"]


def test_already_parametrized_weights_are_skipped():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    weight_norm(model[0])  # two originals (g and v): plan must not need ``.original``
    targets = plan(model)
    assert [(t.name, t.shape, t.reason) for t in targets] == [
        ("0", (3, 4), "already parametrized by something else (e.g. weight_norm)"),
        ("2", (2, 3), None),
    ]  # and weight_norm's own tensors (original0, original1) are not listed as "other"
    assert quantize_(model) == ["2"]
    assert [type(p) for p in model[0].parametrizations.weight] != [DeadZoneQuantizer]
    model(torch.randn(5, 4)).sum().backward()


def test_quantize_twice_wraps_nothing_new():
    model = _Small()
    first = quantize_(model, 4)
    targets = plan(model)
    # the quantized weights, listed once each; no ``parametrizations.*.original`` leftovers
    assert [t.name for t in targets] == first
    assert all(t.reason == "already quantized by codeq" for t in targets)
    assert quantize_(model, 4) == []
    assert len(list(quantized_weights(model))) == len(first)


def test_position_embeddings_and_tokens_stay_in_float():
    model = timm.create_model("test_vit", pretrained=False, img_size=64)
    quantize_(model, 4)
    other = {t.name: t for t in plan(model) if t.kind == "other"}
    assert set(other) == {"cls_token", "pos_embed"}
    assert all(t.reason == "not a convolution or linear weight (embedding, token or table)" for t in other.values())
    assert other["pos_embed"].shape == tuple(model.pos_embed.shape)
    assert not parametrize.is_parametrized(model)  # the root module's tensors are untouched

    vit = _tv_vit()
    names = quantize_(vit, 4)
    assert {t.name for t in plan(vit) if t.kind == "other"} == {"class_token", "encoder.pos_embedding"}
    assert "encoder.layers.encoder_layer_0.self_attention.in_proj_weight" in names
    assert "encoder.layers.encoder_layer_0.self_attention.out_proj" in names


# ------------------------------------------------------------ bake_, logits


@pytest.mark.parametrize("builder, bits", [(functools.partial(tvm.resnet18, num_classes=10), 4), (_tv_vit, None),
                                           (_timm("test_vit", img_size=32), 2)], ids=["resnet18", "tv_vit", "timm_vit"])
def test_bake_equals_the_wrapped_forward(builder, bits):
    torch.manual_seed(0)
    model = builder().eval()
    plain_keys = set(model.state_dict())
    names = quantize_(model, bits)
    g = torch.Generator().manual_seed(1)
    for qw in quantized_weights(model):  # varied dead zones (and bit-widths): real sparsity
        with torch.no_grad():
            qw.quantizer.theta_dz.fill_(float(torch.empty(()).uniform_(0.3, 3.0, generator=g)))
            if qw.quantizer.theta_bit is not None:
                qw.quantizer.theta_bit.fill_(float(torch.empty(()).uniform_(0.0, 3.0, generator=g)))
    codes = [(qw.module, qw.param_name, qw.quantizer.encode(qw.original)) for qw in quantized_weights(model)]
    assert sum(int((e.codes == 0).sum()) for _, _, e in codes) > 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        wrapped = model(x)

    # the plain state dict of ŵ loads strictly into a fresh copy, leaving the model wrapped
    fresh = builder().eval()
    fresh.load_state_dict(dequantized_state_dict(model), strict=True)
    assert len(list(quantized_weights(model))) == len(names)
    with torch.no_grad():
        assert torch.equal(fresh(x), wrapped)

    assert bake_(model) == names
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert not any(isinstance(m, DeadZoneQuantizer) for m in model.modules())
    assert quantizer_parameters(model) == ([], [])
    assert set(model.state_dict()) == plain_keys
    with torch.no_grad():
        assert torch.equal(model(x), wrapped)
    for module, pname, e in codes:  # every baked weight is its decoded codes
        assert torch.equal(getattr(module, pname), e.decode())


def test_quantizer_parameters_are_the_logits():
    model = _Small()
    quantize_(model, None, init_dz=2.5, init_bit=1.5)
    dz, bit = quantizer_parameters(model)
    qws = list(quantized_weights(model))
    assert [p is qw.quantizer.theta_dz for p, qw in zip(dz, qws)] == [True] * 4
    assert [p is qw.quantizer.theta_bit for p, qw in zip(bit, qws)] == [True] * 4
    assert all(isinstance(p, nn.Parameter) and p.requires_grad and p.dim() == 0 for p in dz + bit)
    assert [p.item() for p in dz] == [2.5] * 4 and [p.item() for p in bit] == [1.5] * 4
    in_model = {id(p) for p in model.parameters()}  # build the optimizer after wrapping
    assert all(id(p) in in_model for p in dz + bit)

    fixed = _Small()
    quantize_(fixed, 4)
    dz, bit = quantizer_parameters(fixed)
    assert len(dz) == 4 and bit == []


def test_a_module_used_twice_in_one_forward():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8)
            self.alias = self.lin  # the same module under a second name: not a tied weight
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.alias(torch.relu(self.lin(x))))

    torch.manual_seed(0)
    model = Twice()
    assert quantize_(model, 4) == ["lin", "head"]
    x = torch.randn(5, 8)
    model(x).square().sum().backward()

    # ∂ŵ/∂w = 1: the float weight's gradient is that of a plain model holding ŵ,
    # summed over both uses
    with torch.no_grad():
        w_lin = model.lin.weight.detach().clone().requires_grad_()
        w_head = model.head.weight.detach().clone().requires_grad_()
    h = torch.relu(x @ w_lin.T + model.lin.bias.detach())
    y = (h @ w_lin.T + model.lin.bias.detach()) @ w_head.T + model.head.bias.detach()
    y.square().sum().backward()
    assert_close(model.lin.parametrizations.weight.original.grad, w_lin.grad)
    assert_close(model.head.parametrizations.weight.original.grad, w_head.grad)
    assert model.lin.parametrizations.weight[0].theta_dz.grad is not None


class _Shared(nn.Module):
    """One convolution reached under two names, as timm's CoaT shares its position-encoding convs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.again = nn.Sequential(self.conv)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.again(self.conv(x)[:, :3]).mean((2, 3)))


def test_a_shared_module_is_mapped_under_every_name():
    torch.manual_seed(0)
    model = _Shared()
    quantize_(model, bits=4)
    assert [qw.name for qw in quantized_weights(model)] == ["conv", "fc"]  # listed once for the optimizer and BOPs
    sd = dequantized_state_dict(model)
    assert list(sd) == ["conv.weight", "conv.bias", "again.0.weight", "again.0.bias", "fc.weight", "fc.bias"]
    fresh = _Shared()
    fresh.load_state_dict(sd, strict=True)  # failed before: again.0.parametrizations.weight.original was unexpected
    assert torch.equal(sd["again.0.weight"], sd["conv.weight"])
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)

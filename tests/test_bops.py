"""MACs and BOPs (``docs/method.md``, "BOPs") against hand-computed numbers."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision import models as tvm

from codeq_cli.core.bops import A_BITS, LayerRow, bops_rows, bops_totals, make_row, measure_macs
from codeq_cli.core.insert import quantize_, quantized_weights


@pytest.mark.parametrize(
    "builder, macs, layers",
    [
        # the well-known figures: 1.81 / 4.09 GMACs and 0.30 GMACs (conv + linear only)
        (tvm.resnet18, 1_814_073_344, 21),
        (tvm.resnet50, 4_089_184_256, 54),
        (tvm.mobilenet_v2, 300_774_272, 53),
    ],
    ids=["resnet18", "resnet50", "mobilenet_v2"],
)
def test_torchvision_macs_at_224(builder, macs, layers):
    model = builder(weights=None)
    counted = measure_macs(model, (3, 224, 224))
    assert len(counted) == layers
    assert sum(counted.values()) == macs
    assert all(v > 0 for v in counted.values())


def test_resnet18_layer_macs_by_hand():
    counted = measure_macs(tvm.resnet18(weights=None), (3, 224, 224))
    # conv1: 3·64·7·7 weights per output position, 112×112 outputs
    assert counted["conv1"] == 3 * 64 * 7 * 7 * 112 * 112 == 118_013_952
    # layer1.0.conv1: 64·64·3·3 at 56×56
    assert counted["layer1.0.conv1"] == 64 * 64 * 9 * 56 * 56 == 115_605_504
    # a 1×1 strided downsample: 64·128 at 28×28
    assert counted["layer2.0.downsample.0"] == 64 * 128 * 28 * 28 == 6_422_528
    assert counted["fc"] == 512 * 1000


class Tiny(nn.Module):
    """One of each: strided, depthwise and grouped convolution, a transposed
    convolution, a Linear over tokens (3-D input), nn.MultiheadAttention and
    a Linear head on one vector."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)  # 3×16×16 → 8×8×8
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)  # depthwise, 8×8×8
        self.grouped = nn.Conv2d(8, 16, 1, groups=2)  # 16×8×8
        self.up = nn.ConvTranspose2d(16, 4, 2, stride=2)  # 16×8×8 → 4×16×16
        self.tok = nn.Linear(4, 6)  # 256 tokens of 4
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.head = nn.Linear(6, 10)

    def forward(self, x):
        x = self.up(self.grouped(self.dw(self.stem(x))))
        t = self.tok(x.flatten(2).transpose(1, 2))  # (1, 256, 6)
        t, _ = self.attn(t, t, t)
        return self.head(t.mean(1))


# MACs by hand (batch 1, input 3×16×16)
TINY_MACS = {
    "stem": 3 * 8 * 3 * 3 * 8 * 8,  # (c_in/groups)·c_out·k_h·k_w·m_h·m_w = 13824
    "dw": 1 * 8 * 3 * 3 * 8 * 8,  # c_in/groups = 1: 4608
    "grouped": 4 * 16 * 1 * 1 * 8 * 8,  # c_in/groups = 4: 4096
    # transposed: every input element (16·8·8) meets (c_out/groups)·k_h·k_w = 4·2·2 weights;
    # equally, each of the 4·16·16 outputs sums over 16 channels × 1 tap (stride = kernel)
    "up": 16 * 8 * 8 * 4 * 2 * 2,  # 16384
    "tok": 256 * 4 * 6,  # tokens · in · out = 6144
    "attn.in_proj_weight": 3 * 256 * 6 * 6,  # q, k and v projections: 27648
    "attn.out_proj": 256 * 6 * 6,  # once (MHA calls F.linear, not the module): 9216
    "head": 1 * 6 * 10,  # one pooled vector: 60
}


def test_tiny_model_macs_by_hand():
    assert TINY_MACS == {"stem": 13824, "dw": 4608, "grouped": 4096, "up": 16384, "tok": 6144,
                         "attn.in_proj_weight": 27648, "attn.out_proj": 9216, "head": 60}
    model = Tiny().train()
    assert measure_macs(model, (3, 16, 16)) == TINY_MACS
    assert model.training  # restored
    quantize_(model, 4)  # the same figures through the parametrizations
    assert measure_macs(model, (3, 16, 16)) == TINY_MACS


def test_a_layer_called_twice_accumulates_and_an_unused_one_is_zero():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8)
            self.unused = nn.Linear(8, 8)

        def forward(self, x):
            return self.lin(torch.relu(self.lin(x)))

    # 5 tokens · 8 · 8, twice
    assert measure_macs(Twice(), (5, 8)) == {"lin": 2 * 5 * 8 * 8, "unused": 0}


def test_mha_with_separate_key_and_value_sizes():
    class Cross(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(6, 2, kdim=4, vdim=5)  # (L, N, E) layout

        def forward(self, x):
            q = x[:, :3].permute(1, 0, 2)  # 3 queries of 6
            k = torch.zeros(7, 1, 4)  # 7 keys of 4
            v = torch.zeros(7, 1, 5)  # 7 values of 5
            return self.attn(q, key=k, value=v)[0]

    macs = measure_macs(Cross(), (3, 6))
    assert macs == {
        "attn.q_proj_weight": 3 * 6 * 6,  # 108
        "attn.k_proj_weight": 7 * 4 * 6,  # 168
        "attn.v_proj_weight": 7 * 5 * 6,  # 210
        "attn.out_proj": 3 * 6 * 6,  # 108
    }


def _fill(p: torch.Tensor, zeros: int, seed: int) -> None:
    """Magnitudes in [0.5, 1.5] (far outside the initial dead zone), ``zeros`` of them set to 0."""
    g = torch.Generator().manual_seed(seed)
    v = (0.5 + torch.rand(p.numel(), generator=g)) * torch.where(torch.rand(p.numel(), generator=g) < 0.5, -1.0, 1.0)
    v[torch.randperm(p.numel(), generator=g)[:zeros]] = 0.0
    with torch.no_grad():
        p.copy_(v.view_as(p))


def test_bops_rows_and_totals_by_hand():
    torch.manual_seed(0)
    model = Tiny()
    zeros = {"stem": 54, "dw": 36, "grouped": 48, "up": 0, "tok": 12, "attn.in_proj_weight": 27,
             "attn.out_proj": 9, "head": 0}
    weights = {"stem": model.stem.weight, "dw": model.dw.weight, "grouped": model.grouped.weight,
               "up": model.up.weight, "tok": model.tok.weight, "attn.in_proj_weight": model.attn.in_proj_weight,
               "attn.out_proj": model.attn.out_proj.weight, "head": model.head.weight}
    for i, (name, p) in enumerate(weights.items()):
        _fill(p, zeros[name], seed=i)
    macs = measure_macs(model, (3, 16, 16))

    names = quantize_(model, None, exclude="head")  # mixed precision; the head stays in float
    assert "head" not in names and len(names) == 7
    qz = {qw.name: qw.quantizer for qw in quantized_weights(model)}
    with torch.no_grad():
        qz["stem"].theta_bit.fill_(0.0)  # round(tanh 0 · 6 + 2) = 2 bits
        qz["tok"].theta_bit.fill_(0.5)  # round(0.4621 · 6 + 2) = 5 bits; the rest start at 8

    rows = bops_rows(model, macs)
    # BOPs = density · MACs · w_bits · 32;  a float layer: MACs · 32 · 32
    expected = [
        # name, kind, shape, params, MACs, bits, sparsity, BOPs
        ("stem", "conv2d", [8, 3, 3, 3], 216, 13824, 2, 54 / 216, 0.75 * 13824 * 2 * 32),  # 663552
        ("dw", "conv2d", [8, 1, 3, 3], 72, 4608, 8, 36 / 72, 0.5 * 4608 * 8 * 32),  # 589824
        ("grouped", "conv2d", [16, 4, 1, 1], 64, 4096, 8, 48 / 64, 0.25 * 4096 * 8 * 32),  # 262144
        ("up", "convtranspose2d", [16, 4, 2, 2], 256, 16384, 8, 0.0, 1.0 * 16384 * 8 * 32),  # 4194304
        ("tok", "linear", [6, 4], 24, 6144, 5, 12 / 24, 0.5 * 6144 * 5 * 32),  # 491520
        ("attn.in_proj_weight", "mha", [18, 6], 108, 27648, 8, 27 / 108, 0.75 * 27648 * 8 * 32),  # 5308416
        ("attn.out_proj", "linear", [6, 6], 36, 9216, 8, 9 / 36, 0.75 * 9216 * 8 * 32),  # 1769472
        ("head", "linear", [10, 6], 60, 60, 32, 0.0, 60 * 32 * 32),  # 61440, float
    ]
    assert [r.name for r in rows] == [e[0] for e in expected]
    for r, (name, kind, shape, params, m, bits, sparsity, bops) in zip(rows, expected):
        assert (r.kind, r.shape, r.params, r.macs, r.bits) == (kind, shape, params, m, bits), name
        assert r.sparsity == pytest.approx(sparsity, abs=1e-12), name
        assert r.bops == pytest.approx(bops, rel=1e-12), name
        assert r.quantized == (name != "head")
    assert isinstance(rows[0], LayerRow) and rows[0].to_dict()["bits"] == 2

    totals = bops_totals(rows)
    bops = 663552 + 589824 + 262144 + 4194304 + 491520 + 5308416 + 1769472 + 61440  # 13,340,672
    dense = 81980 * 32 * 32  # Σ MACs = 81,980
    assert totals["layers"] == 8 and totals["quantized_layers"] == 7
    assert totals["params"] == 836 and totals["quantized_params"] == 776
    assert totals["macs"] == 81980
    assert totals["bops"] == pytest.approx(bops)
    assert totals["rel_bops"] == pytest.approx(100 * bops / dense)
    assert totals["rel_bops"] == pytest.approx(15.89168, abs=1e-5)  # 1,334,067,200 / 83,947,520 %
    # parameter-weighted: 186 zero codes of 836 weights (the float head counts dense)
    assert totals["sparsity"] == pytest.approx(186 / 836)
    # (216·2 + 72·8 + 64·8 + 256·8 + 24·5 + 108·8 + 36·8 + 60·32) / 836 = 6760 / 836
    assert totals["avg_bits"] == pytest.approx(6760 / 836)
    # plain means over the 7 quantized layers
    assert totals["mean_layer_sparsity"] == pytest.approx((0.25 + 0.5 + 0.75 + 0 + 0.5 + 0.25 + 0.25) / 7)
    assert totals["mean_layer_bits"] == pytest.approx((2 + 8 + 8 + 8 + 5 + 8 + 8) / 7)


def test_make_row_and_an_all_float_model():
    # 4 bits, 30 of 40 codes non-zero, 1000 MACs: 0.75 · 1000 · 4 · 32 = 96000
    r = make_row("fc", "linear", (4, 10), 1000, bits=4, nonzero=30)
    assert (r.params, r.bits, r.sparsity, r.bops, r.quantized) == (40, 4, 0.25, 96000.0, True)
    f = make_row("fc", "linear", (4, 10), 1000)
    assert (f.bits, f.sparsity, f.bops, f.quantized) == (32, 0.0, 1000 * 32 * A_BITS, False)
    model = Tiny()
    rows = bops_rows(model, measure_macs(model, (3, 16, 16)))
    totals = bops_totals(rows)
    assert totals["rel_bops"] == 100.0 and totals["avg_bits"] == 32 and totals["quantized_layers"] == 0
    assert bops_totals([])["rel_bops"] == 0.0

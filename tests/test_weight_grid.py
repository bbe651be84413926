"""Training on the int8 export's grid (``weight_grid``, docs/method.md "Training on the export's grid").

``grid_shift`` by hand; the quantizer with a grid: its forward is the decoded encoding bit for bit, its
codes and every gradient are the plain quantizer's, its levels move by at most half a step; and a
checkpoint trained on the grid exports to int8 weights without rounding, where the plain one rounds.
"""

from __future__ import annotations

import pytest
import torch

from codeq_cli.core.insert import encode_all, quantize_, quantized_weights
from codeq_cli.core.quantizer import DeadZoneQuantizer, grid_shift
from codeq_cli.formats import onnx_int8
from test_quantizer import path  # noqa: F401  (the numba / eager fixture)


def _shift(step: float, shift: float, qmax: int, limit: int = 63) -> float:
    return float(grid_shift(torch.tensor(step), torch.tensor(shift), float(qmax), limit))


@pytest.mark.parametrize(("step", "shift", "qmax", "want"), [
    # 6 bits (Q = 31): m = 1 fits (31 + 9 ≤ 63), m = 2 does not (62 + 19): δ = 9.3 → 9
    (1.0, 9.3, 31, 9.0),
    # δ = 0.3: m = 1 gives 0 (error 0.3), m = 2 gives 1/2 (codes 2k + 1 ≤ 63, error 0.2)
    (1.0, 0.3, 31, 0.5),
    # no dead zone (d = 0): δ = −s/2 is exact on m = 2 (codes 2k − 1)
    (0.5, -0.25, 31, -0.25),
    # 4 bits (Q = 7), δ = 0.3: m = 1..8 fit (7m + round(0.3m) ≤ 63); errors 0.3, 0.2, 0.033, 0.05, 0.1,
    # 0.033, 0.014, 0.05: m = 7, δ' = 2/7
    (1.0, 0.3, 7, 2.0 / 7.0),
    # a dead zone too wide for the spacing (31 + 40 > 63): δ is kept, the export rounds the levels
    (1.0, 40.0, 31, 40.0),
    # full range (codes ≤ 127): 6 bits, δ = 0.3 → m = 3 (93 + 1 ≤ 127), δ' = 1/3
    (1.0, 0.3, 31, 1.0 / 3.0),
])
def test_grid_shift_by_hand(step, shift, qmax, want):
    limit = 127 if want == pytest.approx(1.0 / 3.0) else 63
    assert _shift(step, shift, qmax, limit) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize(("step", "shift", "qmax"), [(0.013, 0.0371, 31), (0.002, -0.0009, 31), (0.05, 0.017, 7),
                                                     (0.01, 0.2037, 15), (0.3, 0.11, 3)])
def test_the_export_finds_a_grid_shift_without_rounding(step, shift, qmax):
    snapped = _shift(step, shift, qmax)
    assert abs(snapped - shift) <= step / 2
    s32 = float(torch.tensor(step))
    _, err = onnx_int8.int8_grid(s32, snapped, qmax, 63)
    assert err <= 1e-6 * s32
    _, before = onnx_int8.int8_grid(s32, float(torch.tensor(shift)), qmax, 63)
    assert before > 1e-3 * s32  # the plain offset would have been rounded


@pytest.mark.parametrize(("bits", "init_dz"), [(6, 3.0), (6, 1.0), (4, 0.5), (None, 0.8), (None, 0.2)])
def test_the_forward_on_the_grid_is_the_decoded_file_and_keeps_codes_and_gradients(path, bits, init_dz):  # noqa: F811
    torch.manual_seed(0)
    w = torch.randn(32, 16, 3, 3)
    on = DeadZoneQuantizer(bits, b_max=6, init_dz=init_dz, init_bit=0.4, grid=63)
    off = DeadZoneQuantizer(bits, b_max=6, init_dz=init_dz, init_bit=0.4)
    w_on, w_off = w.clone().requires_grad_(), w.clone().requires_grad_()
    y_on, y_off = on(w_on), off(w_off)
    g = torch.randn_like(w)
    (y_on * g).sum().backward()
    (y_off * g).sum().backward()

    enc, plain = on.encode(w), off.encode(w)
    assert torch.equal(y_on.detach(), enc.decode())  # the checkpoint holds what was trained
    assert torch.equal(enc.codes, plain.codes) and enc.step == plain.step  # the dead zone is the method's
    assert torch.equal(w_on.grad, w_off.grad)
    assert torch.equal(on.theta_dz.grad, off.theta_dz.grad)
    if bits is None:
        assert torch.equal(on.theta_bit.grad, off.theta_bit.grad)
    assert (y_on - y_off).abs().max() <= enc.step / 2 + 1e-7
    assert on.stats(w)["shift"] == enc.shift
    qmax = 2 ** (enc.bits - 1) - 1
    if qmax + plain.shift / plain.step + 0.5 <= 63:  # the levels fit 7-bit codes at their spacing
        assert onnx_int8.int8_grid(enc.step, enc.shift, qmax, 63)[1] <= 1e-6 * enc.step
    else:
        assert enc.shift == plain.shift


def test_the_quantizer_refuses_a_grid_its_codes_do_not_fit():
    with pytest.raises(ValueError, match="grid=63"):
        DeadZoneQuantizer(None, b_max=8, grid=63)
    with pytest.raises(ValueError, match="grid=31.5"):
        DeadZoneQuantizer(4, grid=31.5)
    assert "grid=127" in repr(DeadZoneQuantizer(None, b_max=7, grid=127))


def test_a_model_trained_on_the_grid_exports_without_rounding(path, tmp_path):  # noqa: F811
    """``encode_all`` (one pass off the numba path), the checkpoint and the QDQ model: int8 weights = the levels."""
    from codeq_cli.core.act_quant import ActSpec, calibrate_
    from codeq_cli.core.bops import measure_macs
    from codeq_cli.formats import checkpoint
    from codeq_cli.models.factory import DataConfig, ModelSpec, create

    spec = ModelSpec("timm", "test_resnet", num_classes=4)
    found = {}
    for grid in (None, 63):
        torch.manual_seed(0)
        model = create(spec)
        macs = measure_macs(model, (3, 32, 32))
        quantize_(model, bits=None, b_max=6, init_dz=0.8, init_bit=0.4, grid=grid, activations=ActSpec(bits=8))
        for i, qw in enumerate(quantized_weights(model)):  # bits from 3 to 6 over the layers
            qw.quantizer.theta_bit.data.fill_(0.25 + 0.15 * (i % 5))
        calibrate_(model.eval(), [torch.randn(4, 3, 32, 32)])
        encs = encode_all(model)
        for qw in quantized_weights(model):
            assert torch.equal(encs[qw.name].decode(), qw.module.weight.detach())  # the forward's weight
        file = tmp_path / f"{grid}.codeq"
        checkpoint.save(file, model, spec=spec, data_config=DataConfig(input_size=(3, 32, 32)), class_names=None,
                        recipe={}, provenance={}, metrics={}, macs=macs)
        ck = checkpoint.load(file)
        for name, layer in ck.layers.items():
            assert torch.equal(layer.decode(), encs[name].decode())
        _, info = onnx_int8.build_qdq_model(ck)
        found[grid] = info, len(encs), {e.bits for e in encs.values()}
    info, layers, bits = found[63]
    assert len(bits) >= 3 and info.int8_layers == layers
    assert info.exact_layers == layers and info.max_weight_error < 1e-6
    plain, _, _ = found[None]
    assert plain.exact_layers < layers and plain.max_weight_error > 1e-4  # the plain levels are rounded

"""Activation quantizers (codeq's extension, docs/method.md): values and gradients by hand,
calibration, BOPs with activation bits, the recipe keys, the optimizer groups, and the
checkpoint round trip to a decoded model with the same logits."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from codeq_cli.core import act_quant
from codeq_cli.core.act_quant import ActQuantizer, ActSpec, calibrate_, qrange
from codeq_cli.core.bops import A_BITS, bops_rows, bops_totals, make_row, measure_macs
from codeq_cli.core.insert import plain_state, quantize_
from codeq_cli.errors import RecipeError
from codeq_cli.formats import checkpoint
from codeq_cli.models.factory import DataConfig, ModelSpec, create
from conftest import weights_only_checkpoint
from codeq_cli.train.loop import build_optimizer
from codeq_cli.train.recipe import apply_overrides, load_recipe, quantizer_kwargs


def _ready(bits, signed: bool, step: float, **kw) -> ActQuantizer:
    qz = ActQuantizer(bits, **kw)
    with torch.no_grad():
        qz.step.fill_(step)
        qz.signed.fill_(signed)
        qz.calibrated.fill_(True)
    return qz


# -- the quantizer, by hand ----------------------------------------------------------------------
def test_signed_4bit_values_and_lsq_gradients_by_hand():
    qz = _ready(4, True, 0.5)  # Q_n = -8, Q_p = 7
    x = torch.tensor([[-5.0, -1.2, 0.26, 0.74, 3.3, 4.0]], requires_grad=True)
    y = qz(x)
    # x/s = -10, -2.4, 0.52, 1.48, 6.6, 8 -> codes -8 (clipped), -2, 1, 1, 7, 7 (clipped)
    assert y.detach().tolist() == [[-4.0, -1.0, 0.5, 0.5, 3.5, 3.5]]
    up = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    y.backward(up)
    # straight-through inside [Q_n, Q_p], zero outside
    assert x.grad.tolist() == [[0.0, 2.0, 3.0, 4.0, 5.0, 0.0]]
    # ∂x̂/∂s: Q_n below, round(v) - v inside, Q_p above; times g = 1/sqrt(N·Q_p), N = 6 per sample
    raw = -8 * 1 + 0.4 * 2 + 0.48 * 3 + (-0.48) * 4 + 0.4 * 5 + 7 * 6
    assert qz.step.grad.item() == pytest.approx(raw / math.sqrt(6 * 7), rel=1e-5)


def test_unsigned_2bit_clips_negatives_to_zero():
    qz = _ready(2, False, 1.0)  # Q_n = 0, Q_p = 3
    x = torch.tensor([[-1.0, 0.4, 2.6, 5.0]], requires_grad=True)
    y = qz(x)
    assert y.detach().tolist() == [[0.0, 0.0, 3.0, 3.0]]
    y.sum().backward()
    assert x.grad.tolist() == [[0.0, 1.0, 1.0, 0.0]]
    # 0 (below: Q_n = 0) + (0 - 0.4) + (3 - 2.6) + 3 (above), scaled by 1/sqrt(4·3)
    assert qz.step.grad.item() == pytest.approx(3.0 / math.sqrt(12), rel=1e-5)


def test_ranges():
    assert qrange(8, False) == (0, 255) and qrange(8, True) == (-128, 127) and qrange(4, True) == (-8, 7)


def test_learned_width_step_and_bit_logit_gradient_by_hand():
    theta = math.atanh(0.5)  # b = round(0.5·(8 - 4) + 4) = 6
    qz = _ready(None, False, 0.1, b_min=4, b_max=8, init_bit=theta)
    assert int(qz.bit_width()) == 6
    s = 0.1 * 255 / 63  # the step at b_max, rescaled to Q_p(6) = 63
    assert qz.scale().item() == pytest.approx(s, rel=1e-6)
    x = torch.tensor([[0.3, 1.0, 30.0]])  # 30/s = 74 > 63: clipped
    y = qz(x)
    codes = [round(0.3 / s), round(1.0 / s), 63]
    torch.testing.assert_close(y, torch.tensor([[c * s for c in codes]]), rtol=1e-6, atol=0)
    y.sum().backward()
    g_s = (codes[0] - 0.3 / s) + (codes[1] - 1.0 / s) + 63  # ∂L/∂s, unscaled
    # s = step·255/Q_p, Q_p = 2^b - 1, b = tanh|θ|·4 + 4 (straight-through round)
    expected = g_s * (-s / 63) * (2**6 * math.log(2)) * 4 * (1 - 0.5**2)
    assert qz.theta_bit.grad.item() == pytest.approx(expected, rel=1e-4)


def test_uncalibrated_quantizer_is_transparent():
    qz = ActQuantizer(8)
    x = torch.randn(2, 5)
    assert torch.equal(qz(x), x)


def test_calibration_sets_sign_and_step_from_the_first_batches():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    quantize_(model, bits=4, activations=ActSpec(bits=8))
    batches = [torch.randn(16, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    first, second = model[0].act_quant, model[2].act_quant
    assert calibrate_(model, batches) == 3
    assert bool(first.signed) and not bool(second.signed)  # the ReLU output is never negative
    expected = sum(torch.quantile(b.abs().reshape(-1), 0.999, interpolation="higher").item() for b in batches) / 3 / 127
    assert first.step.item() == pytest.approx(expected, rel=1e-6)
    # calibration runs once: a second call changes nothing
    before = first.step.item()
    assert calibrate_(model, [torch.randn(4, 4) * 100]) == 0 and first.step.item() == before


def test_eligible_layers_skip_attention_and_excluded():
    mha = nn.MultiheadAttention(8, 2)
    model = nn.Sequential(nn.Linear(8, 8), mha, nn.Conv1d(8, 8, 1))
    names = act_quant.eligible(model, ["0", "1.in_proj_weight", "1.out_proj", "2"], exclude=("2",))
    assert names == ["0"]


# -- BOPs ------------------------------------------------------------------------------------------
def test_bops_count_activation_bits_by_hand():
    # 8x4 conv over a 5x5 output, 1x1 kernel: MACs = 4 · 8 · 25 = 800; 4-bit weights, 3 of 32 weights zero
    row = make_row("c", "conv2d", (8, 4, 1, 1), 800, bits=4, nonzero=29, act_bits=6)
    assert row.bops == pytest.approx(29 / 32 * 800 * 4 * 6)
    assert row.act_bits == 6 and row.to_dict()["act_bits"] == 6
    float_act = make_row("c", "conv2d", (8, 4, 1, 1), 800, bits=4, nonzero=29)
    assert float_act.bops == 29 / 32 * 800 * 4 * A_BITS and "act_bits" not in float_act.to_dict()
    t = bops_totals([row, make_row("fc", "linear", (2, 10), 20)])
    assert t["rel_bops"] == pytest.approx(100 * (29 / 32 * 800 * 4 * 6 + 20 * 32 * 32) / (820 * 32 * 32))


def test_live_model_rows_use_each_layers_activation_bits():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    macs = measure_macs(model, (3, 8, 8))
    quantize_(model, bits=4, activations=ActSpec(bits=6, exclude=("3",)))
    calibrate_(model, [torch.randn(2, 3, 8, 8)])
    rows = {r.name: r for r in bops_rows(model, macs)}
    conv, fc = rows["0"], rows["3"]
    assert (conv.act_bits, fc.act_bits) == (6, 32)
    assert conv.bops == pytest.approx((1 - conv.sparsity) * macs["0"] * 4 * 6)
    assert fc.bops == pytest.approx((1 - fc.sparsity) * macs["3"] * 4 * 32)


def test_float_activations_leave_every_figure_as_before():
    torch.manual_seed(0)
    a = create(ModelSpec("timm", "test_resnet", num_classes=4))
    b = create(ModelSpec("timm", "test_resnet", num_classes=4))
    b.load_state_dict(a.state_dict())
    macs = measure_macs(a, (3, 32, 32))
    quantize_(a, bits=None, init_dz=0.8)
    quantize_(b, bits=None, init_dz=0.8, activations=None)
    ra, rb = bops_rows(a, macs), bops_rows(b, macs)
    assert [r.to_dict() for r in ra] == [r.to_dict() for r in rb]
    for r in ra:
        assert "act_bits" not in r.to_dict() and r.act_bits == 32
        if r.quantized:
            assert r.bops == pytest.approx((1 - r.sparsity) * r.macs * r.bits * 32, rel=1e-12)
    assert list(a.state_dict()) == list(b.state_dict())
    assert not any(act_quant.act_quantizers(a))


# -- recipe and optimizer ---------------------------------------------------------------------------
def test_recipe_keys_and_their_refusals():
    r = load_recipe("mixed")
    assert r.act_bits is None and "activations" not in quantizer_kwargs(r)
    learned = apply_overrides(r, ["act_bits=learned", "act_b_min=5", "act_exclude=[conv1*]"])
    spec = quantizer_kwargs(learned)["activations"]
    assert (spec.bits, spec.b_min, spec.b_max, spec.exclude) == (None, 5, 8, ("conv1*",))
    assert quantizer_kwargs(apply_overrides(r, ["act_bits=8"]))["activations"].bits == 8
    for pair, shown in (("act_bits=16", "act_bits=16"), ("act_bits=auto", "act_bits='auto'"), ("act_b_min=9", "act_b_min=9")):
        with pytest.raises(RecipeError) as exc:
            apply_overrides(r, [pair])
        assert shown in exc.value.message and "\n" not in exc.value.message
    with pytest.raises(RecipeError, match="act_b_min=8 is above act_b_max=6"):
        apply_overrides(r, ["act_b_min=8", "act_b_max=6"])


def test_optimizer_groups():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    r = load_recipe("mixed")
    quantize_(model, **quantizer_kwargs(r))
    assert [g["name"] for g in build_optimizer(model, r).param_groups] == ["weights", "dead_zone", "bits"]
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    r = apply_overrides(r, ["act_bits=learned", "lr_act=0.002"])
    quantize_(model, **quantizer_kwargs(r))
    groups = {g["name"]: g for g in build_optimizer(model, r).param_groups}
    assert list(groups) == ["weights", "dead_zone", "bits", "act_steps", "act_bits"]
    assert len(groups["act_steps"]["params"]) == 2 and groups["act_steps"]["lr"] == 0.002
    assert all(id(p) not in {id(q) for q in groups["weights"]["params"]} for p in groups["act_steps"]["params"])


def test_state_dict_carries_calibration_for_resume_and_plain_state_leaves_it_out():
    def build():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        quantize_(m, bits=4, activations=ActSpec(bits=None))
        return m

    a, b = build(), build()
    calibrate_(a, [torch.randn(8, 4)])
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 4)
    assert torch.equal(a(x), b(x)) and bool(b[2].act_quant.calibrated)
    assert not any("act_quant" in k for k, _ in plain_state(a))


# -- checkpoint round trip ---------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, None], ids=["fixed8", "learned"])
def test_checkpoint_round_trip_reproduces_the_fake_quantized_logits(tmp_path, bits):
    spec = ModelSpec("timm", "test_resnet", num_classes=4)
    torch.manual_seed(0)
    model = create(spec)
    macs = measure_macs(model, (3, 32, 32))
    quantize_(model, bits=None, init_dz=0.8, init_bit=0.3, activations=ActSpec(bits=bits))
    x = torch.randn(4, 3, 32, 32)
    calibrate_(model, [x])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        loss = model(x).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        expected = model(x)
    path = tmp_path / "m.codeq"
    checkpoint.save(path, model, spec=spec, data_config=DataConfig(input_size=(3, 32, 32)), class_names=None,
                    recipe={}, provenance={}, metrics={}, macs=macs)
    ckpt = checkpoint.load(path)
    acts = {e["name"]: e for e in ckpt.activations}
    live = dict(act_quant.act_quantizers(model))
    assert set(acts) == set(live) and len(acts) > 5
    for name, qz in live.items():
        where = {} if qz.at == "input" else {"at": qz.at}
        feeds = {} if tuple(qz.feeds) == ((name,) if qz.at == "input" else ()) else {"feeds": list(qz.feeds)}
        assert acts[name] == {"name": name, **qz.frozen(), **where, **feeds}
    assert acts["conv1.0"]["signed"] and not acts["conv1.3"]["signed"]  # the image; after the stem's ReLU
    rows = {r.name: r for r in ckpt.rows}
    feeds = {layer: e["bits"] for e in ckpt.activations
             for layer in e.get("feeds", [e["name"]] if e.get("at", "input") == "input" else [])}
    assert all(rows[n].act_bits == b for n, b in feeds.items()) and len(feeds) == len(ckpt.layers)
    assert any(e.get("at") == "output" for e in ckpt.activations)  # the residual adds' quantizers
    decoded = ckpt.build_model()
    with torch.no_grad():
        got = decoded(x)
    assert (got - expected).abs().max().item() <= 1e-5


def test_crafted_activation_metadata_is_refused(tmp_path):
    from codeq_cli.formats._checkpoint_meta import ActivationMeta

    with pytest.raises(ValueError):
        ActivationMeta.model_validate({"name": "fc", "bits": 12, "signed": False, "step": 0.1})
    with pytest.raises(ValueError):
        ActivationMeta.model_validate({"name": "fc", "bits": 8, "signed": False, "step": -1.0})


def test_float_activation_checkpoints_carry_no_new_keys(tmp_path):
    import json
    import struct

    spec = ModelSpec("timm", "test_resnet", num_classes=4)
    torch.manual_seed(0)
    model = create(spec)
    macs = measure_macs(model, (3, 32, 32))
    quantize_(model, bits=None, init_dz=0.8)
    path = tmp_path / "m.codeq"
    checkpoint.save(path, model, spec=spec, data_config=DataConfig(input_size=(3, 32, 32)), class_names=None,
                    recipe={}, provenance={}, metrics={}, macs=macs)
    data = path.read_bytes()
    meta_len = struct.unpack_from("<I", data, 12)[0]
    import zlib

    meta = json.loads(zlib.decompress(data[checkpoint.HEADER_BYTES : checkpoint.HEADER_BYTES + meta_len]))  # format 2
    assert "activations" not in meta and all("act_bits" not in r for r in meta["rows"])
    assert checkpoint.load(path).activations == []


def test_activation_entry_for_a_missing_layer_is_a_checkpoint_error(tmp_path):
    from codeq_cli.errors import CheckpointError

    ckpt = checkpoint.load(weights_only_checkpoint(tmp_path))
    ckpt.activations = [{"name": "no.such.layer", "bits": 8, "signed": False, "step": 0.5}]
    with pytest.raises(CheckpointError, match="does not fit"):
        ckpt.build_model()
    ckpt.activations = [{"name": "fc", "bits": 8, "signed": False, "step": 0.5}] * 2
    with pytest.raises(CheckpointError, match="does not fit"):
        ckpt.build_model()


# -- end to end ------------------------------------------------------------------------------------
def test_compress_with_act_bits_eval_and_resume_agree(tmp_path, capsys):
    """compress --set act_bits=learned: calibrated quantizers, a decoded model whose top-1 `codeq eval`
    reproduces, BOPs at the activation bits in the report, and a resume that restores the steps."""
    import json

    from conftest import TINY, make_image_folder, run_cli

    data = make_image_folder(tmp_path / "data", per_class=6, val_per_class=2, size=36)
    out = tmp_path / "m.pt"
    args = ["compress", *TINY, "--data", str(data), "--out", str(out), "--batch-size", "6", "--skip-baseline", "--keep-state",
            "--set", "act_bits=learned", "--set", "act_exclude=[conv1.0]", "--json"]
    code, stdout, err = run_cli([*args, "--max-steps", "2"], capsys)
    assert code == 0, err
    result = json.loads(stdout)
    ckpt = checkpoint.load(out)
    names = {layer for e in ckpt.activations
             for layer in e.get("feeds", [e["name"]] if e.get("at", "input") == "input" else [])}
    assert names and "conv1.0" not in names and all(4 <= e["bits"] <= 8 for e in ckpt.activations)
    code, stdout, err = run_cli(["eval", str(out), "--workers", "0", "--json"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["top1"] == pytest.approx(result["metrics"]["top1"])
    code, stdout, err = run_cli(["report", str(out), "--json"], capsys)
    rows = {layer["name"]: layer for layer in json.loads(stdout)["layers"]}
    assert rows["conv1.0"]["act_bits"] == 32 and all(rows[n]["act_bits"] < 32 for n in names)
    state = torch.load(tmp_path / "m.run" / "state.pt", weights_only=True)["model"]
    steps = {k: v for k, v in state.items() if k.endswith("act_quant.step")}
    assert steps and all(v.item() > 0 for v in steps.values())
    # resume for two more steps (the quantizers load from the run state: calibration runs only on fresh runs)
    code, _, err = run_cli([*args, "--max-steps", "4", "--resume", "--force"], capsys)
    assert code == 0, err
    assert checkpoint.load(out).meta["provenance"]["steps"] == 4

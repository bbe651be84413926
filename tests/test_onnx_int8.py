"""The int8 QDQ ONNX export: the grid mapping of the dead-zone levels by hand, and the round trip
through ONNX Runtime on a small model against the decoded model it came from."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from codeq_cli.core.act_quant import ActSpec, calibrate_
from codeq_cli.core.bops import measure_macs
from codeq_cli.core.insert import quantize_
from codeq_cli.errors import CodeqError, UsageError
from codeq_cli.formats import checkpoint, onnx_int8
from codeq_cli.models.factory import DataConfig, ModelSpec, create
from conftest import weights_only_checkpoint

HAS_ORT = importlib.util.find_spec("onnx") is not None and importlib.util.find_spec("onnxruntime") is not None
needs_ort = pytest.mark.skipif(not HAS_ORT, reason="pip install 'codeq[onnx]' (onnx, onnxruntime)")


def test_int8_grid_is_exact_when_the_shift_is_a_multiple_of_a_substep():
    # 4-bit levels ±(0.1·k + 0.05), k = 1..7: σ = 0.05 holds them all (codes 3, 5, ..., 15)
    sigma, err = onnx_int8.int8_grid(0.1, 0.05, 7)
    assert err < 1e-12 and 0.1 / sigma == pytest.approx(round(0.1 / sigma))
    assert sigma == pytest.approx(0.05)
    # δ = s/3: the first exact grid is s/3 (levels 3k + 1), coarser ones round δ
    sigma, err = onnx_int8.int8_grid(0.3, 0.1, 7)
    assert sigma == pytest.approx(0.1) and err < 1e-12


def test_int8_grid_error_bound_for_8_bit_weights():
    # 8-bit levels fill ±127 steps already: only the max|ŵ|/127 grid fits, error ≤ σ/2
    s, d = 0.01, 0.013
    sigma, err = onnx_int8.int8_grid(s, d, 127)
    levels = s * np.arange(1, 128) + d
    assert sigma == pytest.approx(levels[-1] / 127)
    assert 0 < err <= sigma / 2 + 1e-15
    assert err == pytest.approx(np.abs(np.rint(levels / sigma) * sigma - levels).max())


@pytest.fixture(scope="module", params=[8, None], ids=["act8", "learned"])
def ckpt(request, tmp_path_factory):
    spec = ModelSpec("timm", "test_resnet", num_classes=4)
    torch.manual_seed(0)
    model = create(spec)
    macs = measure_macs(model, (3, 32, 32))
    quantize_(model, bits=None, init_dz=0.8, init_bit=0.3, activations=ActSpec(bits=request.param))
    x = torch.randn(8, 3, 32, 32)
    model.train()
    for _ in range(2):
        model(x)  # move the BN statistics away from their initial values
    calibrate_(model, [x])
    model.eval()
    path = tmp_path_factory.mktemp("int8") / "m.codeq"
    checkpoint.save(path, model, spec=spec, data_config=DataConfig(input_size=(3, 32, 32)), class_names=None,
                    recipe={}, provenance={}, metrics={}, macs=macs)
    return checkpoint.load(path), x


@needs_ort
def test_round_trip_through_onnx_runtime(tmp_path, ckpt):
    import onnx
    import onnxruntime as ort

    ck, x = ckpt
    info = onnx_int8.export_onnx_int8(ck, tmp_path / "m.onnx")
    graph = onnx.load(str(info.path)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") == len(ck.activations) == info.activation_quantizers
    assert info.int8_layers == len(ck.layers)  # every quantized layer reads a quantized tensor
    int8 = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) >= 2]
    assert len(int8) == info.int8_layers  # every quantized weight is an int8 initializer
    sess = ort.InferenceSession(str(info.path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = ck.build_model()(x).numpy()
    # Not bit-exact (BN folded in float, the weights' int8 grid, rounding ties), but close:
    # a few activation steps at most, and the same predictions.
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() <= 0.2 * scale
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.75


@needs_ort
def test_8_bit_graph_runs_on_integer_kernels(tmp_path, ckpt):
    import onnx
    import onnxruntime as ort

    ck, _ = ckpt
    if any(a["bits"] != 8 for a in ck.activations):
        pytest.skip("sub-8-bit activations carry a Clip that blocks ONNX Runtime's fusion (docs/format.md)")
    info = onnx_int8.export_onnx_int8(ck, tmp_path / "m.onnx")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(info.path), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert ops.count("QLinearConv") + ops.count("QGemm") >= 4


def test_refuses_a_checkpoint_without_activation_quantizers(tmp_path):
    path = weights_only_checkpoint(tmp_path)
    if not importlib.util.find_spec("onnx"):
        pytest.skip("onnx missing: the install hint comes first")
    with pytest.raises(UsageError, match="act_bits=8"):
        onnx_int8.export_onnx_int8(checkpoint.load(path), tmp_path / "m.onnx")


def test_without_onnx_says_what_to_install(tmp_path, ckpt, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    with pytest.raises(CodeqError, match=r"pip install 'codeq\[onnx\]'"):
        onnx_int8.export_onnx_int8(ckpt[0], tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


@needs_ort
def test_cli_export_onnx_int8_answers_in_json(tmp_path, ckpt, capsys):
    import json

    from conftest import run_cli

    out = tmp_path / "model.onnx"
    code, stdout, stderr = run_cli(["export", str(ckpt[0].path), "--format", "onnx-int8", "--to", str(out), "--json"], capsys)
    assert code == 0, stderr
    answer = json.loads(stdout)
    assert answer["format"] == "onnx-int8" and answer["int8_layers"] == len(ckpt[0].layers)
    assert out.stat().st_size == answer["bytes"]


def test_cli_refuses_onnx_int8_without_activation_quantizers(tmp_path, capsys):
    from conftest import run_cli

    path = weights_only_checkpoint(tmp_path)
    code, _, stderr = run_cli(["export", str(path), "--format", "onnx-int8", "--to", str(tmp_path / "m.onnx")], capsys)
    lines = [line for line in stderr.strip().splitlines() if line]
    has_onnx = importlib.util.find_spec("onnx") is not None
    assert code == (2 if has_onnx else 1) and len(lines) == 1
    assert ("act_bits=8" if has_onnx else "codeq[onnx]") in lines[0]


@needs_ort
def test_cli_export_check_counts_integer_kernels_and_times_three_graphs(tmp_path, ckpt, capsys):
    import json

    from conftest import run_cli

    ck, _ = ckpt
    if any(a["bits"] != 8 for a in ck.activations):
        pytest.skip("the 8-bit graph is the one that runs on integer kernels")
    out = tmp_path / "model.onnx"
    code, stdout, stderr = run_cli(["export", str(ck.path), "--format", "onnx-int8", "--to", str(out), "--check",
                                    "--reps", "1", "--json"], capsys)
    assert code == 0, stderr
    check = json.loads(stdout)["check"]
    convs = sum(len(layer.shape) == 4 for layer in ck.layers.values())
    assert check["ops"]["codeq"]["int"]["QLinearConv"] == convs and check["ops"]["codeq"]["int"]["QLinearAdd"] == 4
    assert not check["ops"]["codeq"]["float"] and check["ops"]["fp32"]["float"]["Add"] == 4
    assert [row["batch"] for row in check["latency"]] == [1, 8]
    assert all(set(row["ms"]) == {"fp32", "codeq", "ort_static"} for row in check["latency"])
    assert check["top1"] is None  # the checkpoint records no image folder
    assert "VNNI" in check["cpu"]


def test_cli_check_needs_the_int8_format(tmp_path, capsys):
    from conftest import run_cli

    path = weights_only_checkpoint(tmp_path)
    code, _, stderr = run_cli(["export", str(path), "--format", "onnx", "--to", str(tmp_path / "m.onnx"), "--check"], capsys)
    assert code == 2 and "--check" in stderr and len(stderr.strip().splitlines()) == 1


# -- OpenVINO (the `openvino` extra) ------------------------------------------------------------
HAS_OV = importlib.util.find_spec("openvino") is not None


def test_cli_check_in_openvino_without_the_package_says_what_to_install(tmp_path, capsys, monkeypatch):
    import sys

    from conftest import run_cli

    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    path = weights_only_checkpoint(tmp_path)
    out = tmp_path / "m.onnx"
    code, _, stderr = run_cli(["export", str(path), "--format", "onnx-int8", "--to", str(out), "--check",
                               "--runtime", "openvino"], capsys)
    lines = [line for line in stderr.strip().splitlines() if line]
    assert code == 2 and len(lines) == 1, stderr
    assert "openvino" in lines[0] and "pip install 'codeq[openvino]'" in lines[0]
    assert not out.exists()  # refused before any work


@pytest.mark.parametrize("args, words", [(["--runtime", "openvino"], "add --check"),
                                         (["--check", "--runtime", "ort,openvno"], "did you mean 'openvino'")])
def test_cli_runtime_mistakes_are_one_line(tmp_path, capsys, args, words):
    from conftest import run_cli

    path = weights_only_checkpoint(tmp_path)
    code, _, stderr = run_cli(["export", str(path), "--format", "onnx-int8", "--to", str(tmp_path / "m.onnx"), *args], capsys)
    lines = [line for line in stderr.strip().splitlines() if line]
    assert code == 2 and len(lines) == 1 and words in lines[0], stderr


@needs_ort
@pytest.mark.skipif(not HAS_OV, reason="pip install 'codeq[openvino]'")
def test_openvino_runs_the_int8_graph_as_onnx_runtime_does(tmp_path, ckpt):
    from codeq_cli.commands import int8_check

    ck, x = ckpt
    if any(a["bits"] != 8 for a in ck.activations):
        pytest.skip("the 8-bit graph is the one that runs on integer kernels")
    info = onnx_int8.export_onnx_int8(ck, tmp_path / "m.onnx")
    ort_out = int8_check.session(info.path, 1).run(None, {"input": x.numpy()})[0]
    ov_out = int8_check.ov_compile(info.path, 1).create_infer_request().infer([x.numpy()])[0]
    # Both runtimes compute the same integer codes with the same scales; they may differ only where a
    # requantization rounds a tie the other way, i.e. by about one step of an 8-bit activation
    # (1/255 ≈ 0.4% of its range). A float or bf16 path in OpenVINO differs by several percent (the
    # export's weight grid and activation rounding against the float model), so this can fail.
    scale = np.abs(ort_out).max()
    assert np.abs(ov_out - ort_out).max() <= 0.005 * scale
    assert (ov_out.argmax(1) == ort_out.argmax(1)).all()
    ops = int8_check.ov_ops(info.path)  # OpenVINO's compiled model: every conv and the linear on u8/i8
    convs = sum(len(layer.shape) == 4 for layer in ck.layers.values())
    assert ops["int"].get("Convolution", 0) == convs and ops["int"].get("FullyConnected", 0) == 1
    assert "Convolution" not in ops["float"]


@needs_ort
@pytest.mark.parametrize("bits", [6, 7])
def test_export_counts_and_warns_about_weights_above_6_bits(tmp_path, capsys, bits):
    import json

    from conftest import run_cli

    spec = ModelSpec("timm", "test_resnet", num_classes=4)
    torch.manual_seed(0)
    model = create(spec)
    macs = measure_macs(model, (3, 32, 32))
    quantize_(model, bits=bits, init_dz=0.8, activations=ActSpec(bits=8))
    calibrate_(model.eval(), [torch.randn(4, 3, 32, 32)])
    path = tmp_path / "m.codeq"
    checkpoint.save(path, model, spec=spec, data_config=DataConfig(input_size=(3, 32, 32)), class_names=None,
                    recipe={}, provenance={}, metrics={}, macs=macs)
    ck = checkpoint.load(path)
    wide = sum(layer.bits > 6 for layer in ck.layers.values())
    assert wide == (len(ck.layers) if bits == 7 else 0)
    flags = (("--reduce-range", True), ("--full-range", False)) if wide else (("--reduce-range", False),)
    for flag, warned in flags:
        code, stdout, stderr = run_cli(["export", str(path), "--format", "onnx-int8", "--to",
                                        str(tmp_path / f"{flag}.onnx"), flag, "--json"], capsys)
        assert code == 0, stderr
        assert json.loads(stdout)["wide_layers"] == (wide if flag == "--reduce-range" else 0)
        lines = [line for line in stderr.splitlines() if line.startswith("warning:")]
        assert len(lines) == int(warned), stderr
        if warned:
            assert f"{wide} of {len(ck.layers)} layers" in lines[0] and "--recipe int8" in lines[0]

"""Exports of the decoded model: dense state dicts that load strictly, and ONNX."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from codeq_cli.formats import checkpoint

from codeq_cli.formats import export
from codeq_cli.core.bops import measure_macs
from codeq_cli.errors import CodeqError, UsageError
from codeq_cli.core.insert import quantize_
from codeq_cli.models.factory import DataConfig, ModelSpec, create

SPECS = [ModelSpec("timm", "test_resnet", num_classes=4), ModelSpec("torchvision", "mobilenet_v3_small", num_classes=4)]


@pytest.fixture(scope="module", params=SPECS, ids=lambda s: s.label)
def compressed(request, tmp_path_factory):
    spec = request.param
    torch.manual_seed(0)
    model = create(spec)
    x = torch.randn(2, 3, 32, 32)
    macs = measure_macs(model, (3, 32, 32))
    quantize_(model, bits=None, init_dz=0.8, init_bit=0.3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        loss = model(x).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    path = tmp_path_factory.mktemp("export") / "m.codeq"
    checkpoint.save(path, model, spec=spec, data_config=DataConfig(input_size=(3, 32, 32)), class_names=None,
                    recipe={}, provenance={}, metrics={}, macs=macs)
    with torch.no_grad():
        expected = model(x)
    return checkpoint.load(path), x, expected


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pth"])
def test_state_dict_loads_strictly_with_equal_logits(tmp_path, compressed, suffix):
    ckpt, x, expected = compressed
    out = export.export_state_dict(ckpt, tmp_path / f"dense{suffix}")
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(out))
    else:
        sd = torch.load(out, weights_only=True)
    assert all(v.dtype in (torch.float32, torch.int64) for v in sd.values())
    plain = create(ckpt.spec)
    plain.load_state_dict(sd, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), expected, atol=1e-5, rtol=0)


def test_state_dict_refuses_unknown_suffix(tmp_path, compressed):
    with pytest.raises(UsageError, match=r"\.safetensors"):
        export.export_state_dict(compressed[0], tmp_path / "dense.npz")


def test_onnx_without_the_package_says_what_to_install(tmp_path, compressed, monkeypatch):
    monkeypatch.setattr(export, "_onnx_modules", lambda: (False, False))
    with pytest.raises(CodeqError, match="pip install onnx"):
        export.export_onnx(compressed[0], tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.skipif(importlib.util.find_spec("onnx") is None, reason="the onnx package is not installed")
def test_the_torchscript_exporter_fallback_prints_no_deprecation_warning(tmp_path, compressed, monkeypatch):
    import warnings

    import onnx

    monkeypatch.setattr(export, "_onnx_modules", lambda: (True, False))  # onnx without onnxscript
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = export.export_onnx(compressed[0], tmp_path / "m.onnx")
    onnx.checker.check_model(onnx.load(str(out)))
    assert not [w for w in seen if issubclass(w.category, DeprecationWarning)], [str(w.message)[:80] for w in seen]


@pytest.mark.skipif(importlib.util.find_spec("onnx") is None, reason="the onnx package is not installed")
def test_onnx_export_writes_a_valid_model(tmp_path, compressed):
    import onnx

    import numpy as np
    import onnxruntime as ort

    ckpt, x, expected = compressed
    out = export.export_onnx(ckpt, tmp_path / "m.onnx")
    onnx.checker.check_model(onnx.load(str(out)))
    # The graph computes what the decoded model computes: ONNX Runtime's logits against PyTorch's, batch of 2
    # (the batch dimension is dynamic).
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-4, rtol=1e-4)

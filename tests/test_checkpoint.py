"""The compressed checkpoint: exact round trips, entropy coding near the bound, refusals."""

from __future__ import annotations

import json
import math
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn.utils import parametrize

from codeq_cli.formats import checkpoint

from codeq_cli.formats import entropy
from codeq_cli.core.bops import bops_rows, measure_macs
from codeq_cli.errors import CheckpointError, CodeqError
from codeq_cli.core.insert import quantize_, quantized_weights
from codeq_cli.models.factory import DataConfig, ModelSpec, create

MODELS = {
    "timm-resnet": (ModelSpec("timm", "test_resnet", num_classes=5), 32),
    "timm-vit": (ModelSpec("timm", "test_vit", num_classes=5), 160),  # its own size: the position table depends on it
    "tv-mobilenet": (ModelSpec("torchvision", "mobilenet_v3_small", num_classes=5), 32),
}


def trained(spec: ModelSpec, size: int, bits: int | None = None, steps: int = 2, seed: int = 0):
    """A quantized model after a few AdamW steps (codes, steps and shifts all moved), and its input."""
    torch.manual_seed(seed)
    model = create(spec)
    x = torch.randn(4, spec.in_chans, size, size)
    macs = measure_macs(model, x.shape[1:])
    quantize_(model, bits=bits, init_dz=0.8, init_bit=0.3)  # ≈ half the weights pruned, 3-4 bits
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), torch.arange(4) % 5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), x, macs


def save(path: Path, model, spec, x, macs, **kw):
    args = dict(
        spec=spec, data_config=DataConfig(input_size=tuple(x.shape[1:])), class_names=["a", "b", "c", "d", "e"],
        recipe={"name": "mixed", "lambda_dz": 0.02, "bits": None}, provenance={"torch": torch.__version__, "seed": 0, "steps": 2},
        metrics={"fp_top1": 70.3, "top1": 69.8}, macs=macs, data_dir="/data/imagenet",
    )
    args.update(kw)
    return checkpoint.save(path, model, **args)


@pytest.fixture(scope="module", params=list(MODELS))
def saved(request, tmp_path_factory):
    spec, size = MODELS[request.param]
    model, x, macs = trained(spec, size)
    path = tmp_path_factory.mktemp("ckpt") / "model.codeq"
    info = save(path, model, spec, x, macs)
    return model, x, macs, path, info, spec


# -- round trip ------------------------------------------------------------------


def test_decoded_logits_equal_fake_quantized(saved):
    model, x, _, path, _, _ = saved
    decoded = checkpoint.load(path).build_model()
    assert not decoded.training
    assert not any(parametrize.is_parametrized(m) for m in decoded.modules())
    with torch.no_grad():
        torch.testing.assert_close(decoded(x), model(x), atol=1e-5, rtol=0)


def test_codes_step_shift_bits_identical(saved):
    model, _, _, path, _, _ = saved
    ckpt = checkpoint.load(path)
    qws = list(quantized_weights(model))
    assert list(ckpt.layers) == [qw.name for qw in qws]
    for qw in qws:
        enc, layer = qw.quantizer.encode(qw.original), ckpt.layers[qw.name]
        assert layer.codes.dtype == torch.int8
        assert torch.equal(layer.codes, enc.codes)
        assert (layer.step, layer.shift, layer.bits, layer.shape) == (enc.step, enc.shift, enc.bits, tuple(enc.codes.shape))
        assert layer.param == (f"{qw.module_name}.{qw.param_name}")
        torch.testing.assert_close(layer.decode(), qw.module.weight.detach(), atol=0, rtol=0)


def test_rows_and_metadata_round_trip(saved):
    model, x, macs, path, info, spec = saved
    ckpt = checkpoint.load(path)
    assert [r.to_dict() for r in ckpt.rows] == [r.to_dict() for r in bops_rows(model, macs)]
    assert ckpt.macs == macs
    assert ckpt.spec == spec
    assert ckpt.data_config.input_size == tuple(x.shape[1:])
    assert ckpt.class_names == ["a", "b", "c", "d", "e"]
    assert ckpt.meta["recipe"] == {"name": "mixed", "lambda_dz": 0.02, "bits": None}
    assert ckpt.meta["provenance"]["steps"] == 2 and ckpt.metrics == {"fp_top1": 70.3, "top1": 69.8}
    assert ckpt.data_dir == "/data/imagenet"
    assert ckpt.file_bytes == path.stat().st_size == info.file_bytes
    assert ckpt.weight_bytes == info.weight_bytes


def test_state_dict_uses_plain_names_and_float32(saved):
    model, _, _, path, _, _ = saved
    ckpt = checkpoint.load(path)
    spec = ckpt.spec
    plain = create(spec)
    sd = ckpt.state_dict()
    assert list(sd) == list(plain.state_dict())
    assert not any("parametrizations" in k or "theta" in k for k in sd)
    live = model.state_dict()
    for k, v in sd.items():
        ref = plain.state_dict()[k]
        assert v.shape == ref.shape
        if k in live:  # not a quantized weight: stored as it was, float32 (integers kept)
            assert v.dtype == (torch.float32 if ref.is_floating_point() else live[k].dtype)
            assert torch.equal(v, live[k].to(v.dtype))


def test_fixed_two_bit_and_all_zero_layer(tmp_path):
    spec, size = MODELS["timm-resnet"]
    model, x, macs = trained(spec, size, bits=2, steps=1)
    first = next(iter(quantized_weights(model)))
    with torch.no_grad():
        first.original.zero_()  # a layer of one symbol: every code is 0
    path = tmp_path / "m.codeq"
    save(path, model, spec, x, macs)
    ckpt = checkpoint.load(path)
    layer = ckpt.layers[first.name]
    assert layer.counts == {0: layer.numel} and layer.sparsity == 1.0
    assert all(lay.bits == 2 for lay in ckpt.layers.values())
    assert all(set(lay.counts) <= {-1, 0, 1} for lay in ckpt.layers.values())
    with torch.no_grad():
        torch.testing.assert_close(ckpt.build_model()(x), model(x), atol=1e-5, rtol=0)


def test_build_model_refuses_a_spec_that_does_not_fit(tmp_path):
    spec, size = MODELS["timm-resnet"]
    model, x, macs = trained(spec, size, steps=0)
    path = tmp_path / "m.codeq"
    save(path, model, ModelSpec("timm", "test_resnet", num_classes=7), x, macs)
    with pytest.raises(CheckpointError, match="does not fit timm:test_resnet"):
        checkpoint.load(path).build_model()


def test_save_refuses_a_model_without_quantizers(tmp_path):
    spec, size = MODELS["timm-resnet"]
    model = create(spec)
    with pytest.raises(CodeqError, match="no codeq quantizers"):
        save(tmp_path / "m.codeq", model, spec, torch.zeros(1, 3, size, size), {})
    assert not (tmp_path / "m.codeq").exists()


# -- entropy coding --------------------------------------------------------------


@pytest.mark.parametrize(
    "codes",
    [
        np.zeros(0, np.int8),
        np.zeros(1, np.int8),
        np.zeros(1000, np.int8),
        np.full(7, -3, np.int8),
        np.array([1, -1, 0], np.int8),
        np.array([0] * 999 + [1], np.int8),
        np.random.default_rng(0).integers(-1, 2, 10_000).astype(np.int8),  # 2-bit
        np.random.default_rng(1).integers(-127, 128, 20_000).astype(np.int8),  # full 8-bit range
        np.arange(-128, 128).astype(np.int8),
    ],
    ids=["empty", "one", "zeros", "const", "tiny", "rare", "2bit", "8bit", "all256"],
)
def test_entropy_round_trip_exact(codes):
    blob = entropy.encode(codes)
    out = entropy.decode(blob, codes.size)
    assert out.dtype == np.int8 and np.array_equal(out, codes)
    counts, end = entropy.read_table(blob)
    assert sum(counts.values()) == codes.size
    if len(counts) <= 1:
        assert end == len(blob)  # the table alone, no coded data


def test_entropy_bound_values():
    assert entropy.entropy_bound_bits(torch.tensor([0, 0, 1, 1], dtype=torch.int8)) == pytest.approx(4.0)
    assert entropy.entropy_bound_bits(torch.zeros(100, dtype=torch.int8)) == 0.0
    p = np.array([0.6, 0.2, 0.2])
    codes = np.repeat(np.array([0, 1, -1], np.int8), (p * 1000).astype(int))
    assert entropy.entropy_bound_bits(codes) == pytest.approx(1000 * -(p * np.log2(p)).sum())


def test_entropy_decode_refuses_inconsistent_blobs():
    blob = entropy.encode(np.random.default_rng(0).integers(-3, 4, 500).astype(np.int8))
    with pytest.raises(ValueError):
        entropy.decode(blob, 499)
    with pytest.raises(ValueError):
        entropy.decode(blob[:-3], 500)
    with pytest.raises(ValueError):
        entropy.decode(b"\x05\x00", 1)


def _realistic_resnet18():
    """ResNet-18 quantizers set as training leaves them: sparsity 0.45-0.8, 3-4 bits, fixed by hand."""
    model = create(ModelSpec("torchvision", "resnet18", num_classes=1000))
    quantize_(model, bits=None)
    qws = list(quantized_weights(model))
    with torch.no_grad():
        for i, qw in enumerate(qws):
            a = qw.original.detach().abs().reshape(-1)
            target = 0.45 + 0.35 * i / (len(qws) - 1)  # deeper layers sparser
            R, cut = torch.quantile(a, torch.tensor([0.99, target]))
            qw.quantizer.theta_dz.fill_(math.atanh(min(0.999, max(0.0, 1 - float(cut / R)))))
            bits = 4 if i in (0, len(qws) - 1) or i % 3 == 0 else 3
            qw.quantizer.theta_bit.fill_(math.atanh((bits - 2) / 6))
    return model


def test_weight_payload_within_two_percent_of_the_entropy_bound(tmp_path):
    torch.manual_seed(0)
    model = _realistic_resnet18()
    info = checkpoint.save(
        tmp_path / "r18.codeq", model, spec=ModelSpec("torchvision", "resnet18", num_classes=1000),
        data_config=DataConfig(), class_names=None, recipe={}, provenance={}, metrics={}, macs={},
    )
    ckpt = checkpoint.load(tmp_path / "r18.codeq")
    assert 0.4 < sum(lay.sparsity for lay in ckpt.layers.values()) / len(ckpt.layers) < 0.8
    assert {lay.bits for lay in ckpt.layers.values()} == {3, 4}
    assert info.entropy_bound_bytes == pytest.approx(ckpt.entropy_bound_bits / 8)
    assert info.weight_bytes <= 1.02 * info.entropy_bound_bytes
    assert info.file_bytes < ckpt.fp32_bytes / 15


# -- refusals --------------------------------------------------------------------


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> bytes:
    spec, size = MODELS["timm-resnet"]
    model, x, macs = trained(spec, size, steps=0)
    path = tmp_path_factory.mktemp("good") / "m.codeq"
    save(path, model, spec, x, macs)
    return path.read_bytes()


def _refused(path: Path, match: str) -> str:
    with pytest.raises(CheckpointError, match=match) as info:
        checkpoint.load(path)
    text = str(info.value)
    assert "\n" not in text and str(path) in text
    return text


def test_refuses_missing_and_folder(tmp_path):
    _refused(tmp_path / "nope.codeq", "does not exist")
    _refused(tmp_path, "is a folder")


def test_refuses_empty(tmp_path):
    (tmp_path / "e.codeq").write_bytes(b"")
    _refused(tmp_path / "e.codeq", "is empty")


@pytest.mark.parametrize("keep", [3, 30, 200, -1])
def test_refuses_truncated(tmp_path, good, keep):
    p = tmp_path / "t.codeq"
    p.write_bytes(good[:keep] if keep > 0 else good[: len(good) // 2])
    _refused(p, "is truncated")


def test_refuses_trailing_bytes(tmp_path, good):
    p = tmp_path / "t.codeq"
    p.write_bytes(good + b"\0" * 5)
    _refused(p, "5 unexpected bytes")


@pytest.mark.parametrize("where", ["header", "metadata", "payload", "last byte"])
def test_refuses_bit_flips(tmp_path, good, where):
    meta_len = struct.unpack_from("<I", good, 12)[0]
    pos = {"header": 30, "metadata": checkpoint.HEADER_BYTES + meta_len // 2,
           "payload": checkpoint.HEADER_BYTES + meta_len + 100, "last byte": len(good) - 1}[where]
    data = bytearray(good)
    data[pos] ^= 0x10
    p = tmp_path / "f.codeq"
    p.write_bytes(bytes(data))
    _refused(p, "checksum does not match")


def _with_meta(good: bytes, edit) -> bytes:
    """``good`` with its metadata changed by ``edit(meta)`` and a matching checksum: a crafted file."""
    import hashlib

    import zlib

    meta_len = struct.unpack_from("<I", good, 12)[0]
    meta = json.loads(zlib.decompress(good[checkpoint.HEADER_BYTES : checkpoint.HEADER_BYTES + meta_len]))
    edit(meta)
    body = zlib.compress(json.dumps(meta).encode())
    payload = good[checkpoint.HEADER_BYTES + meta_len :]
    head = bytearray(good[:24])
    struct.pack_into("<I", head, 12, len(body))
    return bytes(head) + hashlib.sha256(bytes(head) + body + payload).digest() + body + payload


CRAFTED = {
    "bits as a string": (lambda m: m["layers"][0].update(bits="4"), "layers.0.bits"),
    "bits out of range": (lambda m: m["layers"][0].update(bits=9), "layers.0.bits"),
    "a count that is a bool": (lambda m: m["rows"][0].update(params=True), "rows.0.params"),
    "a row with an extra field": (lambda m: m["rows"][0].update(extra=1), "rows.0.extra"),
    "a non-float32 step": (lambda m: m["layers"][0].update(step=0.1), "layers.0.step"),
    "a span past the payload": (lambda m: m["tensors"][0].update(offset=10**9), "points outside the payload"),
    "a tensor of the wrong size": (lambda m: m["tensors"][0].update(nbytes=m["tensors"][0]["nbytes"] + 4), "size does not match"),
    "an unknown dtype": (lambda m: m["tensors"][0].update(dtype="<f8"), "tensors.0.dtype"),
    "a key stored twice": (lambda m: m["state_keys"].append(m["state_keys"][0]), "stored twice"),
    "a metric that is text": (lambda m: m["metrics"].update(top1="69.8"), "metrics.top1"),
    "an unknown model source": (lambda m: m["model"].update(source="keras"), "model.source"),
    "an input size of two numbers": (lambda m: m["data_config"].update(input_size=[32, 32]), "data_config.input_size"),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_refuses_crafted_metadata_naming_the_field(tmp_path, good, case):
    edit, field = CRAFTED[case]
    p = tmp_path / "c.codeq"
    p.write_bytes(_with_meta(good, edit))
    text = _refused(p, "malformed metadata")
    assert field in text


def test_unknown_metadata_keys_are_kept(tmp_path, good):
    p = tmp_path / "k.codeq"
    p.write_bytes(_with_meta(good, lambda m: m.update(future={"x": 1})))
    assert checkpoint.load(p).meta["future"] == {"x": 1}


def test_refuses_newer_format(tmp_path, good):
    import hashlib

    data = bytearray(good)
    struct.pack_into("<H", data, 8, checkpoint.FORMAT_VERSION + 1)
    data[24:56] = hashlib.sha256(bytes(data[:24]) + bytes(data[56:])).digest()  # a genuine newer file
    p = tmp_path / "n.codeq"
    p.write_bytes(bytes(data))
    text = _refused(p, "newer than this codeq reads")
    assert "upgrade codeq" in text


def test_refuses_foreign_files(tmp_path):
    spec, _ = MODELS["timm-resnet"]
    sd = create(spec).state_dict()
    torch.save(sd, tmp_path / "plain.pt")
    _refused(tmp_path / "plain.pt", "zip archive")
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    _refused(tmp_path / "legacy.pt", "Python pickle")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3)}, tmp_path / "w.safetensors")
    _refused(tmp_path / "w.safetensors", "safetensors file")
    (tmp_path / "r.bin").write_bytes(np.random.default_rng(0).bytes(4096))
    _refused(tmp_path / "r.bin", "not a codeq checkpoint")
    (tmp_path / "j.json").write_text(json.dumps({"format": "codeq"}))
    _refused(tmp_path / "j.json", "not a codeq checkpoint")


class _Evil:
    """Unpickling this creates the marker file: the proof that a loader ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_crafted_pickle_does_not_run(tmp_path, protocol):
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Evil(control), protocol=protocol)).close()
    assert control.exists()  # the payload works when unpickled

    marker = tmp_path / "pwned"
    p = tmp_path / "evil.codeq"
    p.write_bytes(pickle.dumps({"state_dict": _Evil(marker)}, protocol=protocol))
    with pytest.raises(CheckpointError):
        checkpoint.load(p)
    assert not marker.exists()


def test_codes_that_decode_differently_are_refused(tmp_path, good, monkeypatch):
    p = tmp_path / "m.codeq"
    p.write_bytes(good)
    ckpt = checkpoint.load(p)
    real = entropy.decode
    monkeypatch.setattr(entropy, "decode", lambda blob, n: -real(blob, n))  # another coder's reading
    layer = next(iter(ckpt.layers.values()))
    with pytest.raises(CheckpointError, match="decodes to different codes"):
        layer.codes


# -- format 2: compressed metadata, module versions ---------------------------------


def _mnasnet(tmp_path: Path, **kw):
    spec = ModelSpec("torchvision", "mnasnet0_5", num_classes=3)
    torch.manual_seed(0)
    model = create(spec).eval()
    x = torch.randn(2, 3, 32, 32)
    macs = measure_macs(model, x.shape[1:])
    quantize_(model, bits=4)
    return model, save(tmp_path / "mnas.codeq", model, spec, x, macs, class_names=["a", "b", "c"], **kw), x


def test_metadata_is_compressed_and_format_1_files_still_read(tmp_path, saved):
    import zlib

    model, x, macs, path, _, spec = saved
    data = path.read_bytes()
    version, meta_len = struct.unpack_from("<H", data, 8)[0], struct.unpack_from("<I", data, 12)[0]
    assert version == checkpoint.FORMAT_VERSION == 2
    plain = zlib.decompress(data[checkpoint.HEADER_BYTES : checkpoint.HEADER_BYTES + meta_len])
    assert json.loads(plain)["format_version"] == 2 and meta_len < len(plain) / 2
    # A format-1 file (plain JSON metadata), as the previous codeq wrote it, reads the same.
    ck2 = checkpoint.load(path)
    old = save(path.with_suffix(".v1"), model, spec, x, macs, format_version=1)
    raw = old.path.read_bytes()
    assert struct.unpack_from("<H", raw, 8)[0] == 1
    assert json.loads(raw[checkpoint.HEADER_BYTES : checkpoint.HEADER_BYTES + old.meta_bytes])["format_version"] == 1
    ck1 = checkpoint.load(old.path)
    assert ck1.format_version == 1 and ck1.meta["layers"] == ck2.meta["layers"]
    with torch.no_grad():
        torch.testing.assert_close(ck1.build_model()(x), ck2.build_model()(x), rtol=0, atol=0)


def test_refuses_metadata_that_does_not_inflate(tmp_path, good):
    import hashlib
    import zlib

    meta_len = struct.unpack_from("<I", good, 12)[0]
    payload = good[checkpoint.HEADER_BYTES + meta_len :]
    for body, why in ((b"{not zlib", "does not decompress"), (zlib.compress(b"{" * 1000)[:-6], "cut short")):
        head = bytearray(good[:24])
        struct.pack_into("<I", head, 12, len(body))
        p = tmp_path / "z.codeq"
        p.write_bytes(bytes(head) + hashlib.sha256(bytes(head) + body + payload).digest() + body + payload)
        assert why in _refused(p, "malformed metadata")


@pytest.mark.parametrize("version", [1, 2])
def test_module_versions_survive_for_mnasnet(tmp_path, version):
    """torchvision's MNASNet refuses a state dict without its version metadata (issue 11)."""
    model, info, x = _mnasnet(tmp_path, format_version=version)
    ck = checkpoint.load(info.path)
    sd = ck.state_dict()
    if version == 2:
        assert ck.meta["module_versions"][""] == 2 and sd._metadata[""] == {"version": 2}
    rebuilt = ck.build_model()  # format 1 records none: the installed code's versions are used
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)

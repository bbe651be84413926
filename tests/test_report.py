"""``codeq report``'s data and renderers, from the checkpoint's metadata alone."""

from __future__ import annotations

import csv
import io
import json

import pytest
import torch
from rich.console import Console

from codeq_cli.formats import checkpoint

from codeq_cli.formats import entropy

from codeq_cli.models import factory as models

from codeq_cli.commands import report
from codeq_cli.core.bops import bops_rows, bops_totals, measure_macs
from codeq_cli.core.insert import quantize_
from codeq_cli.models.factory import DataConfig, ModelSpec, create

SPEC = ModelSpec("timm", "test_resnet", num_classes=3)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = create(SPEC)
    macs = measure_macs(model, (3, 32, 32))
    quantize_(model, bits=None, init_dz=0.8, init_bit=0.3, exclude="fc")  # the head stays in float
    path = tmp_path_factory.mktemp("report") / "m.codeq"
    checkpoint.save(
        path, model, spec=SPEC, data_config=DataConfig(input_size=(3, 32, 32)), class_names=["cat", "dog", "fox"],
        recipe={"name": "mixed", "lambda_dz": 0.02, "optimizer": {"lr": 1e-4}, "exclude": ["fc"]},
        provenance={"seed": 0}, metrics={"fp_top1": 91.7, "top1": 91.25}, macs=macs,
    )
    return checkpoint.load(path), bops_rows(model, macs), model


@pytest.fixture(scope="module")
def data(ckpt):
    return report.report_data(ckpt[0])


def test_json_shape(data):
    assert set(data) == {"file", "format_version", "model", "layers", "totals", "metrics", "recipe", "provenance",
                         "history", "budget", "notes"}
    assert data["history"] is None and data["budget"] is None  # saved without either
    assert set(data["model"]) >= {"label", "source", "name", "num_classes", "in_chans", "input_size", "classes"}
    for layer in data["layers"]:
        assert tuple(layer) == report.LAYER_KEYS
    assert set(data["totals"]) >= {
        "params", "macs", "rel_bops", "sparsity", "avg_bits", "file_bytes", "fp32_bytes", "entropy_bound_bytes",
        "compression_ratio", "weight_bytes", "bops", "quantized_layers",
    }
    assert json.loads(json.dumps(data)) == data  # plain JSON, nothing lost


def test_values_match_the_live_model(ckpt, data):
    c, rows, model = ckpt
    assert [lay["name"] for lay in data["layers"]] == [r.name for r in rows]
    live = bops_totals(rows)
    t = data["totals"]
    for key in ("params", "macs", "bops", "rel_bops", "sparsity", "avg_bits"):
        assert t[key] == pytest.approx(live[key])
    assert sum(lay["bops_share"] for lay in data["layers"]) == pytest.approx(100.0)
    fc = next(lay for lay in data["layers"] if lay["name"] == "fc")
    assert (fc["quantized"], fc["bits"], fc["sparsity"]) == (False, 32, 0.0)
    plain = create(SPEC).state_dict()
    assert t["fp32_bytes"] == sum(v.numel() * (4 if v.is_floating_point() else v.element_size()) for v in plain.values())
    assert t["file_bytes"] == c.path.stat().st_size
    assert t["compression_ratio"] == pytest.approx(t["fp32_bytes"] / t["file_bytes"])
    assert t["entropy_bound_bytes"] == pytest.approx(sum(entropy.entropy_bound_bits(lay.codes) for lay in c.layers.values()) / 8)
    assert data["metrics"] == {"fp_top1": 91.7, "top1": 91.25}
    assert data["model"]["label"] == "timm:test_resnet" and data["model"]["classes"] == 3


def test_report_builds_no_model_and_decodes_nothing(tmp_path, ckpt, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("report must not build a model or decode codes")

    monkeypatch.setattr(models, "create", boom)
    monkeypatch.setattr(entropy, "decode", boom)
    fresh = checkpoint.load(ckpt[0].path)
    assert report.report_data(fresh)["layers"]


def test_render_table(data):
    console = Console(record=True, width=160, color_system=None)
    report.render_table(data, console)
    text = console.export_text()
    for layer in data["layers"]:
        assert layer["name"] in text
    for needle in ("total", "relative BOPs", "sparsity", "smaller", "entropy bound", "91.25% (compressed)",
                   "91.70% (FP)", "recipe: name=mixed lambda_dz=0.02 optimizer.lr=0.0001 exclude=fc", "QKᵀ"):
        assert needle in text, needle


def test_csv(data):
    rows = list(csv.DictReader(io.StringIO(report.to_csv(data))))
    assert len(rows) == len(data["layers"])
    assert tuple(rows[0]) == report.LAYER_KEYS
    first = data["layers"][0]
    assert rows[0]["name"] == first["name"]
    assert rows[0]["shape"] == "x".join(map(str, first["shape"]))
    assert float(rows[0]["sparsity"]) == first["sparsity"] and int(rows[0]["bits"]) == first["bits"]
    assert float(rows[0]["bops"]) == first["bops"]


def test_markdown(data):
    md = report.to_markdown(data)
    lines = md.splitlines()
    assert lines[0] == "## timm:test_resnet (3×32×32)"
    # float activations: no a-bits column (it would say fp32 on every row), as on the page
    header = lines.index("| layer | kind | shape | params | MACs | bits | sparsity | BOPs | share |")
    assert lines[header + 1].startswith("|:---|")
    table = [ln for ln in lines[header + 2 :] if ln.startswith("|")]
    assert len(table) == len(data["layers"]) + 1 and table[-1].startswith("| **total** |")
    assert "- recipe: name=mixed" in md and "relative BOPs" in md


def test_quantized_inputs_add_the_a_bits_column_beside_bits(data):
    """With quantized inputs the terminal and Markdown tables show each layer's input width after its bits."""
    import copy

    act = copy.deepcopy(data)
    for i, layer in enumerate(act["layers"]):
        layer["act_bits"] = 8 if i % 2 else 32  # one float input stays fp32
    md = report.to_markdown(act).splitlines()
    header = md.index("| layer | kind | shape | params | MACs | bits | a-bits | sparsity | BOPs | share |")
    rows = [ln.split(" | ") for ln in md[header + 2:] if ln.startswith("|")]
    assert all(len(r) == 10 for r in rows)  # every row, the total too, has a cell per column
    assert [r[6] for r in rows[:-1]] == ["8" if i % 2 else "fp32" for i in range(len(act["layers"]))]
    texts = []
    for d in (act, data):
        console = Console(record=True, width=200, file=io.StringIO())
        report.render_table(d, console)
        texts.append(console.export_text().splitlines())
    header = [ln for ln in texts[0] if "layer" in ln and "kind" in ln][0]
    assert header.index("bits") < header.index("a-bits") < header.index("sparsity")
    header = [ln for ln in texts[1] if "layer" in ln and "kind" in ln][0]
    assert "a-bits" not in header and "sparsity" in header

"""The HTML report: the stored training history, the page's numbers against ``report --json``, comparisons."""

from __future__ import annotations

import hashlib
import json
import re
import struct
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from codeq_cli.commands import _plots, report, report_html
from codeq_cli.core.bops import measure_macs
from codeq_cli.core.insert import quantize_
from codeq_cli.errors import CheckpointError, CodeqError
from codeq_cli.formats import checkpoint, history
from codeq_cli.models.factory import DataConfig, ModelSpec, create
from conftest import run_cli

SPEC = ModelSpec("timm", "test_resnet", num_classes=3)


def _history(n: int = 12) -> dict:
    steps = [10 * (i + 1) for i in range(n)]
    return {"step": steps, "task_loss": [2.0 / (1 + i) for i in range(n)],
            "top1": [50.0 + i if i % 4 == 3 else None for i in range(n)],
            "rel_bops": [90.0 * 0.8 ** i for i in range(n)], "sparsity": [i / n for i in range(n)],
            "avg_bits": [8.0 - i / 3 for i in range(n)], "total_steps": 10 * n}


@pytest.fixture(scope="module")
def model_and_macs():
    torch.manual_seed(0)
    model = create(SPEC)
    macs = measure_macs(model, (3, 32, 32))
    quantize_(model, bits=None, init_dz=0.8, init_bit=0.3, exclude="fc")
    return model, macs


def _save(path: Path, model_and_macs, *, top1: float = 91.25, hist: dict | None = None) -> Path:
    model, macs = model_and_macs
    checkpoint.save(path, model, spec=SPEC, data_config=DataConfig(input_size=(3, 32, 32)),
                    class_names=["cat", "dog", "fox"], recipe={"name": "mixed"}, provenance={"seed": 0},
                    metrics={"fp_top1": 91.7, "top1": top1}, macs=macs, history=hist)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory, model_and_macs):
    folder = tmp_path_factory.mktemp("html")
    return (_save(folder / "with.pt", model_and_macs, hist=_history()),
            _save(folder / "old.pt", model_and_macs, top1=88.0))


def _raw_meta(path: Path) -> dict:
    data = path.read_bytes()
    meta_len = struct.unpack_from("<I", data, 12)[0]
    return json.loads(zlib.decompress(data[checkpoint.HEADER_BYTES: checkpoint.HEADER_BYTES + meta_len]))  # format 2


def _rewrite_meta(path: Path, mutate) -> Path:
    """The file with its metadata changed and its header and checksum made to match (a crafted file)."""
    data = path.read_bytes()
    meta_len = struct.unpack_from("<I", data, 12)[0]
    meta = _raw_meta(path)
    mutate(meta)
    body = zlib.compress(json.dumps(meta).encode())
    payload = data[checkpoint.HEADER_BYTES + meta_len:]
    head = bytearray(data[:24])
    struct.pack_into("<I", head, 12, len(body))
    digest = hashlib.sha256(bytes(head) + body + payload).digest()
    out = path.with_name("crafted-" + path.name)
    out.write_bytes(bytes(head) + digest + body + payload)
    return out


# -- the stored history ------------------------------------------------------------


def _log(path: Path, events: list[dict]) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in events) + '{"event": "step", "step": 9', encoding="utf-8")
    return path  # the last line is cut short, as a kill leaves it


def test_history_from_log_merges_evals_and_drops_replayed_steps(tmp_path):
    figures = {"rel_bops": 50.0, "sparsity": 0.5, "avg_bits": 4.0}
    events = [{"event": "start", "step": 0, "total_steps": 8}]
    events += [{"event": "step", "step": s, "total_steps": 8, "task_loss": 10.0 + s, **figures} for s in (1, 2, 3, 4)]
    events += [{"event": "eval", "step": 4, "top1": 60.0, **figures}, {"event": "saved", "step": 4}]
    events += [{"event": "step", "step": 5, "total_steps": 8, "task_loss": 99.0, **figures}]  # lost: resumed from 4
    events += [{"event": "start", "step": 4, "total_steps": 8}]
    events += [{"event": "step", "step": s, "total_steps": 8, "task_loss": 1.0 * s} for s in (5, 6)]
    h = history.from_log(_log(tmp_path / "metrics.jsonl", events))
    history.validate(h)
    assert h["step"] == [1, 2, 3, 4, 5, 6] and h["total_steps"] == 8
    assert h["task_loss"] == [11.0, 12.0, 13.0, 14.0, 5.0, 6.0]
    assert h["top1"] == [None, None, None, 60.0, None, None]
    assert h["rel_bops"] == [50.0] * 4 + [None, None]
    assert history.from_log(tmp_path / "missing.jsonl") is None


def test_history_is_thinned_keeping_evals_last_step_and_mean_losses(tmp_path):
    events = [{"event": "step", "step": s, "task_loss": float(s % 2), "rel_bops": 100.0 / s} for s in range(1, 1001)]
    events += [{"event": "eval", "step": s, "top1": s / 10} for s in (250, 500, 750, 1000)]
    h = history.from_log(_log(tmp_path / "m.jsonl", events), max_points=50)
    history.validate(h)
    assert len(h["step"]) == 50 and h["step"][-1] == 1000
    assert {250, 500, 750, 1000} <= set(h["step"])
    assert h["top1"][h["step"].index(500)] == 50.0
    # each point's loss is the mean of the logged steps since the previous point: weighted back, the sum of all
    windows = [b - a for a, b in zip([0] + h["step"], h["step"])]
    assert sum(v * w for v, w in zip(h["task_loss"], windows)) == pytest.approx(500.0)
    assert h["task_loss"][0] == pytest.approx(sum(s % 2 for s in range(1, h["step"][0] + 1)) / h["step"][0])


@pytest.mark.parametrize("bad, match", [
    ({"step": [2, 1]}, "do not increase"),
    ({"top1": [1.0]}, "as long as its steps"),
    ({"sparsity": ["x"] * 12}, "finite numbers"),
    ({"step": "1,2"}, "list of step numbers"),
])
def test_history_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        history.validate({**_history(), **bad})


def test_checkpoint_round_trips_history_and_reads_old_files(files, tmp_path):
    with_h, old = (checkpoint.load(p) for p in files)
    assert with_h.history == _history()
    assert old.history is None and "history" not in _raw_meta(files[1])  # nothing written when there is none
    assert report.report_data(old)["history"] is None
    crafted = _rewrite_meta(files[0], lambda m: m["history"].update(step=[3, 2] + m["history"]["step"][2:]))
    with pytest.raises(CheckpointError, match="malformed metadata .*history steps do not increase"):
        checkpoint.load(crafted)


def test_budget_pair_shapes():
    assert report.budget_pair(None) is None and report.budget_pair({"target": 5}) is None
    one = report.budget_pair({"target": 5.0, "achieved": 4.8})
    assert one["rows"] == [{"figure": "rel_bops", "target": 5.0, "achieved": 4.8}]
    many = report.budget_pair({"target": {"rel_bops": 5, "top1": 70}, "achieved": {"rel_bops": 4.9}, "metric": "x"})
    assert many["rows"][1] == {"figure": "top1", "target": 70, "achieved": None} and many["metric"] == "x"


# -- the page -------------------------------------------------------------------------


class _Tables(HTMLParser):
    """Every table: its header keys (``data-key``) and rows of cell values (``data-value``, JSON-decoded)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, dict] = {}
        self._table = self._row = None
        self._in_foot = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(a.get("class", ""), {"keys": [], "rows": [], "text": []})
        elif self._table is None:
            return
        elif tag == "tfoot":
            self._in_foot = True
        elif tag == "th" and "data-key" in a:
            self._table["keys"].append(a["data-key"])
        elif tag == "tr" and not self._in_foot:
            self._row = []
        elif tag == "td" and self._row is not None and "data-value" in a:
            self._row.append(json.loads(a["data-value"]))

    def handle_endtag(self, tag):
        if tag == "tr" and self._row:
            self._table["rows"].append(self._row)
            self._row = None
        elif tag == "tfoot":
            self._in_foot = False
        elif tag == "table":
            self._table = None


def _tables(text: str) -> dict[str, dict]:
    parser = _Tables()
    parser.feed(text)
    return parser.tables


def _assert_self_contained(text: str) -> None:
    assert "<script" not in text.lower() and "@import" not in text
    assert not re.findall(r"<[a-zA-Z][^<>]*\s(?:src|srcset|on\w+)=", text)  # no element loads or runs anything
    assert re.findall(r"<link[^>]*>", text) == ['<link rel="icon" href="data:,">']
    assert all(u.startswith("url(#") for u in re.findall(r"url\([^)]*\)", text))
    # xmlns names are the only URLs, and they are never fetched
    assert {u for u in re.findall(r"https?://[^\s\"'<>]+", text)} <= {"http://www.w3.org/2000/svg",
                                                                      "http://www.w3.org/1999/xlink"}


def test_page_numbers_equal_report_json(files, capsys):
    code, out, err = run_cli(["report", str(files[0]), "--json"], capsys)
    assert code == 0, err
    data = json.loads(out)
    text = report_html.page(data)
    _assert_self_contained(text)
    layers = _tables(text)["layers"]
    # float activations: every input is 32-bit, so the page leaves the a-bits column out
    assert layers["keys"] == [k for k in report.LAYER_KEYS if k != "act_bits"]
    assert [dict(zip(layers["keys"], row)) for row in layers["rows"]] == [
        {k: v for k, v in layer.items() if k != "act_bits"} for layer in data["layers"]]
    t, m = data["totals"], data["metrics"]
    for needle in (f"{t['rel_bops']:.2f}% of FP32", f"{t['sparsity']:.3f} (parameter-weighted", f"{t['avg_bits']:.2f}",
                   f"{t['compression_ratio']:.1f}× smaller", f"{m['top1']:.2f}% compressed", f"{m['fp_top1']:.2f}% FP",
                   "timm:test_resnet", "entropy bound", "name=mixed"):
        assert needle in text, needle
    assert text.count("<svg") == 2 and 'id="no-history"' not in text
    assert text == report_html.page(data)  # deterministic


def test_quantized_inputs_show_beside_the_weights_bits_in_the_table_and_the_plot(files, capsys):
    code, out, err = run_cli(["report", str(files[0]), "--json"], capsys)
    assert code == 0, err
    data = json.loads(out)
    for i, layer in enumerate(data["layers"]):
        layer["act_bits"] = 8 if i % 2 else 6
    text = report_html.page(data)
    layers = _tables(text)["layers"]
    keys = layers["keys"]
    assert keys[keys.index("bits") + 1] == "act_bits" and sorted(keys) == sorted(report.LAYER_KEYS)
    assert [dict(zip(keys, row)) for row in layers["rows"]] == data["layers"]
    assert ">a-bits</th>" in text and 'aria-label="bit-width of weights and inputs, sparsity' in text
    assert text.count("<tfoot><tr>") == 1 and re.search(r"<tfoot><tr>(<td[^>]*>[^<]*</td>){%d}</tr>" % len(keys), text)


def test_old_checkpoint_renders_without_curves(files):
    text = report_html.page(report.report_data(checkpoint.load(files[1])))
    assert text.count("<svg") == 1 and 'id="no-history"' in text and "no training history" in text


def test_names_from_the_file_are_escaped_and_not_mathtext(files):
    data = report.report_data(checkpoint.load(files[0]))
    data["layers"][0]["name"] = "--><script>alert(1)</script>$x^2$"
    data["file"] = "<img src=x onerror=alert(1)>.pt"
    data["recipe"] = {"note": "</style><script>"}
    data["budget"] = report.budget_pair({"target": 5.0, "achieved": 4.5})
    text = report_html.page(data)
    _assert_self_contained(text)
    assert "--&gt;&lt;script&gt;alert(1)&lt;/script&gt;$x^2$" in text and "<!--" not in text and "&lt;img src=x" in text
    assert "target 5%, achieved 4.5%" in text and "budget (relative BOPs)" in text


def test_pareto_front():
    points = [(10.0, 70.0), (5.0, 69.0), (5.0, 60.0), (20.0, 70.0), (2.0, 50.0), (10.0, 71.0)]
    assert _plots.pareto(points) == [4, 1, 5]


def test_comparison_page_and_cli(files, tmp_path, capsys):
    page = tmp_path / "cmp.html"
    code, out, err = run_cli(["report", str(files[0]), str(files[1]), "--html", str(page), "--json"], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert res["html"] == str(page) and len(res["reports"]) == 2
    text = page.read_text(encoding="utf-8")
    _assert_self_contained(text)
    table = _tables(text)["comparison"]
    rows = [dict(zip(table["keys"], r)) for r in table["rows"]]
    assert [r["label"] for r in rows] == ["with", "old"]
    for row, data in zip(rows, res["reports"]):
        assert row["top1"] == data["metrics"]["top1"] and row["rel_bops"] == data["totals"]["rel_bops"]
        assert row["file_bytes"] == data["totals"]["file_bytes"] and row["avg_bits"] == data["totals"]["avg_bits"]
    assert [r["pareto"] for r in rows] == [True, False]  # same BOPs, lower top-1
    assert [r["pareto"] for r in res["comparison"]] == [True, False]
    assert "Pareto front" in text and "FP timm:test_resnet" not in text  # drawn as paths, not text
    assert text.count("<details>") == 2 and text.count("<svg") == 1 + 2 + 1  # trade-off, one file's two, the other's one
    assert len(set(re.findall(r' id="([^"]+)"', text))) == len(re.findall(r' id="([^"]+)"', text))  # ids unique

    code, _, err = run_cli(["report", str(files[0]), str(files[1]), "--csv"], capsys)
    assert code == 2 and "--csv takes one checkpoint, not 2" in err
    code, _, err = run_cli(["report", str(files[0]), "--html", str(tmp_path)], capsys)
    assert code == 2 and err.count("\n") == 1 and "is a folder" in err


def test_resnet50_page_is_under_2_mb():
    """A ResNet-50's 54 layers (random figures) and a full history: the page stays small."""
    import timm

    net = timm.create_model("resnet50", pretrained=False)
    layers = []
    for name, mod in net.named_modules():
        if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
            params = mod.weight.numel()
            layers.append({"name": name, "kind": "conv2d" if isinstance(mod, torch.nn.Conv2d) else "linear",
                           "shape": list(mod.weight.shape), "params": params, "macs": params * 49, "bits": 4,
                           "sparsity": 0.61234567, "bops": params * 49 * 4 * 32.0, "bops_share": 100 / 54,
                           "quantized": True, "act_bits": 32})
    assert len(layers) == 54
    steps = list(range(1, 257))
    hist = {"step": steps, "total_steps": 256, **{k: [1.0 + (s % 7) for s in steps] for k in history.SERIES}}
    t = {"layers": 54, "quantized_layers": 54, "params": 25_000_000, "quantized_params": 25_000_000, "macs": 4_100_000_000,
         "bops": 5e11, "dense_bops": 4.2e12, "rel_bops": 3.9, "sparsity": 0.6, "avg_bits": 4.0,
         "mean_layer_sparsity": 0.6, "mean_layer_bits": 4.0, "file_bytes": 6_000_000, "fp32_bytes": 102_000_000,
         "weight_bytes": 5_900_000, "entropy_bound_bytes": 5_800_000.0, "compression_ratio": 17.0, "file_vs_bound": 1.03,
         "weights_vs_bound": 1.01}
    data = {"file": "r50.pt", "format_version": 1, "layers": layers, "totals": t, "history": hist, "budget": None,
            "model": {"label": "tv:resnet50", "input_size": [3, 224, 224], "classes": 1000},
            "metrics": {"fp_top1": 80.8, "top1": 79.9}, "recipe": {}, "provenance": {}, "notes": list(report.NOTES)}
    size = len(report_html.page(data).encode("utf-8"))
    assert size < 2_000_000, size


def test_comparison_without_top1_and_save_refuses_a_bad_history(files, model_and_macs, tmp_path):
    a, b = (report.report_data(checkpoint.load(p)) for p in files)
    b["metrics"] = {}
    text = report_html.comparison_page([a, b])
    assert "Not plotted: old (no top-1 recorded)." in text and text.count("<svg") == 1 + 2 + 1
    assert report_html.comparison([a, b])["rows"][0]["pareto"] is True
    with pytest.raises(CodeqError, match="training history to store is malformed"):
        _save(tmp_path / "x.pt", model_and_macs, hist={**_history(), "step": [1]})
    assert not (tmp_path / "x.pt").exists()


def test_a_budget_is_shown_in_its_figures_unit():
    assert report_html._budget_value("rel_bops", 2.92764) == "2.93%"
    assert report_html._budget_value("file_bytes", 994072.0) == "994,072 bytes"
    assert report_html._budget_value("top1_drop", 0.8) == "0.80 points"
    assert report_html._budget_value("rel_bops", None) == "–"

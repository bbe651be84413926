"""`codeq demo` at reduced size: same pipeline, bundled data, cached FP32 start, deterministic."""

from __future__ import annotations

import json

from codeq_cli.cli.app import main
from codeq_cli.data.fashion_mnist import CLASSES, load_split

SMALL = ["--subset", "8", "--epochs", "1", "--fp-epochs", "1", "--batch-size", "16", "--model", "timm:test_resnet"]


def _demo(out_dir, capsys) -> dict:
    try:
        main(["demo", "--out-dir", str(out_dir), *SMALL, "--json"])
    except SystemExit as exc:
        assert not exc.code
    return json.loads(capsys.readouterr().out)


def test_bundled_data_is_balanced_and_small():
    images, labels = load_split("train")
    assert len(images) == 6000 and all(labels.count(c) == 600 for c in range(10))
    images, labels = load_split("val")
    assert len(images) == 1000 and all(labels.count(c) == 100 for c in range(10))
    assert len(images[0]) == 28 * 28 and len(CLASSES) == 10


def test_demo_runs_the_pipeline_and_is_deterministic(tmp_path, capsys):
    first = _demo(tmp_path / "a", capsys)
    assert first["fp_cached"] is False
    for key in ("fp_top1", "top1", "rel_bops", "sparsity", "avg_bits", "file_bytes", "fp32_bytes"):
        assert key in first
    assert 0 < first["rel_bops"] < 100 and first["file_bytes"] < first["fp32_bytes"]
    out_dir = tmp_path / "a"
    assert (out_dir / "compressed.pt").exists() and (out_dir / "fp32.safetensors").exists()
    assert not list(out_dir.rglob("state.pt"))  # finished runs keep no resumable state (issue 11)
    page = out_dir / "report.html"
    assert first["report_html"] == str(page)
    html = page.read_text(encoding="utf-8")  # with the curves of the run: the history is in the checkpoint
    assert "timm:test_resnet" in html and html.count("<svg") == 2 and 'id="no-history"' not in html
    assert sorted(p.name for p in (out_dir / "data" / "train").iterdir()) == sorted(CLASSES)
    again = _demo(tmp_path / "a", capsys)
    assert again["fp_cached"] is True
    other = _demo(tmp_path / "b", capsys)
    for key in ("fp_top1", "top1", "rel_bops", "sparsity", "avg_bits"):
        assert again[key] == first[key] == other[key], key

"""The HTML report in a real browser: headless Chromium, network off, light, dark and print.

Skipped, saying why, where Chromium is not installed (``apt-get install
chromium``; ``.ci/run`` installs it so that CI runs these).
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from browser import find_chromium, open_page
from codeq_cli.commands import report, report_html
from codeq_cli.core.bops import measure_macs
from codeq_cli.core.insert import quantize_
from codeq_cli.formats import checkpoint
from codeq_cli.models.factory import DataConfig, ModelSpec, create

pytestmark = pytest.mark.skipif(find_chromium() is None,
                                reason="Chromium is not installed (apt-get install chromium; .ci/run installs it)")

SPEC = ModelSpec("timm", "test_resnet", num_classes=3)


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> list[dict]:
    torch.manual_seed(0)
    model = create(SPEC)
    macs = measure_macs(model, (3, 32, 32))
    quantize_(model, bits=None, init_dz=0.8, init_bit=0.3, exclude="fc")
    folder = tmp_path_factory.mktemp("browser")
    steps = list(range(5, 105, 5))
    hist = {"step": steps, "task_loss": [1.5 - s / 100 for s in steps], "top1": [None if s % 25 else 60 + s / 4 for s in steps],
            "rel_bops": [100 * 0.97 ** s for s in steps], "sparsity": [s / 120 for s in steps],
            "avg_bits": [8 - s / 25 for s in steps], "total_steps": 100}
    out = []
    for name, top1, h in (("a", 85.0, hist), ("b", 80.0, None)):
        path = folder / f"{name}.pt"
        checkpoint.save(path, model, spec=SPEC, data_config=DataConfig(input_size=(3, 32, 32)), class_names=None,
                        recipe={"name": "mixed"}, provenance={}, metrics={"fp_top1": 88.0, "top1": top1}, macs=macs,
                        history=h)
        out.append(report.report_data(checkpoint.load(path)))
    return out


def _pixels(png: bytes):
    from PIL import Image, ImageStat

    img = Image.open(io.BytesIO(png)).convert("RGB")
    colours = img.getcolors(maxcolors=1 << 20)
    return img, len(colours or ()), ImageStat.Stat(img.convert("L"))


def test_page_loads_offline_without_errors_in_every_theme(reports, tmp_path):
    page = tmp_path / "report.html"
    report_html.write_page(page, reports[:1])
    run = open_page(page, themes=("light", "dark", "print"))
    assert run.errors == []
    assert run.requests == [page.resolve().as_uri()]  # the page itself, nothing else
    stats = {}
    for theme, png in run.screenshots.items():
        img, colours, stat = _pixels(png)
        assert img.width == 1200 and img.height > 1500, theme  # the whole page: summary, layers, curves
        assert colours > 100 and stat.stddev[0] > 20, f"{theme}: the screenshot looks blank"
        stats[theme] = stat.mean[0]
    # the dark theme is dark, and printing uses the light colours whatever the theme
    assert stats["dark"] < 80 < stats["light"] and stats["print"] > 180


def test_comparison_page_loads_offline(reports, tmp_path):
    page = tmp_path / "cmp.html"
    report_html.write_page(page, reports)
    run = open_page(page, themes=("light",), full_page=False)
    assert run.errors == [] and run.requests == [page.resolve().as_uri()]
    _, colours, stat = _pixels(run.screenshots["light"])
    assert colours > 50 and stat.stddev[0] > 10


def test_the_check_sees_requests_and_errors(tmp_path):
    """The helper itself: a page that fetches and fails is caught."""
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><body><img src="https://example.invalid/x.png">'
                    "<script>console.error('boom'); undefined_call();</script></body></html>", encoding="utf-8")
    run = open_page(page, themes=("light",), full_page=False)
    assert any(u.startswith("https://example.invalid") for u in run.requests)
    assert any("boom" in e for e in run.errors) and any("exception" in e for e in run.errors)
    assert Path(page).exists()

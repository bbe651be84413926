"""`codeq batch`: isolated jobs, a failing one recorded, gates, summaries, --resume."""

from __future__ import annotations

import csv
import json

import pytest

from codeq_cli.commands.batch import load_jobs
from codeq_cli.cli.app import main
from codeq_cli.errors import UsageError
from conftest import make_image_folder

COMMON = {"no_pretrained": True, "img_size": 32, "workers": 0, "num_classes": 3, "max_steps": 1, "batch_size": 6,
          "skip_baseline": True}


def _write(path, text: str):
    path.write_text(text)
    return path


def test_jobs_file_validation(tmp_path):
    with pytest.raises(UsageError, match="unknown key 'modle'"):
        load_jobs(_write(tmp_path / "a.yaml", "jobs:\n  - modle: resnet18\n    data: d\n"))
    with pytest.raises(UsageError, match="no data folder"):
        load_jobs(_write(tmp_path / "b.yaml", "jobs:\n  - model: resnet18\n"))
    with pytest.raises(UsageError, match="lists no jobs"):
        load_jobs(_write(tmp_path / "c.yaml", "defaults:\n  data: d\n"))
    with pytest.raises(UsageError, match=r"c2.yaml:\d+: not valid YAML"):
        load_jobs(_write(tmp_path / "c2.yaml", "jobs:\n  - model: [\n"))
    jobs = load_jobs(_write(tmp_path / "d.yaml", "defaults:\n  data: data\n  set: [epochs=1]\n"
                                                 "matrix:\n  models: [resnet18, timm:test_resnet]\n"
                                                 "  recipes: [fixed4, mixed]\n  out_dir: res\n"))
    assert [j["name"] for j in jobs] == ["resnet18-fixed4", "resnet18-mixed", "timm-test_resnet-fixed4",
                                         "timm-test_resnet-mixed"]
    assert jobs[0]["out"] == str(tmp_path / "res" / "resnet18-fixed4.pt") and jobs[0]["set"] == ["epochs=1"]


def test_batch_records_a_failure_runs_the_rest_and_gates(tmp_path, capsys):
    make_image_folder(tmp_path / "data", per_class=6, val_per_class=3, size=36)
    common = "\n".join(f"  {k}: {json.dumps(v)}" for k, v in COMMON.items())
    jobs = _write(tmp_path / "jobs.yaml", f"""
defaults:
  data: data
{common}
jobs:
  - name: good
    model: timm:test_resnet
    out: out/good.pt
    max_rel_bops: 100
  - name: broken
    model: timm:no_such_model_anywhere
    out: out/broken.pt
  - name: gated
    model: timm:test_resnet
    out: out/gated.pt
    min_top1: 101
""")
    try:
        main(["batch", str(jobs), "--json"])
        code = 0
    except SystemExit as exc:
        code = exc.code
    assert code == 1
    summary = json.loads(capsys.readouterr().out)
    status = {r["name"]: r["status"] for r in summary["jobs"]}
    assert status == {"good": "ok", "broken": "failed", "gated": "gate failed"}
    good = summary["jobs"][0]
    assert good["gates"]["max_rel_bops"]["passed"] is True and 0 < good["rel_bops"] <= 100 and good["bytes"] > 0
    assert good["budget"] is None  # no budget set: none named
    assert "min_top1" in summary["jobs"][2]["gates"] and "top-1" in summary["jobs"][2]["error"]
    files = [tmp_path / "jobs.summary.json", tmp_path / "jobs.summary.csv"]
    assert json.loads(files[0].read_text())["failed"] == 1
    rows = list(csv.DictReader(files[1].open()))
    assert [r["status"] for r in rows] == ["ok", "failed", "gate failed"] and rows[0]["budget"] == ""
    page = tmp_path / "jobs.summary.html"
    assert summary["summary_files"] == [str(f) for f in files] + [str(page)]
    html = page.read_text(encoding="utf-8")  # every job listed; the two checkpoints written compared
    assert all(f'data-value="&quot;{n}&quot;"' in html for n in ("good", "broken", "gate failed"))
    assert html.count("<details>") == 2 and "Accuracy against cost" in html and "<script" not in html

    # --resume: complete outputs are skipped, the rest run again.
    try:
        main(["batch", str(jobs), "--json", "--resume"])
    except SystemExit as exc:
        assert exc.code == 1
    again = {r["name"]: r["status"] for r in json.loads(capsys.readouterr().out)["jobs"]}
    assert again == {"good": "skipped", "broken": "failed", "gated": "gate failed"}


def test_budgets_in_jobs_from_set_and_from_a_recipe_file(tmp_path, capsys):
    """Budgets are recipe keys: a job sets them with `set:` or through its recipe file; the summary names them."""
    make_image_folder(tmp_path / "data", per_class=6, val_per_class=3, size=36)
    _write(tmp_path / "small.yaml", "target_size: 60kB\nlr_dz: 0.3\n")
    common = "\n".join(f"  {k}: {json.dumps(v)}" for k, v in {**COMMON, "max_steps": 3}.items())
    jobs = _write(tmp_path / "jobs.yaml", f"""
defaults:
  data: data
{common}
jobs:
  - name: bops
    model: timm:test_resnet
    out: out/bops.pt
    set: [target_bops=8, lr_dz=0.3]
    max_rel_bops: 8
  - name: size
    model: timm:test_resnet
    recipe: small.yaml
    out: out/size.pt
""")
    try:
        main(["batch", str(jobs), "--json"])
        code = 0
    except SystemExit as exc:
        code = exc.code
    summary = json.loads(capsys.readouterr().out)
    assert code == 0, [(r["name"], r["status"], r["error"]) for r in summary["jobs"]]
    rows = {r["name"]: r for r in summary["jobs"]}
    assert rows["bops"]["budget"] == {"kind": "bops", "target": 8.0} and 8 * 0.97 <= rows["bops"]["rel_bops"] <= 8
    assert rows["size"]["budget"] == {"kind": "size", "target": 60000.0} and 60000 * 0.97 <= rows["size"]["bytes"] <= 60000
    csv_rows = list(csv.DictReader((tmp_path / "jobs.summary.csv").open()))
    assert [r["budget"] for r in csv_rows] == ["8% BOPs", "60000 B"]  # a job without one: the other test
    # the terminal table gains a budget column
    main(["batch", str(jobs), "--resume"])
    out = capsys.readouterr().out
    assert "budget" in out and "8% BOPs" in out and "60000 B" in out

"""``--max-drop``: end to end from a trained FP model, resume, the refusal at chance, and BN re-estimation within the bound."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from codeq_cli.train import bn, finish
from codeq_cli.train.budget import BOPS, MAX_DROP, Budget
from codeq_cli.commands.compress import CompressOptions, run
from codeq_cli.errors import InterruptedRun as Interrupted
from codeq_cli.errors import UsageError
from codeq_cli.formats import checkpoint
from conftest import TINY, make_image_folder, run_cli


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """``(data, weights)``: a 3-class folder and test_resnet trained on it in FP32 (plain torch, 8 epochs)."""
    from codeq_cli.data.folders import build_datasets
    from codeq_cli.models.factory import load_model

    root = tmp_path_factory.mktemp("maxdrop")
    data = make_image_folder(root / "data", per_class=16, val_per_class=10, size=36)
    torch.manual_seed(0)
    loaded = load_model("timm:test_resnet", pretrained=False, num_classes=3, img_size=32)
    train_set, _, _ = build_datasets(data, loaded.data, crop_scale=(0.5, 1.0))
    model = loaded.model
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loader = torch.utils.data.DataLoader(train_set, batch_size=8, shuffle=True)
    model.train()
    for _ in range(8):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    torch.save(model.state_dict(), root / "fp.pt")
    return data, root / "fp.pt"


def _opts(data: Path, fp: Path, out: Path, **kw) -> CompressOptions:
    return CompressOptions(model="timm:test_resnet", data=data, weights=fp, pretrained=True, num_classes=3, img_size=32,
                           workers=0, log_every=2, seed=1, out=out, max_drop=5.0,
                           overrides=["epochs=6", "batch_size=8", "lr_dz=0.3", "lr_bit=0.3"], **kw)


def test_max_drop_writes_the_most_compressed_model_that_met_the_bound(trained, tmp_path, capsys):
    data, fp = trained
    out = tmp_path / "m.pt"
    res = run(_opts(data, fp, out))
    fp_top1 = res.metrics["fp_top1"]
    assert fp_top1 > 90  # the trained start: far above chance (33%)
    evals = [json.loads(line) for line in (tmp_path / "m.run" / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["event"] == "eval"]
    assert len(evals) == 6
    for e in evals:  # each evaluation is judged against the FP top-1 measured at the start
        assert e["max_drop_met"] == (e["top1"] >= fp_top1 - 5.0)
    met = [e for e in evals if e["max_drop_met"]]
    assert met, evals
    best = min(met, key=lambda e: e["rel_bops"])
    assert res.budget["kind"] == "max_drop" and res.budget["met"] and res.budget["best_epoch"] == best["epoch"]
    assert evals[-1]["best_epoch"] == best["epoch"]
    # the file is that model: its BOPs are the evaluation's, its top-1 within the bound
    assert res.totals["rel_bops"] == pytest.approx(best["rel_bops"], rel=1e-9)
    assert res.metrics["top1"] >= fp_top1 - 5.0
    assert res.metrics["budget_best_epoch"] == best["epoch"] and res.metrics["budget_max_drop"] == 5.0
    # ... and the report gives the bound and the drop reached
    code, stdout, _ = run_cli(["report", str(out), "--json"], capsys)
    assert code == 0
    [shown] = json.loads(stdout)["budget"]["rows"]
    assert (shown["figure"], shown["target"]) == ("top1_drop", 5.0)
    assert shown["achieved"] == pytest.approx(res.metrics["top1_drop"])


def test_max_drop_resumes_to_the_same_model(trained, tmp_path):
    data, fp = trained
    a = run(_opts(data, fp, tmp_path / "a.pt"))
    calls = {"n": 0}

    def stop_after_four_epochs() -> bool:  # 6 steps an epoch: stops after the fourth evaluation
        calls["n"] += 1
        return calls["n"] >= 24

    with pytest.raises(Interrupted):
        run(_opts(data, fp, tmp_path / "b.pt"), should_stop=stop_after_four_epochs)
    state = torch.load(tmp_path / "b.run" / "state.pt", weights_only=True)
    assert json.loads(state["budget"])["best"] is not None and "budget_best" in state  # the kept model is in it
    b = run(_opts(data, fp, tmp_path / "b.pt", resume=True))
    assert b.resumed_from_step == 24
    assert a.budget["best_epoch"] == b.budget["best_epoch"] and a.metrics["top1"] == b.metrics["top1"]
    ca, cb = checkpoint.load(tmp_path / "a.pt").layers, checkpoint.load(tmp_path / "b.pt").layers
    for name in ca:
        assert torch.equal(ca[name].codes, cb[name].codes), name


def test_max_drop_from_a_model_at_chance_is_refused(trained, tmp_path, capsys):
    data, _ = trained
    out = tmp_path / "r.pt"
    code, _, err = run_cli(["compress", *TINY, "--data", str(data), "--out", str(out), "--max-steps", "2",
                            "--batch-size", "8", "--max-drop", "5"], capsys)
    lines = err.splitlines()
    assert code == 2 and lines[-1].startswith("error: ") and sum(x.startswith("error") for x in lines) == 1, err
    assert "Traceback" not in err and "FP baseline: top-1 33.33%" in err  # measured, then refused before training
    assert "--max-drop 5" in err and "at or below chance (33.33% for 3 classes)" in err and "--weights" in err
    assert not out.exists()


def test_check_baseline_by_hand():
    budget = Budget(MAX_DROP, 1.0)
    finish.check_baseline(budget, 11.01, 10)  # floor 10.01 > chance 10
    with pytest.raises(UsageError, match=r"--max-drop 1: .* at or below chance"):
        finish.check_baseline(budget, 11.0, 10)  # floor 10.0 = chance
    finish.check_baseline(None, 5.0, 10)  # no budget: nothing to check
    finish.check_baseline(Budget(BOPS, 1.0), 5.0, 10)  # a target, not a bound: nothing to check
    finish.check_baseline(budget, None, 10)  # no baseline (resumed): nothing to check


class _BN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


@pytest.mark.parametrize("after, kind, kept", [
    (80.0, "max_drop", False),   # re-estimation breaks the bound (89): the trained statistics come back
    (89.5, "max_drop", True),    # within the bound: kept
    (80.0, "bops", True),        # no accuracy bound: always kept
])
def test_bn_reestimation_is_kept_only_within_max_drop(monkeypatch, after, kind, kept):
    torch.manual_seed(0)
    model = _BN()
    model.bn.running_mean.fill_(0.5)
    trained_stats = {k: v.clone() for k, v in model.bn.state_dict().items()}

    def fake_reestimate(mod, *args, **kw):
        mod.bn.running_mean.fill_(-3.0)
        mod.bn.running_var.fill_(7.0)
        return 16

    monkeypatch.setattr(bn, "reestimate", fake_reestimate)
    scores = iter([90.0, after])
    calls = []

    def measure(mod):
        calls.append(float(mod.bn.running_mean[0]))
        return next(scores)

    ctx = SimpleNamespace(recipe=SimpleNamespace(bn_reestimate=2, amp=False))
    budget = Budget(MAX_DROP if kind == "max_drop" else BOPS, 1.0)
    got = bn.bn_step(model, ctx, budget, True, 90.0, measure)
    assert got["top1_before_bn"] == 90.0 and got["bn_images"] == 16
    assert calls == ([0.5, -3.0] if kind == "max_drop" else [0.5])  # measured after only under max_drop
    assert ("bn_kept" not in got) == kept
    now = model.bn.state_dict()
    for k in ("running_mean", "running_var"):
        assert torch.equal(now[k], trained_stats[k]) == (not kept), k
    assert torch.equal(now["weight"], trained_stats["weight"])  # only the statistics ever change

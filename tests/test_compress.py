"""`codeq compress` end to end: outputs, λ, resume, refusals, pretrained weights (mocked)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from codeq_cli.formats import checkpoint
from codeq_cli.commands.compress import CompressOptions, run
from codeq_cli.errors import InterruptedRun as Interrupted
from conftest import TINY, make_image_folder, run_cli



@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("cmp") / "data", per_class=8, val_per_class=3, size=36)


cli = run_cli


def test_end_to_end_writes_checkpoint_run_dir_and_json(data, tmp_path, capsys):
    out = tmp_path / "model.pt"
    code, stdout, err = cli(
        ["compress", *TINY, "--data", str(data), "--out", str(out), "--max-steps", "4", "--batch-size", "8",
         "--log-every", "2", "--json"],
        capsys,
    )
    assert code == 0, err
    result = json.loads(stdout)  # exactly one JSON document on stdout
    assert result["out"] == str(out) and result["model"] == "timm:test_resnet"
    assert 0.0 <= result["metrics"]["top1"] <= 100.0 and result["metrics"]["fp_top1"] is not None
    run_dir = tmp_path / "model.run"
    # A finished run folder: no run state (it only served --resume), the logs and the recipe.
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl", "recipe.yaml", "summary.json"]
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    kinds = {e["event"] for e in events}
    assert {"start", "step", "eval", "saved"} <= kinds
    logged = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in logged] == [2, 4] and all("rel_bops" in e for e in logged)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["file_bytes"] == out.stat().st_size
    ck = checkpoint.load(out)
    assert ck.spec.name == "test_resnet" and ck.class_names == ["cat", "dog", "fox"]
    assert ck.meta["metrics"]["top1"] == pytest.approx(result["metrics"]["top1"])
    assert ck.meta["provenance"]["steps"] == 4
    # the compact history in the checkpoint: the logged steps and the epoch's evaluation, from metrics.jsonl
    evals = {e["step"]: e["top1"] for e in events if e["event"] == "eval"}
    assert ck.history["step"] == sorted({2, 4} | set(evals)) and ck.history["total_steps"] == 4
    assert [ck.history["top1"][ck.history["step"].index(s)] for s in evals] == list(evals.values())
    assert ck.history["task_loss"][ck.history["step"].index(2)] is not None


def _sparsity(data: Path, out: Path, lam: float) -> float:
    res = run(CompressOptions(
        model="timm:test_resnet", data=data, out=out, pretrained=False, num_classes=3, img_size=32, workers=0,
        max_steps=10, skip_baseline=True, log_every=100,
        overrides=["mode=fixed", "optimizer=sgd", "lr=0.01", "lr_dz=0.5", f"lambda_dz={lam}", "batch_size=8"],
    ))
    return res.totals["sparsity"]


def test_sparsity_grows_with_lambda_dz(data, tmp_path):
    values = [_sparsity(data, tmp_path / f"l{i}.pt", lam) for i, lam in enumerate((0.0, 0.02, 0.1))]
    assert values[0] < values[1] < values[2], values
    assert values[0] < 0.05  # without the pull the dead zones stay near their initial ~1%


def _codes(path: Path) -> dict[str, torch.Tensor]:
    return {name: layer.codes for name, layer in checkpoint.load(path).layers.items()}


def test_resumed_run_ends_with_the_codes_of_an_uninterrupted_one(data, tmp_path):
    common = dict(model="timm:test_resnet", data=data, pretrained=False, num_classes=3, img_size=32, workers=0,
                  max_steps=7, skip_baseline=True, seed=3, log_every=100, overrides=["batch_size=8", "lr_dz=0.05"])
    run(CompressOptions(out=tmp_path / "a.pt", **common))

    calls = {"n": 0}

    def stop_after_three() -> bool:
        calls["n"] += 1
        return calls["n"] >= 3

    with pytest.raises(Interrupted) as info:
        run(CompressOptions(out=tmp_path / "b.pt", **common), should_stop=stop_after_three)
    assert info.value.step == 3 and not (tmp_path / "b.pt").exists()
    res = run(CompressOptions(out=tmp_path / "b.pt", resume=True, **common))
    assert res.resumed_from_step == 3
    a, b = _codes(tmp_path / "a.pt"), _codes(tmp_path / "b.pt")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_refuses_to_overwrite_and_resume_checks(data, tmp_path, capsys):
    out = tmp_path / "m.pt"
    base = ["compress", *TINY, "--data", str(data), "--out", str(out), "--max-steps", "1", "--batch-size", "8",
            "--skip-baseline"]
    assert cli(base + ["--keep-state"], capsys)[0] == 0
    assert (tmp_path / "m.run" / "state.pt").exists()  # --keep-state: kept for a later --resume
    code, _, err = cli(base, capsys)
    assert code == 2 and "--overwrite" in err and err.count("\n") == 1
    code, _, err = cli(base + ["--resume", "--set", "lambda_dz=0.5"], capsys)
    assert code == 2 and "lambda_dz" in err and "--force" in err
    assert cli(base + ["--overwrite"], capsys)[0] == 0
    code, _, err = cli(["compress", *TINY, "--data", str(data), "--out", str(tmp_path / "new.pt"), "--resume"], capsys)
    assert code == 2 and "no run state" in err


def test_class_count_must_match_the_head(data, tmp_path, capsys):
    from codeq_cli.models.factory import ModelSpec, create

    weights = tmp_path / "w.pt"  # weights with the architecture's own 1000-class head
    torch.save(create(ModelSpec("timm", "test_resnet")).state_dict(), weights)
    code, _, err = cli(["compress", "timm:test_resnet", "--weights", str(weights), "--data", str(data), "--out",
                        str(tmp_path / "x.pt"), "--img-size", "32", "--workers", "0"], capsys)
    assert code == 2 and "--num-classes 3" in err and "Traceback" not in err


def test_random_weights_take_the_class_count_of_the_folders(data, tmp_path, capsys):
    """--no-pretrained: no head to keep, so the model is built for the 3 class folders, said in one line."""
    out = tmp_path / "x.pt"
    code, _, err = cli(["compress", "timm:test_resnet", "--no-pretrained", "--data", str(data), "--out", str(out),
                        "--img-size", "32", "--workers", "0", "--max-steps", "1", "--batch-size", "8",
                        "--skip-baseline"], capsys)
    assert code == 0, err
    assert "built with 3 outputs, one per class folder" in err and "resolved to" not in err
    assert checkpoint.load(out).spec.num_classes == 3


def test_non_finite_loss_stops_with_the_step_and_keeps_the_state(data, tmp_path, capsys):
    out = tmp_path / "nan.pt"
    code, _, err = cli(["compress", *TINY, "--data", str(data), "--out", str(out), "--max-steps", "5",
                        "--batch-size", "8", "--skip-baseline", "--set", "lambda_dz=1e38", "--set", "init_dz=1e5"],
                       capsys)
    assert code == 1 and "at step 1" in err and "lambda" in err
    assert (tmp_path / "nan.run" / "state.pt").exists() and not out.exists()


def test_pretrained_weights_offline_points_to_weights(data, tmp_path, capsys, monkeypatch):
    import timm

    def offline(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise OSError("We couldn't connect to 'https://huggingface.co' (offline)")
        return original(*args, **kwargs)

    original = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    code, _, err = cli(["compress", "timm:test_resnet", "--data", str(data), "--out", str(tmp_path / "p.pt"),
                        "--img-size", "32", "--workers", "0", "--num-classes", "3"], capsys)
    assert code == 1 and "--weights" in err and "pretrained" in err


def test_pretrained_download_path_mocked(data, tmp_path, capsys, monkeypatch):
    """The default path asks torchvision for its weights; here the 'download' is a local state dict."""
    import torchvision

    reference = torchvision.models.get_model("mobilenet_v3_small", weights=None)
    weights_enum = torchvision.models.get_model_weights("mobilenet_v3_small").DEFAULT
    calls = []

    def fake_get_state_dict(self, *args, **kwargs):
        calls.append(self.url)
        return reference.state_dict()

    monkeypatch.setattr(type(weights_enum), "get_state_dict", fake_get_state_dict)
    out = tmp_path / "tv.pt"
    code, _, err = cli(["compress", "mobilenet_v3_small", "--data", str(data), "--out", str(out), "--img-size", "32",
                        "--workers", "0", "--num-classes", "3", "--max-steps", "1", "--batch-size", "8",
                        "--skip-baseline"], capsys)
    assert code == 0, err
    assert calls == [weights_enum.url]
    assert "resolved to tv:mobilenet_v3_small" in err
    ck = checkpoint.load(out)
    # The backbone came from the "download": its first conv's codes decode from those weights.
    first = ck.layers["features.0.0"]
    assert first.shape == tuple(reference.features[0][0].weight.shape)

"""What a new user meets (issue 11): torchvision models that read version metadata, worker counts
without warnings, progress lines that show only measured figures, run folders without leftovers."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch

from codeq_cli.cli.console import Output, TrainingDisplay
from codeq_cli.data import loader
from conftest import make_image_folder, run_cli as cli


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("first") / "data", per_class=4, val_per_class=2, size=32)


def test_mnasnet_through_the_cli_compress_eval_export_and_weights(data, tmp_path, capsys):
    """MNASNet reads its version from the state dict's metadata: every path that copies one keeps it."""
    out = tmp_path / "m.pt"
    code, _, err = cli(["compress", "tv:mnasnet0_5", "--no-pretrained", "--data", str(data), "--out", str(out),
                        "--img-size", "32", "--workers", "0", "--max-steps", "1", "--batch-size", "4",
                        "--skip-baseline"], capsys)
    assert code == 0, err
    code, stdout, err = cli(["eval", str(out), "--workers", "0", "--json"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["samples"] == 6
    for suffix in ("pt", "safetensors"):
        code, _, err = cli(["export", str(out), "--to", str(tmp_path / f"d.{suffix}")], capsys)
        assert code == 0, err
    import torchvision

    dense = torch.load(tmp_path / "d.pt", weights_only=True)
    torchvision.models.mnasnet0_5(num_classes=3).load_state_dict(dense, strict=True)  # its _metadata came along
    # The exported safetensors (no _metadata) as --weights: the model's own versions are used.
    code, _, err = cli(["compress", "tv:mnasnet0_5", "--weights", str(tmp_path / "d.safetensors"), "--num-classes",
                        "3", "--data", str(data), "--out", str(tmp_path / "again.pt"), "--img-size", "32",
                        "--workers", "0", "--max-steps", "1", "--batch-size", "4", "--skip-baseline"], capsys)
    assert code == 0, err


def test_default_workers_follow_the_machine(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert loader.default_workers() == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert loader.default_workers() == 4  # no more than 4 per process
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert loader.default_workers() == 1


def test_a_normal_run_on_two_cores_prints_no_warning(data, tmp_path, capsys, monkeypatch):
    """torch warns when a loader asks for more workers than the CPUs; the default never does."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)  # torch asks the same
    out = tmp_path / "w.pt"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, err = cli(["compress", "timm:test_resnet", "--no-pretrained", "--data", str(data), "--out", str(out),
                            "--img-size", "32", "--max-steps", "1", "--batch-size", "4"], capsys)
        assert code == 0, err
        code, _, err2 = cli(["eval", str(out)], capsys)
        assert code == 0, err2
    texts = [f"{w.category.__name__}: {w.message}" for w in caught]
    assert not [t for t in texts if "worker" in t], texts
    assert "Warning" not in err + err2


def _lines(events: list[dict]) -> list[str]:
    import io

    out = Output()
    out.err.file = io.StringIO()
    display = TrainingDisplay(out, plain_interval_s=0.0)
    for e in events:
        display(e)
    return out.err.file.getvalue().splitlines()


START = {"event": "start", "total_steps": 2, "steps_per_epoch": 2, "step": 0, "world_size": 1}


def _step(n: int, **kw) -> dict:
    return {"event": "step", "epoch": 0, "step": n, "total_steps": 2, "loss": 30.479, "task_loss": 0.812,
            "reg_loss": 29.667, "lr": 1e-3, **kw}


def test_progress_shows_task_loss_and_penalty_apart_and_only_measured_figures():
    lines = _lines([{**START, "quantized_layers": 5}, _step(1),
                    _step(2, sparsity=0.25, avg_bits=6.5, rel_bops=40.0)])
    first, second = lines[1], lines[2]
    assert "task loss 0.812" in first and "penalty 29.667" in first and "loss 30.479" not in first
    assert "sparsity" not in first and "bits" not in first and "BOPs" not in first  # nothing measured yet
    assert "sparsity 0.250" in second and "bits 6.50" in second and "rel BOPs 40.00%" in second
    # A model without quantizers (the demo's FP32 pre-training): no penalty, no compression figures.
    fp = _lines([{**START, "quantized_layers": 0}, {**_step(2), "reg_loss": 0.0}])
    assert "task loss 0.812" in fp[1] and "penalty" not in fp[1] and "BOPs" not in fp[1]
    # A distillation term, when an event carries one, is shown on its own too.
    assert "distill 0.100" in _lines([START, _step(1, distill_loss=0.1)])[1]


def test_compression_stats_of_a_float_model_are_not_invented():
    from codeq_cli.core.insert import quantize_
    from codeq_cli.models.factory import ModelSpec, create
    from codeq_cli.train.loop import compression_stats

    model = create(ModelSpec("timm", "test_resnet", num_classes=3))
    assert compression_stats(model, {}) == {}  # no quantizers: no sparsity, bits or BOPs to report
    quantize_(model, bits=4)
    stats = compression_stats(model, {})
    assert "rel_bops" not in stats and stats["avg_bits"] > 0  # no MACs measured: no relative BOPs


def test_resolved_note_only_when_the_name_changed():
    from codeq_cli.models.factory import load_model

    assert load_model("timm:test_resnet", pretrained=False, num_classes=3).notes == []
    assert load_model("test_resnet", pretrained=False, num_classes=3).notes == ["test_resnet resolved to timm:test_resnet"]


def test_preprocessing_the_user_chose_is_used_stored_and_the_eval_default(data, tmp_path, capsys):
    from codeq_cli.data.transforms import eval_resize
    from codeq_cli.formats import checkpoint

    out = tmp_path / "p.pt"
    code, _, err = cli(["compress", "timm:test_resnet", "--no-pretrained", "--data", str(data), "--out", str(out),
                        "--img-size", "32", "--workers", "0", "--max-steps", "1", "--batch-size", "4", "--skip-baseline",
                        "--crop-pct", "1.0", "--mean", "0.5,0.5,0.5", "--std", "0.25 0.25 0.25",
                        "--set", "interpolation=nearest"], capsys)
    assert code == 0, err
    assert "input 32x32 (crop 1, nearest)" in err
    cfg = checkpoint.load(out).data_config
    assert (cfg.crop_pct, cfg.mean, cfg.std, cfg.interpolation) == (1.0, (0.5,) * 3, (0.25,) * 3, "nearest")
    assert eval_resize(cfg) == 32  # no centre crop: resized straight to the input size
    recipe = (tmp_path / "p.run" / "recipe.yaml").read_text()
    assert "crop_pct: 1.0" in recipe and "interpolation: nearest" in recipe
    code, stdout, err = cli(["eval", str(out), "--workers", "0", "--json"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["preprocessing"] == {"mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "nearest",
                                                   "crop_pct": 1.0}
    code, stdout, err = cli(["eval", str(out), "--workers", "0", "--json", "--crop-pct", "0.5",
                             "--interpolation", "bicubic"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["preprocessing"]["crop_pct"] == 0.5
    assert json.loads(stdout)["preprocessing"]["interpolation"] == "bicubic"


@pytest.mark.parametrize("args, words", [
    (["--crop-pct", "1.5"], "crop_pct=1.5 is out of range"),
    (["--mean", "a,b"], "--mean 'a,b' is not a list of numbers"),
    (["--std", "0.5,0,0.5"], "std=[0.5, 0.0, 0.5] is out of range"),
    (["--interpolation", "cubic"], "interpolation='cubic' is not one of the choices"),
])
def test_bad_preprocessing_is_one_usage_line(data, tmp_path, capsys, args, words):
    code, _, err = cli(["eval", str(tmp_path / "none.pt"), *args], capsys)
    assert code == 2 and words in err and err.count("\n") == 1, err
    code, _, err = cli(["compress", "timm:test_resnet", "--no-pretrained", "--data", str(data),
                        "--out", str(tmp_path / "x.pt"), *args], capsys)
    assert code == 2 and words in err and err.count("\n") == 1, err

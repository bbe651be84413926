"""The error catalogue: every mistake a user can make is one line, the right exit code, the culprit named.

One table, one row per case. Each row runs the CLI and checks: the exit code
(2 for a wrong command line, 1 for something that is there but cannot be
used), stderr is exactly one non-empty line ``error: ...`` naming the bad
value, path or key, and no traceback. ``docs/troubleshooting.md`` quotes these
messages.

Rows marked ``process`` run the real entry point in a subprocess
(``python -m codeq_cli``: a fresh interpreter, its imports and warnings
included), a few at a time; the others call ``codeq_cli.cli.app.main`` in this
process, the function ``codeq`` runs after its imports (a subprocess is mostly
a Python start and a torch import, and there are fifty rows). The files every
row needs are made once (module fixtures).
"""

from __future__ import annotations

import os
import pickle
import shutil
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import make_image_folder, run_cli

ENV = {**os.environ, "NO_COLOR": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
TINY = ["timm:test_resnet", "--no-pretrained", "--img-size", "32", "--workers", "0", "--num-classes", "3"]
RUN = ["--max-steps", "2", "--batch-size", "4", "--skip-baseline"]


def compress(*args: str, model: list[str] = TINY, data: str = "{w}/data", out: str = "{w}/out/x.pt") -> list[str]:
    return ["compress", *model, "--data", data, "--out", out, *RUN, *args]


@dataclass
class Case:
    id: str
    args: list[str]
    code: int  # 2: the command line is wrong; 1: what it names cannot be used
    names: tuple[str, ...]  # substrings of the error line: the culprit, and what to do
    marker: bool = False  # a crafted file: the code it carries must not have run
    process: bool = False  # run `python -m codeq_cli` in a subprocess (else main() in this process)


CASES = [
    # -- paths ------------------------------------------------------------------------------
    Case("data-missing", compress(data="{w}/nowhere"), 2, ("--data", "{w}/nowhere", "does not exist"), process=True),
    Case("data-is-a-file", compress(data="{w}/afile"), 2, ("{w}/afile", "not a folder")),
    Case("data-without-train", compress(data="{w}/notrain"), 1, ("{w}/notrain", "train/")),
    Case("data-without-val", compress(data="{w}/noval"), 1, ("{w}/noval", "val/")),
    Case("data-empty-class-folder", compress(data="{w}/emptyclass"), 1, ("hollow", "no images")),
    Case("data-no-images", compress(data="{w}/noimages"), 1, ("{w}/noimages/train", "no images")),
    Case("out-under-a-file", compress(out="{w}/afile/x.pt"), 2, ("{w}/afile/x.pt", "is a file")),
    Case("out-unwritable", compress(out="/proc/codeq-test.pt"), 2, ("/proc",)),
    Case("out-exists", compress(out="{w}/ok.codeq"), 2, ("{w}/ok.codeq", "exists", "--overwrite")),
    Case("resume-without-state", compress("--resume", out="{w}/out/fresh.pt"), 2, ("--resume", "{w}/out/fresh.run")),
    # -- data -------------------------------------------------------------------------------
    Case("data-mostly-unreadable", compress("--quiet", data="{w}/manybroken"), 1,
         ("{w}/manybroken/train/", "unreadable", "10%"), process=True),
    Case("data-different-classes", compress(data="{w}/diffclasses"), 1, ("only in train/: fox", "only in val/: wolf")),
    Case("data-classes-vs-head", compress("--weights", "{w}/default_head.pt",
                                          model=["timm:test_resnet", "--img-size", "32", "--workers", "0"]),
         2, ("3 classes", "1000 outputs", "--num-classes 3")),
    Case("data-num-classes-wrong", compress("--num-classes", "5"), 2, ("--num-classes 5", "3 class folders")),
    Case("data-subset-zero", compress("--subset", "0"), 2, ("--subset 0",)),
    # -- models and weights -------------------------------------------------------------------
    Case("model-unknown", compress(model=["timm:resnet5o", "--no-pretrained"]), 2,
         ("'timm:resnet5o'", "close matches", "resnet50")),
    Case("model-bad-prefix", compress(model=["keras:resnet50", "--no-pretrained"]), 2, ("'keras'",)),
    Case("weights-missing", compress("--weights", "{w}/nowhere.pt"), 2, ("{w}/nowhere.pt", "does not exist")),
    Case("weights-not-a-state-dict", compress("--weights", "{w}/list.pt"), 1, ("{w}/list.pt", "state dict")),
    Case("weights-do-not-fit", compress("--weights", "{w}/other_arch.pt"), 1,
         ("{w}/other_arch.pt", "do not fit", "missing conv1.0.weight", "unexpected encoder.weight")),
    Case("weights-wrong-shape", compress("--weights", "{w}/wide_head.pt",
                                          model=["timm:test_resnet", "--img-size", "32", "--workers", "0"]), 1,
         ("{w}/wide_head.pt", "shape of fc.weight", "(3, 96)", "(1000, 96)", "--num-classes")),
    Case("weights-crafted-pickle", compress("--weights", "{w}/evil.pt"), 1,
         ("{w}/evil.pt", "could run code", "not loaded"), marker=True, process=True),
    Case("weights-raw-pickle", compress("--weights", "{w}/evil.pkl"), 1, ("{w}/evil.pkl", "pickle"), marker=True),
    Case("weights-truncated", compress("--weights", "{w}/trunc_sd.pt"), 1, ("{w}/trunc_sd.pt", "damaged or truncated")),
    # -- recipes and overrides ------------------------------------------------------------------
    Case("set-unknown-key", compress("--set", "lamda_dz=0.1"), 2, ("'lamda_dz'", "'lambda_dz'")),
    Case("recipe-unknown-key", compress("--recipe", "{w}/typo.yaml"), 2, ("{w}/typo.yaml:2", "'lamda_dz'", "'lambda_dz'"),
         process=True),
    Case("recipe-wrong-type", compress("--recipe", "{w}/wrongtype.yaml"), 2, ("{w}/wrongtype.yaml:1", "epochs='two'", "integer")),
    Case("recipe-out-of-range", compress("--recipe", "{w}/range.yaml"), 2, ("{w}/range.yaml:1", "lambda_dz=-1", ">= 0")),
    Case("recipe-broken-yaml", compress("--recipe", "{w}/broken.yaml"), 2, ("{w}/broken.yaml:3", "YAML")),
    Case("recipe-unknown-name", compress("--recipe", "mixd"), 2, ("'mixd'", "mixed")),
    Case("set-not-a-pair", compress("--set", "lambda_dz"), 2, ("--set 'lambda_dz'", "key=value")),
    Case("set-bad-value", compress("--set", "mode=both"), 2, ("mode='both'", "'fixed' or 'mixed'")),
    Case("set-out-of-range", compress("--set", "quantile=1.5"), 2, ("quantile=1.5", "(0, 1]")),
    # -- checkpoints ---------------------------------------------------------------------------
    Case("ckpt-missing", ["report", "{w}/nowhere.codeq"], 2, ("{w}/nowhere.codeq", "does not exist")),
    Case("ckpt-folder", ["report", "{w}/out"], 2, ("{w}/out", "is a folder")),
    Case("ckpt-empty", ["report", "{w}/empty.codeq"], 1, ("{w}/empty.codeq", "empty")),
    Case("ckpt-truncated", ["report", "{w}/trunc.codeq"], 1, ("{w}/trunc.codeq", "truncated")),
    Case("ckpt-bit-flipped", ["report", "{w}/flipped.codeq"], 1, ("{w}/flipped.codeq", "checksum"), process=True),
    Case("ckpt-state-dict", ["report", "{w}/wide_head.pt"], 1, ("{w}/wide_head.pt", "not a codeq checkpoint")),
    Case("ckpt-safetensors", ["report", "{w}/weights.safetensors"], 1, ("{w}/weights.safetensors", "safetensors")),
    Case("ckpt-other-tool", ["report", "{w}/model.onnx"], 1, ("{w}/model.onnx", "not a codeq checkpoint")),
    Case("ckpt-newer-format", ["report", "{w}/newer.codeq"], 1, ("{w}/newer.codeq", "format 9", "upgrade codeq")),
    Case("ckpt-crafted-pickle", ["report", "{w}/evil.pkl"], 1, ("{w}/evil.pkl", "pickle", "not opened"), marker=True,
         process=True),
    Case("ckpt-crafted-torch-file", ["report", "{w}/evil.pt"], 1, ("{w}/evil.pt", "not opened"), marker=True),
    Case("eval-ckpt-truncated", ["eval", "{w}/trunc.codeq", "--workers", "0"], 1, ("{w}/trunc.codeq", "truncated")),
    Case("eval-data-missing", ["eval", "{w}/ok.codeq", "--data", "{w}/nowhere", "--workers", "0"], 2,
         ("--data", "{w}/nowhere")),
    Case("export-ckpt-bit-flipped", ["export", "{w}/flipped.codeq", "--to", "{w}/out/dense.safetensors"], 1,
         ("{w}/flipped.codeq", "checksum")),
    Case("export-exists", ["export", "{w}/ok.codeq", "--to", "{w}/weights.safetensors"], 2,
         ("{w}/weights.safetensors", "--overwrite")),
    Case("export-folder-missing", ["export", "{w}/ok.codeq", "--to", "{w}/nowhere/dense.safetensors"], 2,
         ("{w}/nowhere",)),
    # -- numbers ---------------------------------------------------------------------------------
    Case("batch-size-zero", compress("--batch-size", "0"), 2, ("--batch-size", "batch_size=0")),
    Case("batch-size-negative", compress("--batch-size", "-3"), 2, ("--batch-size", "batch_size=-3")),
    Case("batch-size-over-the-data", compress("--batch-size", "64"), 2, ("batch_size 64", "--batch-size 12")),
    Case("epochs-zero", compress("--epochs", "0"), 2, ("--epochs", "epochs=0")),
    Case("max-steps-zero", compress("--max-steps", "0"), 2, ("--max-steps",)),
    Case("eval-batch-size-zero", ["eval", "{w}/ok.codeq", "--batch-size", "0"], 2, ("--batch-size",)),
    Case("img-size-fixed-vit", compress(model=["timm:test_vit3", "--no-pretrained", "--img-size", "48", "--workers", "0",
                                               "--num-classes", "3"]), 2,
         ("--img-size 48", "timm:test_vit3", "48x48", "160x160")),
    Case("img-size-collapses", compress(model=["timm:test_convnext2", "--no-pretrained", "--img-size", "8", "--workers",
                                               "0", "--num-classes", "3"]), 2, ("--img-size 8", "8x8")),
    Case("device-unknown", compress("--device", "tpu"), 2, ("--device 'tpu'",)),
]


# -- the files the rows need ---------------------------------------------------------------------
class _Evil:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _tiny_checkpoint(path: Path, data: Path) -> None:
    """A valid compressed checkpoint of test_resnet (3 classes) without training: quantize and save."""
    import torch

    from codeq_cli.formats import checkpoint
    from codeq_cli.core.bops import measure_macs
    from codeq_cli.core.insert import quantize_
    from codeq_cli.models.factory import DataConfig, ModelSpec, create
    from codeq_cli.train.recipe import Recipe, quantizer_kwargs

    torch.manual_seed(0)
    spec = ModelSpec("timm", "test_resnet", num_classes=3)
    model = create(spec)
    macs = measure_macs(model, (3, 32, 32))
    quantize_(model, **quantizer_kwargs(Recipe()))
    checkpoint.save(path, model, spec=spec, data_config=DataConfig((3, 32, 32)), class_names=["cat", "dog", "fox"],
                    recipe=Recipe().to_dict(), provenance={"seed": 0}, metrics={"top1": 0.0}, macs=macs,
                    data_dir=str(data))


def _copy_data(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Everything the catalogue points at: good and bad data, weights, recipes, checkpoints."""
    import timm
    import torch
    from safetensors.torch import save_file

    w = tmp_path_factory.mktemp("errors")
    (w / "out").mkdir()
    data = make_image_folder(w / "data", per_class=4, val_per_class=2, size=32)
    (w / "afile").write_text("a file, not a folder\n")
    png = (data / "train" / "cat" / "cat_000.png").read_bytes()

    # Data folders, each wrong in one way.
    for name, split in (("notrain", "val"), ("noval", "train")):
        (w / name / split / "cat").mkdir(parents=True)
        (w / name / split / "cat" / "a.png").write_bytes(png)
    _copy_data(data, w / "emptyclass")
    for split in ("train", "val"):
        (w / "emptyclass" / split / "hollow").mkdir()
        (w / "noimages" / split / "cat").mkdir(parents=True)
        (w / "noimages" / split / "cat" / "readme.txt").write_text("no images here\n")
    _copy_data(data, w / "diffclasses")
    (w / "diffclasses" / "val" / "fox").rename(w / "diffclasses" / "val" / "wolf")
    _copy_data(data, w / "manybroken")
    for i, f in enumerate(sorted((w / "manybroken" / "train").glob("*/*.png"))):
        if i % 2 == 0:
            f.write_bytes(f.read_bytes()[:60])  # truncated PNGs

    # Weights files.
    torch.save([1, 2, 3], w / "list.pt")
    torch.save({"encoder.weight": torch.zeros(4, 4)}, w / "other_arch.pt")
    sd = timm.create_model("test_resnet", num_classes=3).state_dict()
    torch.save(sd, w / "wide_head.pt")  # 3 outputs, where the default head has 1000
    torch.save(timm.create_model("test_resnet").state_dict(), w / "default_head.pt")  # 1000 outputs
    (w / "trunc_sd.pt").write_bytes((w / "wide_head.pt").read_bytes()[:5000])
    save_file({k: v.contiguous() for k, v in sd.items()}, str(w / "weights.safetensors"))
    torch.save({"fc.weight": _Evil(str(w / "pwned"))}, w / "evil.pt")
    with open(w / "evil.pkl", "wb") as fh:
        pickle.dump({"fc.weight": _Evil(str(w / "pwned"))}, fh)

    # Recipes.
    (w / "typo.yaml").write_text("mode: mixed\nlamda_dz: 0.1\n")
    (w / "wrongtype.yaml").write_text("epochs: two\n")
    (w / "range.yaml").write_text("lambda_dz: -1\n")
    (w / "broken.yaml").write_text("lambda_dz: 0.1\nbits: [4\nepochs: 2\n")

    # Checkpoints: one good one and its damaged relatives.
    _tiny_checkpoint(w / "ok.codeq", data)
    good = (w / "ok.codeq").read_bytes()
    (w / "empty.codeq").write_bytes(b"")
    (w / "trunc.codeq").write_bytes(good[: len(good) // 2])
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x04
    (w / "flipped.codeq").write_bytes(bytes(flipped))
    (w / "newer.codeq").write_bytes(good[:8] + struct.pack("<H", 9) + good[10:])
    (w / "model.onnx").write_bytes(b"\x08\x07\x12\x07pytorch\x1a\x052.3.0" + bytes(64))
    return w


@dataclass
class Ran:
    code: int
    stdout: str
    stderr: str


def _run(args: list[str]) -> Ran:
    proc = subprocess.run([sys.executable, "-m", "codeq_cli", *args], capture_output=True, text=True, env=ENV,
                          timeout=300)
    return Ran(proc.returncode, proc.stdout, proc.stderr)


def _run_here(args: list[str], capsys, monkeypatch) -> Ran:
    for key in ("NO_COLOR", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(key, ENV[key])
    code, out, err = run_cli(args, capsys)
    return Ran(code, out, err)


@pytest.fixture(scope="module")
def ran(world, request):
    """Every collected ``process`` row's subprocess, started a few at a time; each test waits for its own."""
    wanted = [item.callspec.params["case"] for item in request.session.items
              if getattr(item, "module", None) is request.module
              and "case" in getattr(getattr(item, "callspec", None), "params", {})
              and item.callspec.params["case"].process]
    pool = ThreadPoolExecutor(max_workers=min(4, (os.cpu_count() or 1) + 1))
    futures = {case.id: pool.submit(_run, [_format(a, world) for a in case.args]) for case in wanted}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


def _format(text: str, world: Path) -> str:
    return text.format(w=world)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_error_is_one_line_with_the_right_exit_code(case: Case, world: Path, ran, capsys, monkeypatch) -> None:
    args = [_format(a, world) for a in case.args]
    if case.process:
        result = ran[case.id].result() if case.id in ran else _run(args)
    else:
        result = _run_here(args, capsys, monkeypatch)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    line = lines[0]
    assert line.startswith("error: "), line
    assert result.code == case.code, f"exit {result.code}, expected {case.code}: {line}"
    for name in case.names:
        assert _format(name, world) in line, f"{_format(name, world)!r} not in: {line}"
    if case.marker:
        assert not (world / "pwned").exists(), "a crafted file ran code"


def test_broken_images_are_skipped_counted_and_reported(tmp_path: Path) -> None:
    """A few unreadable images do not stop a run: they are skipped, counted and reported at the end (exit 0)."""
    data = make_image_folder(tmp_path / "data", per_class=5, val_per_class=4, size=32)
    good = (data / "train" / "cat" / "cat_000.png").read_bytes()
    (data / "train" / "dog" / "dog_broken.png").write_bytes(good[: len(good) // 3])  # truncated
    (data / "val" / "fox" / "fox_broken.jpg").write_bytes(b"this is not a JPEG")  # undecodable
    (data / "train" / "cat" / "notes.txt").write_text("not an image\n")  # ignored, counted
    out = tmp_path / "m.pt"
    # 16 training images, batch 4, 4 steps: one epoch reads every one of them.
    result = _run(["compress", *TINY, "--data", str(data), "--out", str(out), "--max-steps", "4", "--batch-size", "4",
                   "--skip-baseline", "--set", "bn_reestimate=0"])
    assert result.code == 0, result.stderr
    assert "Traceback" not in result.stderr and "error:" not in result.stderr
    assert "train: 16 images, 1 non-image file ignored, 1 unreadable image skipped" in result.stderr
    assert "dog_broken.png" in result.stderr and "fox_broken.jpg" in result.stderr
    import json

    summary = json.loads((tmp_path / "m.run" / "summary.json").read_text())
    assert summary["data"]["train"]["skipped"] == 1 and summary["data"]["train"]["ignored"] == 1
    assert list(summary["data"]["val"]["broken"]) == [str(data / "val" / "fox" / "fox_broken.jpg")]

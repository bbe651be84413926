"""The CLI as scripts see it: JSON on stdout, plain output off a terminal, help without torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from codeq_cli.formats import checkpoint
from codeq_cli.cli.app import main
from conftest import make_image_folder, run_cli

ENV = {**os.environ, "NO_COLOR": "1"}


cli = run_cli


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny compressed checkpoint and its data folder."""
    root = tmp_path_factory.mktemp("cli")
    data = make_image_folder(root / "data", per_class=6, val_per_class=4, size=36)
    out = root / "m.pt"
    try:
        main(["compress", "timm:test_resnet", "--no-pretrained", "--img-size", "32", "--workers", "0",
              "--num-classes", "3", "--data", str(data), "--out", str(out), "--max-steps", "3",
              "--batch-size", "6", "--quiet"])
    except SystemExit as exc:
        assert not exc.code
    return data, out


def test_help_answers_without_importing_torch():
    code = (
        "import sys, io, contextlib\n"
        "from codeq_cli.cli.app import main\n"
        "for args in (['--help'], ['compress', '--help'], ['eval', '--help'], ['report', '--help'],\n"
        "             ['export', '--help'], ['demo', '--help'], ['batch', '--help'], ['recipes', '--help'], ['--version']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        "            main(args)\n"
        "        except SystemExit as e:\n"
        "            assert not e.code, (args, e.code)\n"
        "print(sorted(m for m in ('torch', 'numpy', 'timm', 'torchvision') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, check=True)
    assert out.stdout.strip() == "[]"


def test_version(capsys):
    code, out, _ = cli(["--version"], capsys)
    assert code == 0 and out.startswith("codeq ")


@pytest.mark.parametrize("args", [
    ["report", "{out}", "--json"],
    ["eval", "{out}", "--json", "--workers", "0"],
    ["eval", "{out}", "--json", "--workers", "0", "--data", "{data}"],
    ["export", "{out}", "--to", "{tmp}/dense.safetensors", "--json"],
    ["recipes", "--json"],
    ["recipes", "show", "mixed", "--json"],
])
def test_every_command_prints_exactly_one_json_document(trained, tmp_path, capsys, args):
    data, out = trained
    args = [a.format(out=out, data=data, tmp=tmp_path) for a in args]
    code, stdout, _ = cli(args, capsys)
    assert code == 0
    json.loads(stdout)  # the whole of stdout is one document


def test_report_formats(trained, capsys):
    _, out = trained
    code, stdout, _ = cli(["report", str(out), "--csv"], capsys)
    assert code == 0 and stdout.splitlines()[0].startswith("name,kind,shape,params,macs,bits,sparsity,bops")
    code, stdout, _ = cli(["report", str(out), "--markdown"], capsys)
    header = next(line for line in stdout.splitlines() if line.startswith("|"))
    assert code == 0 and header.startswith("| layer | kind | shape | params | MACs | bits |"), stdout  # a Markdown table, header first
    code, stdout, _ = cli(["report", str(out)], capsys)
    assert code == 0 and "relative BOPs" in stdout and "\x1b[" not in stdout  # no colour codes off a terminal
    code, _, err = cli(["report", str(out), "--json", "--csv"], capsys)
    assert code == 2 and err.startswith("error:")


def test_eval_top1_equals_a_hand_count(trained, capsys):
    from codeq_cli.data.folders import eval_folder

    data, out = trained
    ck = checkpoint.load(out)
    model = ck.build_model()
    ds = eval_folder(data, ck.data_config, class_names=ck.class_names)
    right = 0
    with torch.no_grad():
        for i in range(len(ds)):
            image, label = ds[i]
            right += int(model(image[None]).argmax(1).item() == label)
    code, stdout, _ = cli(["eval", str(out), "--json", "--workers", "0", "--batch-size", "5"], capsys)
    res = json.loads(stdout)
    assert code == 0 and res["samples"] == len(ds) == 12
    assert res["top1"] == pytest.approx(100.0 * right / len(ds))
    assert res["data"] == str(data.resolve()) and res["data_recorded"] is True


def test_eval_gate_and_missing_recorded_folder(trained, tmp_path, capsys):
    import shutil

    data, out = trained
    code, stdout, _ = cli(["eval", str(out), "--workers", "0", "--min-top1", "101", "--json"], capsys)
    assert code == 1 and json.loads(stdout)["passed"] is False
    code, _, _ = cli(["eval", str(out), "--workers", "0", "--min-top1", "0"], capsys)
    assert code == 0
    # A checkpoint whose recorded validation folder has since been removed.
    gone = tmp_path / "gone"
    shutil.copytree(data, gone)
    other = tmp_path / "other.pt"
    code, _, err = cli(["compress", "timm:test_resnet", "--no-pretrained", "--img-size", "32", "--workers", "0",
                        "--num-classes", "3", "--data", str(gone), "--out", str(other), "--max-steps", "1",
                        "--batch-size", "6", "--skip-baseline", "--quiet"], capsys)
    assert code == 0, err
    shutil.rmtree(gone)
    code, _, err = cli(["eval", str(other), "--workers", "0"], capsys)
    assert code == 2 and "is gone" in err and "--data" in err and err.count("\n") == 1
    code, _, err = cli(["eval", str(other), "--data", str(tmp_path / "nowhere")], capsys)
    assert code in (1, 2) and "nowhere" in err and err.count("\n") == 1


def test_eval_refuses_classes_the_model_does_not_know(trained, tmp_path, capsys):
    _, out = trained
    other = make_image_folder(tmp_path / "other", classes=("cat", "zebra"), per_class=1, val_per_class=2, size=36)
    code, _, err = cli(["eval", str(out), "--data", str(other), "--workers", "0"], capsys)
    assert code == 1 and "zebra" in err and err.count("\n") == 1


def test_export_loads_strictly_and_matches(trained, tmp_path, capsys):
    from safetensors.torch import load_file

    from codeq_cli.models.factory import create

    _, out = trained
    target = tmp_path / "dense.safetensors"
    code, _, _ = cli(["export", str(out), "--to", str(target)], capsys)
    assert code == 0
    ck = checkpoint.load(out)
    model = create(ck.spec)
    model.load_state_dict(load_file(str(target)), strict=True)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), ck.build_model()(x))
    code, _, err = cli(["export", str(out), "--to", str(target)], capsys)
    assert code == 2 and "--overwrite" in err


def test_compress_off_a_terminal_prints_plain_lines(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=4, val_per_class=2, size=36)
    proc = subprocess.run(
        [sys.executable, "-m", "codeq_cli", "compress", "timm:test_resnet", "--no-pretrained", "--img-size", "32",
         "--workers", "0", "--num-classes", "3", "--data", str(data), "--out", str(tmp_path / "o.pt"),
         "--max-steps", "2", "--batch-size", "4", "--skip-baseline"],
        capture_output=True, text=True, env=ENV,
    )
    assert proc.returncode == 0, proc.stderr
    assert "\x1b[" not in proc.stderr and "\r" not in proc.stderr  # no colours, no animation
    assert "step 2/2" in proc.stderr and "wrote" in proc.stdout
    quiet = subprocess.run(
        [sys.executable, "-m", "codeq_cli", "report", str(tmp_path / "o.pt"), "--quiet"] if False else
        [sys.executable, "-m", "codeq_cli", "eval", str(tmp_path / "o.pt"), "--quiet", "--workers", "0"],
        capture_output=True, text=True, env=ENV,
    )
    assert quiet.returncode == 0 and quiet.stderr == "" and "top-1" in quiet.stdout


def test_eval_compare_fp_with_local_weights(tmp_path, capsys):
    """--compare-fp evaluates the FP model from --weights on the same images and prints the drop."""
    from safetensors.torch import save_file

    from codeq_cli.models.factory import ModelSpec, create

    data = make_image_folder(tmp_path / "data", per_class=4, val_per_class=3, size=36)
    fp = create(ModelSpec("timm", "test_resnet", num_classes=3))
    weights = tmp_path / "fp.safetensors"
    save_file({k: v.contiguous() for k, v in fp.state_dict().items()}, str(weights))
    out = tmp_path / "c.pt"
    code, _, err = cli(["compress", "timm:test_resnet", "--weights", str(weights), "--img-size", "32", "--workers", "0",
                        "--num-classes", "3", "--data", str(data), "--out", str(out), "--max-steps", "1",
                        "--batch-size", "4", "--quiet"], capsys)
    assert code == 0, err
    code, stdout, _ = cli(["eval", str(out), "--compare-fp", "--weights", str(weights), "--workers", "0", "--json"],
                          capsys)
    res = json.loads(stdout)
    assert code == 0 and res["fp_weights"] == str(weights)
    assert res["drop"] == pytest.approx(res["fp_top1"] - res["top1"])
    assert res["fp_top1"] == pytest.approx(res["compress_fp_top1"])  # the same FP model, the same images

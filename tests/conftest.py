"""Shared fixtures: small generated image folders and tiny settings for speed."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("NO_COLOR", "1")


def make_image_folder(
    root: Path,
    classes: tuple[str, ...] = ("cat", "dog", "fox"),
    per_class: int = 6,
    val_per_class: int = 3,
    size: int = 40,
    seed: int = 0,
    modes: tuple[str, ...] = ("RGB",),
) -> Path:
    """An ImageNet-style folder ``root/{train,val}/<class>/*.png`` of learnable images.

    Each class has its own colour and stripe orientation plus noise, so a tiny
    model can tell them apart in a few steps. ``modes`` cycles through PIL
    modes (``L``, ``RGBA``, ``P``) to exercise conversion.
    """
    from PIL import Image

    rng = random.Random(seed)
    palette = [(220, 40, 40), (40, 200, 60), (50, 70, 230), (230, 200, 40), (160, 60, 200), (40, 200, 200)]
    for split, count in (("train", per_class), ("val", val_per_class)):
        for ci, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            base = palette[ci % len(palette)]
            for i in range(count):
                img = Image.new("RGB", (size, size))
                px = img.load()
                for y in range(size):
                    for x in range(size):
                        stripe = ((x if ci % 2 else y) // 4) % 2
                        px[x, y] = tuple(int(max(0, min(255, c * (0.6 + 0.4 * stripe) + rng.randint(-30, 30)))) for c in base)
                mode = modes[(ci + i) % len(modes)]
                if mode != "RGB":
                    img = img.convert(mode)
                img.save(folder / f"{name}_{i:03d}.png")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "data")


TINY = ["timm:test_resnet", "--no-pretrained", "--img-size", "32", "--workers", "0", "--num-classes", "3"]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """``codeq ARGS`` in this process: (exit code, stdout, stderr)."""
    from codeq_cli.cli.app import main

    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def weights_only_checkpoint(folder: Path) -> Path:
    """A saved test_resnet checkpoint, weights at 4 bits, activations float (no act_bits)."""
    from codeq_cli.core.bops import measure_macs
    from codeq_cli.core.insert import quantize_
    from codeq_cli.formats import checkpoint
    from codeq_cli.models.factory import DataConfig, ModelSpec, create

    spec = ModelSpec("timm", "test_resnet", num_classes=4)
    model = create(spec)
    macs = measure_macs(model, (3, 32, 32))
    quantize_(model, bits=4)
    path = folder / "w.codeq"
    checkpoint.save(path, model, spec=spec, data_config=DataConfig(input_size=(3, 32, 32)), class_names=None,
                    recipe={}, provenance={}, metrics={}, macs=macs)
    return path

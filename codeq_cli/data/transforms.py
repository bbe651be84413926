"""Preprocessing that follows the model: sizes, mean/std, interpolation and crop from its data config.

Training: ``RandomResizedCrop`` at the model's input size and interpolation
(crop scale from the recipe) plus a horizontal flip; evaluation: resize to
``size / crop_pct`` and centre-crop. Both normalize with the model's mean and
std. Never hard-coded ImageNet numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from codeq_cli.errors import UsageError
from codeq_cli.models.factory import DataConfig


def _interpolation(name: str):
    from torchvision.transforms import InterpolationMode

    key = str(name).lower().strip()
    if key == "random":  # timm's train-time choice; one fixed mode keeps runs reproducible
        key = "bilinear"
    try:
        return InterpolationMode(key)
    except ValueError:
        allowed = ", ".join(m.value for m in InterpolationMode)
        raise UsageError(f"interpolation {name!r} in the model's data config is not known", hint=f"use one of {allowed}") from None


def image_mode(data_config: DataConfig) -> str:
    """``"RGB"`` for three-channel models, ``"L"`` for one-channel ones."""
    c = int(data_config.input_size[0])
    if c == 3:
        return "RGB"
    if c == 1:
        return "L"
    raise UsageError(f"the model takes {c} input channels; image folders give 1 (L) or 3 (RGB)", hint="use a model with in_chans 1 or 3")


def _norm_stats(data_config: DataConfig) -> tuple[list[float], list[float]]:
    c = int(data_config.input_size[0])
    mean, std = [float(x) for x in data_config.mean], [float(x) for x in data_config.std]
    if c == 1 and len(mean) == 3:  # an RGB config on a greyscale model: the channel average
        mean, std = [sum(mean) / 3], [sum(std) / 3]
    if len(mean) != c or len(std) != c:
        raise UsageError(
            f"the data config's mean/std have {len(mean)}/{len(std)} values for a {c}-channel model",
            hint="give one mean and std per input channel",
        )
    return mean, std


def eval_resize(data_config: DataConfig) -> int | tuple[int, int]:
    """The resize before the centre crop: ``floor(size / crop_pct)`` (timm's rule)."""
    _, h, w = (int(x) for x in data_config.input_size)
    crop_pct = float(data_config.crop_pct)
    if not 0 < crop_pct <= 1:
        raise UsageError(f"crop_pct={crop_pct} in the model's data config is out of range", hint="use a value in (0, 1]")
    if h == w:
        return math.floor(h / crop_pct)
    return (math.floor(h / crop_pct), math.floor(w / crop_pct))


def build_transform(
    data_config: DataConfig,
    train: bool,
    *,
    crop_scale: Sequence[float] = (0.08, 1.0),
    hflip: bool = True,
):
    """The train or eval transform for ``data_config`` (PIL image → normalized tensor)."""
    from torchvision import transforms as T

    _, h, w = (int(x) for x in data_config.input_size)
    interp = _interpolation(data_config.interpolation)
    mean, std = _norm_stats(data_config)
    if train:
        steps: list[Any] = [T.RandomResizedCrop((h, w), scale=tuple(float(s) for s in crop_scale), interpolation=interp)]
        if hflip:
            steps.append(T.RandomHorizontalFlip())
    else:
        steps = [T.Resize(eval_resize(data_config), interpolation=interp), T.CenterCrop((h, w))]
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)

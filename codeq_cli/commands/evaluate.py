"""``codeq eval``: top-1/top-5 of the decoded model a checkpoint ships.

The model is rebuilt from the file alone (:meth:`CompressedModel.build_model`)
and evaluated with the checkpoint's own data config on ``DIR/val`` (or on DIR
itself when it is a folder of class folders). Without ``--data`` the
validation folder recorded at compress time is used. The arithmetic is the
one compress evaluated in (recorded in the provenance, see
:mod:`codeq_cli.train.precision`), so the two top-1 figures are the same computation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from codeq_cli.errors import UsageError


@dataclass
class EvalOptions:
    checkpoint: Path
    data: Path | None = None
    batch_size: int = 128
    workers: int | None = None  # None: default_workers(), the machine's CPUs up to 4
    device: str | None = None
    compare_fp: bool = False
    weights: Path | None = None
    subset: str | None = None
    # Preprocessing (None: what the checkpoint records, the one compress used).
    crop_pct: float | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    interpolation: str | None = None


def data_folder(requested: Path | None, recorded: str | None) -> tuple[Path, bool]:
    """The folder to evaluate on and whether it came from the checkpoint."""
    if requested is not None:
        return Path(requested), False
    if not recorded:
        raise UsageError("the checkpoint records no data folder", hint="pass --data DIR (a folder with val/ class folders)")
    path = Path(recorded)
    if not path.is_dir():
        raise UsageError(f"the validation folder recorded at compress time ({recorded}) is gone", hint="pass --data DIR")
    return path, True


def run(opts: EvalOptions, on_batch: Callable[[int, int], None] | None = None, on_event=lambda e: None) -> dict:
    """Evaluate the checkpoint; returns ``{"top1", "top5", "samples", "loss", "data", ...}`` (percent)."""
    from codeq_cli.train import dist
    from codeq_cli.formats.checkpoint import load
    from codeq_cli.data.folders import eval_folder
    from codeq_cli.data.loader import build_loader, default_workers
    from codeq_cli.train.accuracy import measure_accuracy
    from codeq_cli.train.precision import Arithmetic, for_device

    if opts.batch_size < 1:
        raise UsageError(f"--batch-size {opts.batch_size} must be at least 1")
    if opts.workers is None:
        opts = replace(opts, workers=default_workers())
    from codeq_cli.commands._stages import chosen_preprocessing, with_preprocessing_flags
    from codeq_cli.train.recipe import Recipe

    checked = with_preprocessing_flags(Recipe(), opts)  # a bad value is refused before any loading
    ckpt = load(opts.checkpoint)
    folder, recorded = data_folder(opts.data, ckpt.data_dir)
    device = dist.resolve_device(opts.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the pin-memory thread uses the current device
    config = chosen_preprocessing(ckpt.data_config, checked)
    dataset = eval_folder(folder, config, class_names=ckpt.class_names, subset=opts.subset)
    if len(dataset) == 0:
        raise UsageError(f"no images to evaluate in {str(folder)!r}", hint="pass a folder with val/<class>/ images")
    on_event({"event": "data", "folder": str(folder), "recorded": recorded, "images": len(dataset)})
    loader = build_loader(dataset, opts.batch_size, workers=opts.workers, pin_memory=device.type == "cuda")
    # The arithmetic compress evaluated in (autocast dtype, memory format), so the figures compare.
    arithmetic, note = for_device(Arithmetic.from_provenance(ckpt.provenance, ckpt.meta.get("recipe")), device)
    if note:
        on_event({"event": "note", "text": note})
    model = ckpt.build_model().to(device)
    if arithmetic.channels_last:
        model.to(memory_format=torch.channels_last)
    res = measure_accuracy(model, loader, device, arithmetic=arithmetic, on_batch=on_batch)
    out = {
        "checkpoint": str(opts.checkpoint),
        "model": ckpt.spec.label,
        "data": str(folder),
        "data_recorded": recorded,
        **res.to_dict(),
        "arithmetic": arithmetic.to_provenance(),
        "compress_fp_top1": (ckpt.metrics or {}).get("fp_top1"),
        "skipped_images": dataset.stats.skipped,
        "preprocessing": {k: v for k, v in config.to_dict().items() if k != "input_size"},
    }
    if opts.compare_fp:
        out.update(_compare_fp(ckpt, opts, dataset, device, on_batch, arithmetic))
    return out


def _compare_fp(ckpt, opts: EvalOptions, dataset, device: torch.device, on_batch, arithmetic) -> dict:
    """The original FP model (``--weights`` or the pretrained weights) on the same images."""
    from codeq_cli.data.loader import build_loader
    from codeq_cli.models.factory import load_model
    from codeq_cli.train.accuracy import measure_accuracy

    spec = ckpt.spec
    loaded = load_model(spec.label, weights=opts.weights, pretrained=opts.weights is None,
                        num_classes=spec.num_classes, in_chans=spec.in_chans)
    loader = build_loader(dataset, opts.batch_size, workers=opts.workers, pin_memory=device.type == "cuda")
    fp = measure_accuracy(loaded.model.to(device), loader, device, arithmetic=arithmetic, on_batch=on_batch)
    return {"fp_top1": fp.top1, "fp_top5": fp.top5, "fp_weights": loaded.weights}

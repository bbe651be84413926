"""ImageNet-style image folders: ``DIR/train/<class>/*`` and ``DIR/val/<class>/*``.

Preprocessing follows the model (:class:`codeq_cli.models.factory.DataConfig`, from
timm's data config or torchvision's weights transforms), never hard-coded
ImageNet numbers: training uses ``RandomResizedCrop`` at the model's input
size and interpolation plus a horizontal flip, evaluation resizes to
``size / crop_pct`` and centre-crops, both normalize with the model's mean and
std. Images are converted to RGB (greyscale, RGBA, palette) or to L for
one-channel models.

A broken image (unreadable, truncated) does not stop an epoch: the dataset
returns a :class:`Broken` sentinel, and the loader
(:mod:`codeq_cli.data.loader`) drops it from the batch, counts it and raises
:class:`~codeq_cli.errors.DataError` once more than ``max_broken`` (10%) of a
pass is broken. Non-image files in class folders are
ignored and counted. Everything counted ends up in the dataset's
:class:`FolderStats`. See ``docs/data.md``.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from codeq_cli.errors import DataError, DataPathError, UsageError, one_line
from codeq_cli.models.factory import DataConfig
from codeq_cli.data.transforms import build_transform, image_mode

# torchvision's list (datasets.folder.IMG_EXTENSIONS), compared case-insensitively.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MAX_BROKEN = 0.10  # share of a pass that may be unreadable before DataError
_EXAMPLES = 5


# -- reading images -------------------------------------------------------------------
def load_image(path: str, mode: str = "RGB"):
    """The decoded image in ``mode``; palette images with transparency go through RGBA."""
    from PIL import Image

    with Image.open(path) as im:
        if im.mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")
        elif im.mode.startswith("I;16") or (im.mode == "I" and im.getextrema()[1] > 255):
            # 16-bit greyscale: scale to 8 bits (convert() alone would clip to white).
            im = im.point(lambda v: v * (1 / 256)).convert("L")
        return im.convert(mode)  # decodes now: a truncated file fails here, inside __getitem__


@dataclass(frozen=True)
class Broken:
    """What the dataset returns for an image it cannot read (dropped by :func:`collate`)."""

    path: str
    reason: str


def _reason(exc: BaseException, path: str = "") -> str:
    text = str(exc)
    if path:  # PIL repeats the path; the message already names it
        text = text.replace(repr(path), "").replace(path, "").rstrip(" :'\"")
    return one_line(text.strip() or type(exc).__name__)


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


@dataclass
class FolderStats:
    """Counts for one split: files listed and ignored, samples delivered and skipped.

    ``skipped`` counts every load of a broken image (once per epoch it occurs);
    ``broken`` holds each broken file once, with the reason. Updated only in
    the main process (by :func:`track`), so worker processes need no locks.
    """

    split: str
    images: int = 0
    ignored: int = 0
    ignored_examples: list[str] = field(default_factory=list)
    loaded: int = 0
    skipped: int = 0
    broken: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for the end-of-run report."""
        parts = [f"{self.split}: {_count(self.images, 'image')}"]
        if self.ignored:
            parts.append(f"{_count(self.ignored, 'non-image file')} ignored")
        if self.broken:
            path, why = next(iter(self.broken.items()))
            parts.append(f"{_count(len(self.broken), 'unreadable image')} skipped (e.g. {path}: {why})")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "images": self.images,
            "ignored": self.ignored,
            "ignored_examples": list(self.ignored_examples),
            "loaded": self.loaded,
            "skipped": self.skipped,
            "broken": dict(self.broken),
        }


class ImageFolder(Dataset):
    """``(image tensor, class index)`` pairs from a list of files; a :class:`Broken` for unreadable ones.

    ``classes`` are the class names in index order. ``ds[(index, seed)]``
    draws the random transform from ``seed`` (the global RNG is left as it
    was), so augmentation can be a function of the sample, not of the worker.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        samples: list[tuple[str, int]],
        classes: list[str],
        transform=None,
        mode: str = "RGB",
        stats: FolderStats | None = None,
    ) -> None:
        self.root = str(root)
        self.samples = samples
        self.classes = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.transform = transform
        self.mode = mode
        self.stats = stats or FolderStats(Path(root).name, images=len(samples))

    @property
    def targets(self) -> list[int]:
        return [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item):
        if isinstance(item, tuple):
            index, seed = item
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(seed))
                return self._get(int(index))
        return self._get(int(item))

    def _get(self, index: int):
        path, target = self.samples[index]
        try:
            image = load_image(path, self.mode)
        except Exception as exc:  # any decoding failure means: this file is unreadable
            return Broken(path, _reason(exc, path))
        if self.transform is not None:
            image = self.transform(image)
        return image, target

    def __repr__(self) -> str:
        return f"ImageFolder({self.root!r}, {len(self)} images, {len(self.classes)} classes, mode={self.mode})"


# -- folders ------------------------------------------------------------------------------
def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _scan(folder: Path) -> tuple[list[str], list[str]]:
    """Image files under ``folder`` (recursively, sorted) and the other files."""
    images: list[str] = []
    other: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            (images if _is_image(name) and not name.startswith(".") else other).append(os.path.join(dirpath, name))
    return images, other


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def _names(items: Iterable[str], limit: int = _EXAMPLES) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def _read_split(split_dir: Path, label: str) -> tuple[list[str], dict[str, list[str]], FolderStats]:
    """Class names, each class's image files, and the split's counts; errors for empty folders."""
    classes = _class_dirs(split_dir)
    if not classes:
        loose, _ = _scan(split_dir)
        if loose:
            raise DataError(
                f"{label} holds images but no class folders",
                hint=f"put each class's images in its own folder: {label}/<class>/*.jpg",
            )
        raise DataError(f"{label} has no class folders", hint=f"expected {label}/<class>/*.jpg")
    files: dict[str, list[str]] = {}
    stats = FolderStats(split_dir.name)
    empty: list[str] = []
    for c in classes:
        images, other = _scan(split_dir / c)
        files[c] = images
        stats.images += len(images)
        stats.ignored += len(other)
        stats.ignored_examples += other[: max(0, _EXAMPLES - len(stats.ignored_examples))]
        if not images:
            empty.append(c)
    if stats.images == 0:
        extra = f" ({_count(stats.ignored, 'other file')})" if stats.ignored else ""
        raise DataError(
            f"{label} holds no images{extra}", hint=f"codeq reads {', '.join(IMG_EXTENSIONS)} files in {label}/<class>/"
        )
    if empty:
        noun = "class folder" if len(empty) == 1 else f"{len(empty)} class folders"
        raise DataError(
            f"{noun} in {label} {'has' if len(empty) == 1 else 'have'} no images: {_names(empty)}",
            hint=f"add images ({', '.join(IMG_EXTENSIONS[:3])}, ...) or remove the folder from both train/ and val/",
        )
    return classes, files, stats


def parse_subset(value: float | int | str | None) -> float | int | None:
    """``--subset``: a fraction in (0, 1) (``0.1``, ``10%``) or a number of images per class (``50``)."""
    if value is None:
        return None
    hint = "use a fraction in (0, 1) such as 0.1, or images per class such as 50"
    if isinstance(value, bool):
        raise UsageError(f"--subset {value!r} is not a number", hint=hint)
    if isinstance(value, str):
        text = value.strip()
        try:
            if text.endswith("%"):
                value = float(text[:-1]) / 100
            elif text.isdigit():
                value = int(text)
            else:
                value = float(text)
        except ValueError:
            raise UsageError(f"--subset {text!r} is not a number", hint=hint) from None
    if isinstance(value, int):
        if value < 1:
            raise UsageError(f"--subset {value} images per class is too few", hint=hint)
        return value
    if isinstance(value, float) and 0 < value < 1:
        return value
    raise UsageError(f"--subset {value!r} is out of range", hint=hint)


def _take(files: list[str], subset: float | int | None, seed: int, split: str, cls: str) -> list[str]:
    if subset is None:
        return files
    n = len(files)
    k = min(n, subset) if isinstance(subset, int) else max(1, round(subset * n))
    if k >= n:
        return files
    # A string seed is hashed with SHA-512: the same choice in every process and run.
    picked = random.Random(f"codeq-subset/{seed}/{split}/{cls}").sample(range(n), k)
    return [files[i] for i in sorted(picked)]


def _samples(files: dict[str, list[str]], classes: list[str], subset, seed: int, split: str) -> list[tuple[str, int]]:
    index = {c: i for i, c in enumerate(classes)}
    return [(p, index[c]) for c in sorted(files) for p in _take(files[c], subset, seed, split, c)]


def _check_dir(path: Path, what: str, hint: str = "pass a folder with train/ and val/ class folders") -> None:
    # A path that is not there is a usage error (exit 2); what a folder holds is a DataError (exit 1).
    if not path.exists():
        raise DataPathError(f"{what} {str(path)!r} does not exist", hint=hint)
    if not path.is_dir():
        raise DataPathError(f"{what} {str(path)!r} is a file, not a folder", hint=hint)


def check_root(data_dir: str | os.PathLike | None) -> Path:
    """The ``--data`` folder, once it is known to hold ``train/`` and ``val/``.

    Cheap, so callers run it before anything slow (a model download): a typo
    in the path is one error line at once.
    """
    if data_dir is None or str(data_dir).strip() == "":
        raise UsageError("--data is required", hint="pass a folder with train/ and val/ class folders")
    root = Path(data_dir).expanduser()
    _check_dir(root, "--data")
    missing = [s for s in ("train", "val") if not (root / s).is_dir()]
    if missing:
        what = " or ".join(f"{s}/" for s in missing)
        has_classes = bool(_class_dirs(root)) and not (root / "train").is_dir() and not (root / "val").is_dir()
        hint = (
            "it looks like a folder of class folders: split it into train/<class>/ and val/<class>/"
            if has_classes and len(missing) == 2
            else f"expected {root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg"
        )
        raise DataError(f"--data {str(root)!r} has no {what} folder", hint=hint)
    return root


def class_folders(data_dir: str | os.PathLike) -> list[str]:
    """The class names of ``data_dir/train`` (sorted folder names), without reading any image."""
    return _class_dirs(Path(data_dir) / "train")


def build_datasets(
    data_dir: str | os.PathLike | None,
    data_config: DataConfig,
    subset: float | int | str | None = None,
    seed: int = 0,
    *,
    crop_scale: Sequence[float] = (0.08, 1.0),
    hflip: bool = True,
    subset_val: bool = True,
) -> tuple[ImageFolder, ImageFolder, list[str]]:
    """``(train, val, class_names)`` from ``data_dir/train`` and ``data_dir/val``.

    Classes are the sorted folder names of ``train/``; ``val/`` must have the
    same ones. ``subset`` (a fraction or a count per class, see
    :func:`parse_subset`) picks the same files for the same ``seed``, in both
    splits unless ``subset_val=False``.
    """
    root = check_root(data_dir)
    subset = parse_subset(subset)
    mode = image_mode(data_config)
    train_classes, train_files, train_stats = _read_split(root / "train", f"{root}/train")
    val_classes, val_files, val_stats = _read_split(root / "val", f"{root}/val")
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        parts = []
        if only_train:
            parts.append(f"only in train/: {_names(only_train)}")
        if only_val:
            parts.append(f"only in val/: {_names(only_val)}")
        raise DataError(
            f"train/ and val/ in {str(root)!r} have different classes ({'; '.join(parts)})",
            hint="every class needs a folder in both",
        )
    classes = train_classes
    train_samples = _samples(train_files, classes, subset, seed, "train")
    val_samples = _samples(val_files, classes, subset if subset_val else None, seed, "val")
    train_stats.images, val_stats.images = len(train_samples), len(val_samples)
    train_tf = build_transform(data_config, True, crop_scale=crop_scale, hflip=hflip)
    val_tf = build_transform(data_config, False)
    train = ImageFolder(root / "train", train_samples, classes, train_tf, mode, train_stats)
    val = ImageFolder(root / "val", val_samples, classes, val_tf, mode, val_stats)
    return train, val, classes


def eval_folder(
    path: str | os.PathLike,
    data_config: DataConfig,
    class_names: Sequence[str] | None = None,
    subset: float | int | str | None = None,
    seed: int = 0,
) -> ImageFolder:
    """The evaluation set for ``codeq eval``: ``path/val`` when it exists, else ``path`` as class folders.

    With ``class_names`` (the checkpoint's), targets index that list and the
    folder may hold a subset of those classes, but no others.
    """
    root = Path(path).expanduser()
    _check_dir(root, "--data", hint="pass a folder with val/<class>/ images, or a folder of class folders")
    if (root / "val").is_dir():
        split_dir = root / "val"
    elif (root / "train").is_dir():
        raise DataError(f"--data {str(root)!r} has train/ but no val/ folder", hint="pass the validation folder itself or add val/")
    else:
        split_dir = root
    found, files, stats = _read_split(split_dir, str(split_dir))
    if class_names is None:
        classes = found
    else:
        classes = list(class_names)
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise DataError(
                f"{str(split_dir)!r} has class folders the model does not know: {_names(unknown)}",
                hint=f"the model's {len(classes)} classes are {_names(classes)}",
            )
    samples = _samples(files, classes, parse_subset(subset), seed, "val")
    stats.images = len(samples)
    return ImageFolder(split_dir, samples, classes, build_transform(data_config, False), image_mode(data_config), stats)

"""The small real dataset that ships with codeq: a class-balanced Fashion-MNIST subset.

Fashion-MNIST (Xiao, Rasul, Vollgraf 2017; github.com/zalandoresearch/fashion-mnist,
MIT licence) holds 28x28 greyscale photographs of clothing in 10 classes. codeq
bundles the first 600 training images of each class (6,000) and the first 100
test images of each class (1,000) in the dataset's own IDX format, gzipped,
under ``codeq_cli/data/`` (about 3 MB). ``codeq demo`` writes them out as an
ImageNet-style folder and runs the real pipeline on it.

Maintainers rebuild the subset from the Debian package ``dataset-fashion-mnist``::

    python -m codeq_cli.data.fashion_mnist /usr/share/datasets/fashion-mnist
"""

from __future__ import annotations

import gzip
import struct
import sys
from importlib import resources
from pathlib import Path

CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")
TRAIN_PER_CLASS = 600
VAL_PER_CLASS = 100
_FILES = {
    "train": ("fashion-mnist-train-images-idx3-ubyte.gz", "fashion-mnist-train-labels-idx1-ubyte.gz"),
    "val": ("fashion-mnist-val-images-idx3-ubyte.gz", "fashion-mnist-val-labels-idx1-ubyte.gz"),
}
LICENSE = "MIT (Copyright (c) 2017 Zalando SE); https://github.com/zalandoresearch/fashion-mnist"


def _read_idx(data: bytes) -> tuple[tuple[int, ...], bytes]:
    magic = struct.unpack(">I", data[:4])[0]
    if magic >> 8 != 0x08:  # unsigned byte data
        raise ValueError("not an IDX file of unsigned bytes")
    ndim = magic & 0xFF
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    body = data[4 + 4 * ndim :]
    n = 1
    for d in dims:
        n *= d
    if len(body) != n:
        raise ValueError("IDX file is truncated")
    return dims, body


def _write_idx(dims: tuple[int, ...], body: bytes) -> bytes:
    header = struct.pack(">I", 0x0800 | len(dims)) + struct.pack(">" + "I" * len(dims), *dims)
    return gzip.compress(header + body, compresslevel=9, mtime=0)


def read_images(images_gz: bytes, labels_gz: bytes) -> tuple[list[bytes], list[int]]:
    """Images (28*28 bytes each, row-major) and labels from a pair of gzipped IDX files."""
    dims, body = _read_idx(gzip.decompress(images_gz))
    _, labels = _read_idx(gzip.decompress(labels_gz))
    size = dims[1] * dims[2]
    return [body[i * size : (i + 1) * size] for i in range(dims[0])], list(labels)


def load_split(split: str) -> tuple[list[bytes], list[int]]:
    """The bundled images (28*28 bytes each, row-major) and labels of ``train`` or ``val``."""
    img_name, lab_name = _FILES[split]
    pkg = resources.files("codeq_cli") / "data"
    return read_images((pkg / img_name).read_bytes(), (pkg / lab_name).read_bytes())


def write_split(folder: Path, images: list[bytes], labels: list[int]) -> None:
    """``folder/<class>/<n>.png`` for every image."""
    from PIL import Image

    for name in CLASSES:
        (folder / name).mkdir(parents=True, exist_ok=True)
    for i, (img, label) in enumerate(zip(images, labels)):
        Image.frombytes("L", (28, 28), img).save(folder / CLASSES[label] / f"{i:05d}.png", optimize=False)


def write_image_folder(root: Path) -> Path:
    """``root/{train,val}/<class>/<n>.png`` from the bundled data (skipped if already complete)."""
    root = Path(root)
    marker = root / ".complete"
    if marker.exists():
        return root
    for split in ("train", "val"):
        write_split(root / split, *load_split(split))
    marker.write_text("ok\n")
    return root


def build(src: Path, dst: Path) -> None:
    """Write the class-balanced subset of the full dataset in ``src`` to ``dst``."""
    sources = {
        "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", TRAIN_PER_CLASS),
        "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", VAL_PER_CLASS),
    }
    dst.mkdir(parents=True, exist_ok=True)
    for split, (img_file, lab_file, per_class) in sources.items():
        dims, body = _read_idx(gzip.decompress((src / img_file).read_bytes()))
        _, labels = _read_idx(gzip.decompress((src / lab_file).read_bytes()))
        size = dims[1] * dims[2]
        taken = {c: 0 for c in range(len(CLASSES))}
        keep = []
        for i, label in enumerate(labels):
            if taken[label] < per_class:
                taken[label] += 1
                keep.append(i)
        out_img = b"".join(body[i * size : (i + 1) * size] for i in keep)
        out_lab = bytes(labels[i] for i in keep)
        img_name, lab_name = _FILES[split]
        (dst / img_name).write_bytes(_write_idx((len(keep), dims[1], dims[2]), out_img))
        (dst / lab_name).write_bytes(_write_idx((len(keep),), out_lab))


if __name__ == "__main__":  # pragma: no cover - maintainers' tool
    build(Path(sys.argv[1]), Path(__file__).parent)

"""Files that are never half-written, and reads that never run code.

Every file codeq writes goes to a temporary file in the destination folder,
is flushed and fsynced, then ``os.replace``d over the target: a kill at any
moment leaves either the old file or the new one. A failed write (disk full,
permissions) removes the temporary file and raises :class:`CodeqError` naming
the path; the previous file stays intact.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from codeq_cli.errors import CodeqError, UsageError


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success it replaces ``path``."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.exists():
        raise UsageError(f"folder {str(folder)!r} for {str(target)!r} does not exist", hint="create it first or choose another output path")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise CodeqError(f"cannot write to {str(folder)!r} ({exc.strerror})", hint="choose a folder you can write to") from exc
    umask = os.umask(0)
    os.umask(umask)
    with contextlib.suppress(OSError):
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        _fsync_dir(folder)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            why = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
            raise CodeqError(f"writing {str(target)!r} failed: {why}", hint="the previous file, if any, is unchanged") from exc
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_with(path: str | os.PathLike, writer: Callable[[IO], None]) -> None:
    """Call ``writer(fh)`` on a temporary file that then replaces ``path``."""
    with atomic_open(path, "wb") as fh:
        writer(fh)


def _json_default(obj):
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def torch_save_atomic(obj, path: str | os.PathLike) -> None:
    """``torch.save`` of plain containers of tensors, atomically."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getvalue())


def torch_load_safe(path: str | os.PathLike):
    """``torch.load`` that can only build tensors and plain containers (``weights_only``)."""
    import torch

    return torch.load(str(path), map_location="cpu", weights_only=True)

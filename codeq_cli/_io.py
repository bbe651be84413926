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
import glob
import io
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from codeq_cli.errors import CodeqError, UsageError, one_line


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
            raise CodeqError(f"writing {str(target)!r} failed: {_why(exc)}", hint="the previous file, if any, is unchanged") from exc
        raise


def _why(exc: OSError) -> str:
    return "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else (exc.strerror or str(exc))


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line to a log such as ``metrics.jsonl``.

    One ``write`` with ``O_APPEND``, so a kill leaves whole lines; a failure
    (disk full) raises :class:`CodeqError` naming the file, the earlier lines kept.
    """
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
    except OSError as exc:
        raise CodeqError(f"writing {str(path)!r} failed: {_why(exc)}", hint="the lines written before are kept") from exc


def remove_stale_temps(path: str | os.PathLike) -> int:
    """Delete the temporary files a killed writer of ``path`` left beside it; returns how many.

    Call it only when nothing else is writing ``path`` (at the start of a run).
    """
    target = Path(path)
    removed = 0
    for tmp in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()
            removed += 1
    return removed


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


class UnsafeFile(ValueError):
    """A file that :func:`torch_load_safe` refused: loading it would mean unpickling Python objects."""


class UnreadableFile(ValueError):
    """A file :func:`torch_load_safe` could not read (empty, truncated, another format)."""


def torch_load_safe(path: str | os.PathLike):
    """``torch.load`` that can only build tensors and plain containers (``weights_only``).

    Failures are :class:`UnsafeFile` (the file asks to import code; nothing of
    it ran) or :class:`UnreadableFile`, each with a one-line reason short
    enough to quote in an error message.
    """
    import warnings

    import torch

    with open(path, "rb"):  # a missing or unreadable path fails here, as an OSError
        pass
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols before refusing
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise load_refusal(path, exc) from exc


def load_refusal(path: str | os.PathLike, exc: BaseException) -> UnsafeFile | UnreadableFile:
    """What a ``weights_only`` ``torch.load`` failure on ``path`` means, as the error to raise."""
    import pickle

    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError:
        head = b""
    # timm's loader re-raises torch's UnpicklingError as a RuntimeError ("Unsupported globals: ...").
    chain = [e for e in (exc, exc.__cause__, exc.__context__) if e is not None]
    if any(isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e) for e in chain):
        found = next((m for e in chain for m in [re.search(r"(?:GLOBAL|Unsupported globals:) ([\w.]+)", str(e))] if m), None)
        if found:
            return UnsafeFile(f"it holds Python objects other than tensors ({found.group(1)}); unpickling them "
                              "could run code, so it was not loaded")
        if head[:1] == b"\x80":
            return UnsafeFile("it is a plain Python pickle, not a torch.save file of tensors; unpickling it could "
                              "run code, so it was not loaded")
    return UnreadableFile(_load_failure(head, exc))


def _load_failure(head: bytes, exc: BaseException) -> str:
    if not head:
        return "the file is empty (0 bytes)"
    if head.startswith(b"CODEQ"):
        return "it is a compressed codeq checkpoint, not a torch.save file"
    if head.startswith(b"PK\x03\x04"):
        return "the PyTorch archive is damaged or truncated"
    return f"it is not a file written by torch.save ({_short(exc)})"


def _short(exc: BaseException) -> str:
    # torch.load's refusal ends with a line pointing at its documentation: quote the line before it.
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return one_line(exc, 80, line=-2 if len(lines) > 2 and lines[-1].startswith("Check the documentation") else -1)

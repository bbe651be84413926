"""Entropy coding of one layer's integer codes, close to the order-0 bound.

A layer's codes are coded against that layer's own symbol frequencies with an
ANS coder (``constriction.stream.stack.AnsCoder`` and a
``constriction.stream.model.Categorical`` built from the counts), so the coded
size is within a few bytes of ``Σ n · H(codes)``, the order-0 entropy of the
layer (:func:`entropy_bound_bits`).

A coded layer (a *blob*) is self-contained given the number of codes:

    varint K                       number of distinct symbols (0 for an empty layer)
    K × (int8 symbol, varint count)  in increasing symbol order
    uint32 words, little-endian    the ANS stream (absent when K ≤ 1)

Varints are unsigned LEB128. A layer holding one symbol only (all zeros, say)
costs its table alone: the counts say everything. The Categorical model is
built from the counts as float64 with ``perfect=False``; encoder and decoder
build it from the same integers, so they agree exactly. The table lists the
symbols that occur, so no probability mass is spent on absent codes.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from codeq_cli.errors import one_line

CODER = {"name": "ans-categorical", "library": "constriction", "word_bits": 32, "perfect": False}


def _constriction():
    import constriction

    return constriction


def coder_info() -> dict:
    """What :func:`encode` uses, for the checkpoint's metadata."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("constriction")
    except PackageNotFoundError:  # pragma: no cover
        v = "unknown"
    return {**CODER, "version": v}


def _as_int8(codes: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(codes, Tensor):
        codes = codes.detach().to("cpu").contiguous().numpy()
    arr = np.ascontiguousarray(codes).reshape(-1)
    if arr.dtype != np.int8:
        if arr.size and (arr.min() < -128 or arr.max() > 127):
            raise ValueError("codes outside the int8 range")
        arr = arr.astype(np.int8)
    return arr


def symbol_counts(codes: Tensor | np.ndarray) -> dict[int, int]:
    """``{symbol: count}`` over the codes that occur, in increasing symbol order."""
    arr = _as_int8(codes)
    hist = np.bincount(arr.astype(np.int16) + 128, minlength=256)
    return {int(s) - 128: int(c) for s, c in enumerate(hist) if c}


def bound_bits_from_counts(counts: Mapping[int, int] | list[int] | np.ndarray) -> float:
    """``Σ −c · log2(c / n)`` over the counts: the order-0 entropy bound in bits."""
    values = np.asarray(list(counts.values()) if isinstance(counts, Mapping) else counts, dtype=np.float64)
    values = values[values > 0]
    n = values.sum()
    if n == 0:
        return 0.0
    return max(0.0, float(-(values * np.log2(values / n)).sum()))


def entropy_bound_bits(codes: Tensor | np.ndarray) -> float:
    """The order-0 entropy bound of one tensor of codes, ``n · H(codes)``, in bits."""
    return bound_bits_from_counts(symbol_counts(codes))


# -- varints --------------------------------------------------------------------


def _put_varint(out: bytearray, value: int) -> None:
    if value < 0:
        raise ValueError("varint of a negative number")
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return


def _get_varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("frequency table runs past the end of the layer")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("frequency table holds an oversized count")


# -- coding ---------------------------------------------------------------------


def encode(codes: Tensor | np.ndarray) -> bytes:
    """The blob of one layer's codes (see the module docstring for the layout)."""
    arr = _as_int8(codes)
    counts = symbol_counts(arr)
    out = bytearray()
    _put_varint(out, len(counts))
    for s, c in counts.items():
        out += int(s).to_bytes(1, "little", signed=True)
        _put_varint(out, c)
    if len(counts) > 1:
        symbols = np.fromiter(counts.keys(), dtype=np.int16, count=len(counts))
        lut = np.zeros(256, dtype=np.int32)
        lut[symbols + 128] = np.arange(len(counts), dtype=np.int32)
        index = lut[arr.astype(np.int16) + 128]
        cs = _constriction()
        model = cs.stream.model.Categorical(np.fromiter(counts.values(), dtype=np.float64), perfect=False)
        coder = cs.stream.stack.AnsCoder()
        coder.encode_reverse(index, model)
        out += coder.get_compressed().astype("<u4", copy=False).tobytes()
    return bytes(out)


def read_table(blob: bytes | memoryview) -> tuple[dict[int, int], int]:
    """``(counts, offset of the ANS words)`` of a blob, without decoding it."""
    k, pos = _get_varint(blob, 0)
    if k > 256:
        raise ValueError(f"frequency table claims {k} symbols (at most 256)")
    counts: dict[int, int] = {}
    last = -129
    for _ in range(k):
        if pos >= len(blob):
            raise ValueError("frequency table runs past the end of the layer")
        s = int.from_bytes(bytes(blob[pos : pos + 1]), "little", signed=True)
        c, pos = _get_varint(blob, pos + 1)
        if s <= last or c == 0:
            raise ValueError("frequency table is not in increasing symbol order with non-zero counts")
        counts[s] = c
        last = s
    return counts, pos


def decode(blob: bytes | memoryview, numel: int) -> np.ndarray:
    """The ``numel`` int8 codes of a blob, flat; ``ValueError`` when the blob is inconsistent."""
    counts, pos = read_table(blob)
    total = sum(counts.values())
    if total != numel:
        raise ValueError(f"frequency table counts {total} codes, the layer has {numel}")
    symbols = np.fromiter(counts.keys(), dtype=np.int8, count=len(counts))
    if len(counts) == 0:
        return np.zeros(0, dtype=np.int8)
    if len(counts) == 1:
        if pos != len(blob):
            raise ValueError("a single-symbol layer carries coded data")
        return np.full(numel, symbols[0], dtype=np.int8)
    rest = len(blob) - pos
    if rest == 0 or rest % 4:
        raise ValueError("coded data is not a whole number of 32-bit words")
    words = np.frombuffer(blob, dtype="<u4", offset=pos).astype(np.uint32)
    cs = _constriction()
    model = cs.stream.model.Categorical(np.fromiter(counts.values(), dtype=np.float64), perfect=False)
    try:
        coder = cs.stream.stack.AnsCoder(words)
        index = coder.decode(model, numel)
    except BaseException as exc:  # constriction raises pyo3's PanicException (a BaseException) on bad data
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise ValueError(f"coded data does not decode ({one_line(exc, 80)})") from None
    if index.size != numel or (numel and (index.min() < 0 or index.max() >= len(counts))):
        raise ValueError("coded data decodes to symbols outside the table")
    out = symbols[index]
    check = np.bincount(index, minlength=len(counts))
    if not np.array_equal(check, np.fromiter(counts.values(), dtype=np.int64, count=len(counts))):
        raise ValueError("decoded symbols do not match the frequency table")
    return out


def to_tensor(flat: np.ndarray, shape: tuple[int, ...]) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(flat)).reshape(shape)

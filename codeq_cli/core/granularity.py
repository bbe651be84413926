"""How many ranges a weight quantizer has: the granularity of ``R``, ``s`` and ``δ``.

In the way torchao names them (``torchao.quantization.granularity.PerTensor``,
``PerRow``): a small frozen value that says over which elements of a weight one
range is taken. CoDeQ (``docs/method.md``, "The quantizer") has one range per
weight tensor, :class:`PerTensor`, the only granularity codeq implements today.

Everything in :mod:`codeq_cli.core` that depends on "one scale per layer" asks
the granularity instead: the number of ranges of a weight (:meth:`Granularity.ranges`,
the segments of the one-pass quantizer in :mod:`codeq_cli.core._group`) and
the shape of its scalars (:meth:`Granularity.scalar_shape`). Per-channel ranges
(what TensorRT and ONNX Runtime use for weights) would be one more subclass here
(each output channel one segment: an output channel's weights are contiguous in
memory in both the contiguous and the channels_last layout) plus the places
outside core that store one step per layer (the checkpoint format, the int8
export), listed in ``docs/performance.md``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Granularity:
    """Base of the granularities; use a subclass."""

    def ranges(self, shape: tuple[int, ...]) -> int:
        """Number of ranges (``R``, ``s``, ``δ`` triples) of a weight of this shape."""
        raise NotImplementedError

    def scalar_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the tensors ``R``, ``s``, ``δ`` of a weight of this shape."""
        raise NotImplementedError


@dataclass(frozen=True)
class PerTensor(Granularity):
    """One range for the whole weight tensor (the paper's quantizer)."""

    def ranges(self, shape: tuple[int, ...]) -> int:
        return 1

    def scalar_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return ()


def check(granularity: object) -> Granularity:
    """``granularity`` if codeq implements it; a ``ValueError`` that says what to use otherwise."""
    if isinstance(granularity, PerTensor):
        return granularity
    raise ValueError(f"granularity={granularity!r}: codeq implements PerTensor() only (one range per weight tensor)")

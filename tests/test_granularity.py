"""``Granularity`` (``codeq_cli.core.granularity``): the weight quantizer's range is per tensor today."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from codeq_cli.core.granularity import Granularity, PerTensor, check
from codeq_cli.core.quantizer import DeadZoneQuantizer


def test_per_tensor_is_one_range_of_scalars():
    g = PerTensor()
    assert g == PerTensor() and hash(g) == hash(PerTensor())  # a value
    assert g.ranges((64, 3, 7, 7)) == 1 and g.scalar_shape((64, 3, 7, 7)) == ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.x = 1  # type: ignore[attr-defined]


def test_the_quantizer_takes_it_and_refuses_what_is_not_implemented():
    qz = DeadZoneQuantizer(4, granularity=PerTensor())
    assert qz.granularity == PerTensor()
    assert DeadZoneQuantizer(4).granularity == PerTensor()  # the default
    R = qz.absmax(torch.randn(8, 3, 3, 3))
    assert R.shape == qz.granularity.scalar_shape((8, 3, 3, 3))

    @dataclasses.dataclass(frozen=True)
    class PerRow(Granularity):
        def ranges(self, shape):
            return shape[0]

    with pytest.raises(ValueError, match=r"PerTensor\(\) only"):
        DeadZoneQuantizer(4, granularity=PerRow())
    with pytest.raises(ValueError, match=r"PerTensor\(\) only"):
        check("per_tensor")

"""The checkpoint's JSON metadata as a strict pydantic model.

A file whose checksum matches can still be crafted, and the report formats
these values without further checks, so every field the reader uses is typed
and bounded here: strict types (no ``true`` for a count, no string for a
number), finite numbers, spans inside the payload, float32-exact steps and
shifts, and the stored keys matching ``state_keys``. Unknown keys are kept
(a newer codeq of the same format version may add some).
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_serializer, model_validator

from codeq_cli.core.quantizer import B_MAX, B_MIN
from codeq_cli.errors import one_line
from codeq_cli.formats import history as history_format

Count = Annotated[int, Field(ge=0)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
Shape = list[Count]

# Stored dtypes: numpy's little-endian names.
STORED_DTYPES = ("<f4", "<i8", "<i4", "<i2", "|i1", "|u1", "|b1")


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class ModelMeta(_Strict):
    source: Literal["timm", "torchvision"]
    name: Annotated[str, Field(pattern=r"\S")]
    num_classes: Annotated[int, Field(ge=1)] | None = None
    in_chans: Annotated[int, Field(ge=1)] = 3


class DataConfigMeta(_Strict):
    input_size: Annotated[list[Annotated[int, Field(ge=1, le=65536)]], Field(min_length=3, max_length=3)]
    mean: Annotated[list[Finite], Field(min_length=1)]
    std: Annotated[list[Finite], Field(min_length=1)]
    interpolation: str = "bilinear"
    crop_pct: Finite = 0.875


class RowMeta(_Strict):
    """One :class:`~codeq_cli.core.bops.LayerRow`, exactly its fields."""

    name: str
    kind: str
    shape: Shape
    params: Count
    macs: Count
    bits: Count
    sparsity: Finite
    bops: Finite
    quantized: bool
    act_bits: Annotated[int, Field(ge=B_MIN, le=32)] = 32  # codeq's extension; absent: float activations


class _Span(_Strict):
    offset: Count
    nbytes: Count


class LayerMeta(_Span):
    name: str
    param: str
    shape: Shape
    bits: Annotated[int, Field(ge=B_MIN, le=B_MAX)]
    step: Finite
    shift: Finite
    crc32: Count

    @field_validator("step", "shift")
    @classmethod
    def _float32(cls, v: float) -> float:
        if float(np.float32(v)) != v:
            raise ValueError("is not a float32 value")
        return v


class ActivationMeta(_Strict):
    """One activation quantizer (codeq's extension): its module, bit-width, sign and step.

    ``at``: on the module's input (absent: files written before residual
    quantizers had only these) or its output; ``feeds``: the quantized layers
    that read the tensor (absent: the module itself for an input quantizer,
    none for an output one).
    """

    name: str
    bits: Annotated[int, Field(ge=B_MIN, le=B_MAX)]
    signed: bool
    step: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    at: Literal["input", "output"] = "input"
    feeds: list[str] | None = None

    @model_serializer(mode="wrap")
    def _as_written(self, handler):  # the defaults stay absent, as the writer leaves them
        d = handler(self)
        if d.get("at") == "input":
            del d["at"]
        if d.get("feeds") is None:
            d.pop("feeds", None)
        return d

    @field_validator("step")
    @classmethod
    def _float32(cls, v: float) -> float:
        if float(np.float32(v)) != v:
            raise ValueError("is not a float32 value")
        return v


class TensorMeta(_Span):
    key: str
    dtype: Literal[STORED_DTYPES]  # type: ignore[valid-type]
    shape: Shape

    @model_validator(mode="after")
    def _size(self) -> TensorMeta:
        if math.prod(self.shape) * np.dtype(self.dtype).itemsize != self.nbytes:
            raise ValueError(f"tensor {self.key}: size does not match its shape")
        return self


class CheckpointMeta(_Strict):
    model_config = ConfigDict(strict=True, extra="allow")

    format: Literal["codeq"]
    format_version: Count
    model: ModelMeta
    data_config: DataConfigMeta
    class_names: list[str] | None = None
    recipe: dict
    provenance: dict
    metrics: dict[str, Annotated[int, Field(strict=True)] | Annotated[float, Field(strict=True)] | None]
    macs: dict[str, Count]
    rows: list[RowMeta]
    data_dir: str | None = None
    coder: dict
    state_keys: list[str]
    module_versions: dict[str, Count] | None = None  # format 2: the modules' versions other than 1 (_metadata)
    layers: list[LayerMeta]
    tensors: list[TensorMeta]
    activations: list[ActivationMeta] | None = None
    history: dict | None = None  # optional: the compact training history (formats/history.py)

    @field_validator("history")
    @classmethod
    def _history(cls, v: dict | None) -> dict | None:
        history_format.validate(v)  # one home for its shape; ValueError names the column
        return v

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> CheckpointMeta:
        payload = (info.context or {}).get("payload_len")
        if payload is not None:
            for e in [*self.layers, *self.tensors]:
                if e.offset + e.nbytes > payload:
                    raise ValueError(f"{getattr(e, 'name', None) or getattr(e, 'key', '')}: points outside the payload")
        keys = [e.param for e in self.layers] + [e.key for e in self.tensors]
        if set(self.state_keys) != set(keys):
            raise ValueError("state_keys do not match the stored tensors")
        if not len(self.state_keys) == len(set(keys)) == len(keys):
            raise ValueError("a state-dict key is stored twice")
        return self


def validate(meta: object, payload_len: int) -> dict:
    """The metadata, checked; raises ``ValueError`` with one line naming the first bad field."""
    try:
        checked = CheckpointMeta.model_validate(meta, context={"payload_len": payload_len})
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(part) for part in err["loc"]) or "metadata"
        raise ValueError(f"{where}: {one_line(err['msg'], 100)}") from None
    return checked.model_dump()

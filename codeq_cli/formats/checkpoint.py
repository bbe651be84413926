"""The compressed checkpoint: one self-describing file of plain data.

Layout (all integers little-endian; ``docs/format.md`` is the full reference)::

    offset  size
    0       8    magic  b"CODEQ\\r\\n\\x1a"
    8       2    format version (uint16)
    10      2    flags (uint16, 0)
    12      4    metadata length M (uint32)
    16      8    payload length P (uint64)
    24      32   SHA-256 of bytes 0-23, the metadata and the payload
    56      M    metadata: UTF-8 JSON
    56+M    P    payload: entropy-coded layers and raw tensors, at offsets the metadata gives

Reading parses a fixed header, JSON and raw numbers, nothing else, so opening a
file can never run code (a pickle is refused before any of it is looked at).
The metadata carries the model spec, data config, class names, the resolved
recipe, provenance, metrics, MACs and the per-layer BOPs rows, so a report
needs no model build. Each quantized weight is stored only as its codes
(:mod:`codeq_cli.formats.entropy`), step, shift and bit-width; every other entry of the
state dict is stored as float32 (integer buffers keep their type), under the
names the plain, unwrapped model uses.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import zlib
from collections import OrderedDict
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from codeq_cli.formats import entropy
from codeq_cli.formats import history as history_format
from codeq_cli._io import _json_default, write_with
from codeq_cli.core.bops import LayerRow, bops_rows
from codeq_cli.errors import CheckpointError, CheckpointPathError, CodeqError, one_line
from codeq_cli.core.insert import QuantizedWeight, encode_all, plain_state
from codeq_cli.models.factory import DataConfig, ModelSpec, with_module_versions
from codeq_cli.core.quantizer import dequantize
from codeq_cli.core import act_quant
from codeq_cli.formats._checkpoint_meta import validate as validate_meta

MAGIC = b"CODEQ\r\n\x1a"
FORMAT_VERSION = 2  # 2: the metadata is zlib-compressed JSON; 1: plain JSON (still read)
_MAX_META_BYTES = 256 << 20  # a decompressed metadata larger than this is refused, not inflated
_HEAD = struct.Struct("<8sHHIQ")
HEADER_BYTES = _HEAD.size + 32

# Stored dtypes: numpy's little-endian names.
_INT_DTYPES = {
    torch.int64: "<i8",
    torch.int32: "<i4",
    torch.int16: "<i2",
    torch.int8: "|i1",
    torch.uint8: "|u1",
    torch.bool: "|b1",
}
_TORCH_OF = {"<f4": torch.float32, **{v: k for k, v in _INT_DTYPES.items()}}


@dataclass(frozen=True)
class SaveInfo:
    """What :func:`save` wrote; sizes in bytes."""

    path: Path
    file_bytes: int
    weight_bytes: int  # the quantized weights: entropy-coded codes and their frequency tables
    entropy_bound_bytes: float  # Σ n·H(codes) / 8 over the quantized layers
    tensor_bytes: int  # every other state-dict tensor (float32 / integer)
    meta_bytes: int
    layers: int

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


# -- writing -------------------------------------------------------------------


def _plain_tensor(key: str, value) -> tuple[np.ndarray, str]:
    if not isinstance(value, Tensor):
        raise CodeqError(
            f"state dict entry {key!r} is a {type(value).__name__}, not a tensor",
            hint="codeq checkpoints hold tensors only; remove the module's extra state",
        )
    t = value.detach().to("cpu")
    if t.is_floating_point():
        return t.to(torch.float32).contiguous().numpy().astype("<f4", copy=False), "<f4"
    dtype = _INT_DTYPES.get(t.dtype)
    if dtype is None:
        raise CodeqError(f"state dict entry {key!r} has dtype {t.dtype}, which codeq cannot store",
                         hint="keep complex or quantized tensors out of the model")
    return t.contiguous().numpy().astype(dtype, copy=False), dtype


def save(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    spec: ModelSpec,
    data_config: DataConfig,
    class_names: list[str] | None,
    recipe: dict,
    provenance: dict,
    metrics: dict,
    macs: dict[str, int],
    data_dir: str | None = None,
    history: dict | None = None,
    format_version: int = FORMAT_VERSION,
) -> SaveInfo:
    """Write the compressed checkpoint of a live quantized model (after :func:`quantize_` and training).

    Each quantizer's :meth:`~codeq_cli.core.quantizer.DeadZoneQuantizer.encode` of
    its trained weight is entropy coded (and decoded once to prove it). The
    rest of the state dict goes in under the plain model's names
    (``layer1.0.conv1.weight``, never ``parametrizations.weight.original``);
    the quantizers' logits are training state and are not stored. The BOPs
    rows are ``bops_rows(model, macs)``. ``history``, when given, is the
    run's compact training history (:mod:`codeq_cli.formats.history`), stored
    under the metadata key ``history``. Written atomically.
    ``format_version=1`` writes the metadata uncompressed, for codeq
    versions that read only format 1.
    """
    if format_version not in (1, FORMAT_VERSION):
        raise ValueError(f"format_version must be 1 or {FORMAT_VERSION}")
    payload = bytearray()
    layers, bound_bits = [], 0.0
    encodings = encode_all(model)  # every layer in one pass where the one-pass quantizer runs (one read back)
    tensors, state_keys = [], []
    state = model.state_dict()
    for key, entry in plain_state(model, state):
        state_keys.append(key)
        if isinstance(entry, QuantizedWeight):
            qw = entry
            enc = encodings[qw.name]
            codes = enc.codes.detach().to("cpu").contiguous()
            flat = codes.reshape(-1).numpy()
            blob = entropy.encode(flat)
            if not np.array_equal(entropy.decode(blob, flat.size), flat):  # pragma: no cover - a coder bug
                raise CodeqError(f"entropy coding of layer {qw.name} did not round-trip", hint="please report this as a codeq bug")
            layers.append({
                "name": qw.name, "param": key, "shape": list(codes.shape), "bits": int(enc.bits),
                "step": float(enc.step), "shift": float(enc.shift),
                "offset": len(payload), "nbytes": len(blob), "crc32": zlib.crc32(flat.tobytes()),
            })
            payload += blob
            bound_bits += entropy.entropy_bound_bits(flat)
            continue
        arr, dtype = _plain_tensor(key, entry)
        data = arr.tobytes()
        tensors.append({"key": key, "dtype": dtype, "shape": list(arr.shape), "offset": len(payload), "nbytes": len(data)})
        payload += data
    if not layers:
        raise CodeqError("the model has no codeq quantizers, so there is nothing to compress",
                         hint="call codeq_cli.quantize_(model) (and train it) before saving")
    weight_bytes = sum(layer["nbytes"] for layer in layers)

    meta = {
        "format": "codeq",
        "format_version": format_version,
        "model": spec.to_dict(),
        "data_config": data_config.to_dict(),
        "class_names": list(class_names) if class_names is not None else None,
        "recipe": recipe,
        "provenance": provenance,
        "metrics": metrics,
        "macs": {str(k): int(v) for k, v in macs.items()},
        "rows": [r.to_dict() for r in bops_rows(model, macs, encoded=encodings)],
        "data_dir": None if data_dir is None else str(data_dir),
        "coder": entropy.coder_info(),
        "state_keys": state_keys,
        "module_versions": module_versions(state),
        "layers": layers,
        "tensors": tensors,
    }
    if history is not None:
        try:
            history_format.validate(history)
        except ValueError as exc:
            raise CodeqError(f"the training history to store is malformed ({exc})",
                             hint="pass codeq_cli.formats.history.from_log(...) or None") from None
        meta["history"] = history
    activations = act_quant.frozen_entries(model)
    if activations:  # codeq's extension; absent for float activations (the file is then as before)
        meta["activations"] = activations
    try:
        meta_bytes = json.dumps(meta, separators=(",", ":"), ensure_ascii=False, default=_json_default).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise CodeqError(f"checkpoint metadata is not plain data ({exc})",
                         hint="pass recipe, provenance and metrics as dicts of numbers, strings and lists") from exc
    if format_version >= 2:
        meta_bytes = zlib.compress(meta_bytes, 9)
    head = _HEAD.pack(MAGIC, format_version, 0, len(meta_bytes), len(payload))
    digest = hashlib.sha256(head)
    digest.update(meta_bytes)
    digest.update(payload)

    def writer(fh) -> None:
        fh.write(head)
        fh.write(digest.digest())
        fh.write(meta_bytes)
        fh.write(payload)

    write_with(path, writer)
    total = HEADER_BYTES + len(meta_bytes) + len(payload)
    return SaveInfo(Path(path), total, weight_bytes, bound_bits / 8.0, len(payload) - weight_bytes, len(meta_bytes), len(layers))


def module_versions(state: dict) -> dict[str, int]:
    """The modules' versions a state dict records (``_metadata``), those other than 1 (the default)."""
    meta = getattr(state, "_metadata", None) or {}
    out = {}
    for prefix, local in meta.items():
        v = local.get("version") if isinstance(local, dict) else None
        if isinstance(v, int) and not isinstance(v, bool) and v != 1:
            out[str(prefix)] = v
    return out


def _module_prefixes(keys: list[str]) -> list[str]:
    """Every module prefix of the state-dict keys, the root ``""`` first, parents before children."""
    seen: dict[str, None] = {"": None}
    for key in keys:
        parts = key.split(".")[:-1]
        for i in range(1, len(parts) + 1):
            seen.setdefault(".".join(parts[:i]), None)
    return list(seen)


def _metadata_json(version: int, raw: bytes) -> dict:
    """The metadata object: plain JSON in format 1, zlib-compressed JSON from format 2."""
    if version >= 2:
        inflater = zlib.decompressobj()
        try:
            raw = inflater.decompress(raw, _MAX_META_BYTES)
        except zlib.error as exc:
            raise ValueError(f"the metadata does not decompress ({exc})") from None
        if inflater.unconsumed_tail or not inflater.eof:
            raise ValueError("the compressed metadata is cut short or inflates past 256 MiB")
    return json.loads(raw.decode("utf-8"))


# -- reading -------------------------------------------------------------------


class QuantizedLayer:
    """One quantized weight as stored: codes (decoded on first use), step, shift, bits."""

    def __init__(self, ckpt_path: Path, entry: dict, blob: memoryview) -> None:
        self.name: str = entry["name"]
        self.param: str = entry["param"]  # the state-dict key of the plain model
        self.shape: tuple[int, ...] = tuple(entry["shape"])
        self.bits: int = entry["bits"]
        self.step: float = entry["step"]
        self.shift: float = entry["shift"]
        self.nbytes: int = len(blob)
        self._crc = entry["crc32"]
        self._blob = blob
        self._path = ckpt_path
        self.counts, _ = entropy.read_table(blob)  # {code: count}, read without decoding
        qmax = 2 ** (self.bits - 1) - 1
        _check(sum(self.counts.values()) == self.numel, f"layer {self.name}: the frequency table does not count its {self.numel} codes")
        _check(all(abs(c) <= qmax for c in self.counts), f"layer {self.name}: codes outside ±{qmax} for {self.bits} bits")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def sparsity(self) -> float:
        return self.counts.get(0, 0) / self.numel if self.numel else 0.0

    @property
    def entropy_bound_bits(self) -> float:
        return entropy.bound_bits_from_counts(self.counts)

    @cached_property
    def codes(self) -> Tensor:
        """The int8 codes, shaped like the weight."""
        try:
            flat = entropy.decode(self._blob, self.numel)
        except ValueError as exc:
            raise CheckpointError(f"{self._path}: layer {self.name} does not decode ({exc})",
                                  hint="the file is damaged or was written by an incompatible coder; compress again") from None
        if zlib.crc32(flat.tobytes()) != self._crc:
            raise CheckpointError(
                f"{self._path}: layer {self.name} decodes to different codes than were saved",
                hint="the entropy coder's version differs from the one that wrote it; install the constriction version in the file's metadata",
            )
        return entropy.to_tensor(flat, self.shape)

    def decode(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The dequantized weight, bit for bit what the trained quantizer's forward gave."""
        return dequantize(self.codes, self.step, self.shift, dtype)

    def __repr__(self) -> str:
        return f"QuantizedLayer({self.name!r}, shape={self.shape}, bits={self.bits}, sparsity={self.sparsity:.3f})"


class CompressedModel:
    """A loaded checkpoint: metadata at once, codes and tensors when first used."""

    def __init__(self, path: Path, meta: dict, payload: memoryview, file_bytes: int) -> None:
        self.path = path
        self.meta = meta
        self.file_bytes = file_bytes
        self.format_version: int = meta["format_version"]
        self.spec = ModelSpec.from_dict(meta["model"])
        self.data_config = DataConfig.from_dict(meta["data_config"])
        self.class_names: list[str] | None = meta["class_names"]
        self.rows = [LayerRow(**r) for r in meta["rows"]]
        self.macs: dict[str, int] = meta["macs"]
        self.data_dir: str | None = meta["data_dir"]
        self._payload = payload
        # Activation quantizers (codeq's extension): {"name", "bits", "signed", "step"} per layer, or none.
        self.activations: list[dict] = list(meta.get("activations") or [])
        self.layers: dict[str, QuantizedLayer] = {
            e["name"]: QuantizedLayer(path, e, payload[e["offset"] : e["offset"] + e["nbytes"]]) for e in meta["layers"]
        }

    recipe = property(lambda self: self.meta["recipe"])
    provenance = property(lambda self: self.meta["provenance"])
    metrics = property(lambda self: self.meta["metrics"])
    history = property(lambda self: self.meta.get("history"))  # None: written without one (see formats/history.py)

    @cached_property
    def tensors(self) -> dict[str, Tensor]:
        """Every state-dict entry other than the quantized weights, as stored."""
        out = {}
        for e in self.meta["tensors"]:
            n = math.prod(e["shape"])
            arr = np.frombuffer(self._payload, dtype=e["dtype"], count=n, offset=e["offset"]).copy()
            out[e["key"]] = torch.from_numpy(arr).reshape(e["shape"])
        return out

    @property
    def weight_bytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers.values())

    @property
    def entropy_bound_bits(self) -> float:
        """``Σ n·H(codes)`` over the quantized layers (order-0 bound), from the frequency tables."""
        return sum(layer.entropy_bound_bits for layer in self.layers.values())

    @property
    def fp32_bytes(self) -> int:
        """Bytes of the dense state dict in float32 (integer buffers at their own size)."""
        total = sum(4 * layer.numel for layer in self.layers.values())
        for e in self.meta["tensors"]:
            total += math.prod(e["shape"]) * np.dtype(e["dtype"]).itemsize
        return total

    def state_dict(self) -> dict[str, Tensor]:
        """The plain model's state dict with dequantized weights (float32, CPU).

        It carries the modules' version metadata (``_metadata``, which e.g.
        torchvision's MNASNet reads while loading) as the file records it;
        files of format 1 record none.
        """
        by_param = {layer.param: layer for layer in self.layers.values()}
        tensors = self.tensors
        out = OrderedDict((k, by_param[k].decode() if k in by_param else tensors[k].clone()) for k in self.meta["state_keys"])
        versions = self.meta.get("module_versions")
        if versions is not None:
            meta = OrderedDict((prefix, {"version": 1}) for prefix in _module_prefixes(self.meta["state_keys"]))
            meta.update((prefix, {"version": v}) for prefix, v in versions.items())
            out._metadata = meta  # type: ignore[attr-defined]
        return out

    def build_model(self) -> nn.Module:
        """The plain architecture (no parametrizations) holding the decoded weights, in eval mode.

        With activation quantizers in the file, each is put back on its layer's
        input as a :class:`~codeq_cli.core.act_quant.FrozenActQuantizer`, so the
        logits equal the fake-quantized model's.
        """
        from codeq_cli.models.factory import create

        model = create(self.spec, pretrained=False)
        try:  # a format-1 file records no module versions: the installed code's are the architecture's
            model.load_state_dict(with_module_versions(self.state_dict(), model.state_dict()), strict=True)
        except RuntimeError as exc:
            prov = self.provenance if isinstance(self.provenance, dict) else {}
            versions = ", ".join(f"{k} {prov[k]}" for k in ("torch", "torchvision", "timm") if k in prov)
            raise CheckpointError(
                f"{self.path} does not fit {self.spec.label} as this installation builds it ({one_line(exc, 160)})",
                hint=f"install the versions that wrote it ({versions})" if versions else "compress the model again",
            ) from None
        try:
            act_quant.freeze_into(model, self.activations)
        except (AttributeError, ValueError) as exc:  # no such layer, or named twice
            raise CheckpointError(f"{self.path}: an activation quantizer does not fit {self.spec.label} ({one_line(exc, 120)})",
                                  hint="it was not written by codeq for this model; compress again") from None
        return model.eval()

    def __repr__(self) -> str:
        return f"CompressedModel({str(self.path)!r}, {self.spec.label}, {len(self.layers)} quantized layers, {self.file_bytes} bytes)"


def _foreign(p: Path, data: bytes) -> CheckpointError:
    hint = "pass a file written by `codeq compress`"
    if data[:4] == b"PK\x03\x04":
        return CheckpointError(f"{p} is a zip archive (a PyTorch file saved with torch.save?), not a codeq checkpoint; it was not opened", hint=hint)
    if data[:1] == b"\x80" and len(data) > 1 and 2 <= data[1] <= 5:
        return CheckpointError(f"{p} is a Python pickle, not a codeq checkpoint; it was not opened, since unpickling can run code", hint=hint)
    if len(data) >= 10 and data[8:9] == b"{" and 8 + int.from_bytes(data[:8], "little") <= len(data):
        return CheckpointError(f"{p} is a safetensors file, not a codeq checkpoint", hint=hint)
    return CheckpointError(f"{p} is not a codeq checkpoint (it does not start with the CODEQ signature)", hint=hint)


def _read(p: Path) -> bytes:
    if not p.exists():
        raise CheckpointPathError(f"checkpoint {str(p)!r} does not exist", hint="check the path (codeq compress writes it with --out)")
    if p.is_dir():
        raise CheckpointPathError(f"checkpoint path {str(p)!r} is a folder", hint="pass the checkpoint file itself")
    try:
        return p.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read {str(p)!r} ({exc.strerror})", hint="check the file's permissions") from None


def load(path: str | os.PathLike) -> CompressedModel:
    """Open a checkpoint written by :func:`save`; refuses, in one line, anything else.

    Missing, empty, truncated, damaged (checksum), foreign (a pickle, a
    PyTorch zip, safetensors, anything without the signature) and
    newer-format files raise :class:`CheckpointError`. Nothing in the file is
    ever executed: the reader parses a fixed header, JSON and raw numbers.
    """
    p = Path(path)
    data = _read(p)
    size = len(data)
    if size == 0:
        raise CheckpointError(f"{p} is empty (0 bytes)", hint="the write did not finish or the copy failed; copy it again or compress again")
    if not MAGIC.startswith(data[: len(MAGIC)]):
        raise _foreign(p, data)
    if size < HEADER_BYTES:
        raise CheckpointError(f"{p} is truncated ({size} bytes, shorter than the header)", hint="copy it again or compress again")
    _, version, _flags, meta_len, payload_len = _HEAD.unpack_from(data)
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{p} uses checkpoint format {version}, newer than this codeq reads (up to {FORMAT_VERSION})",
            hint="upgrade codeq (pip install -U codeq); if the file should be older, it is damaged",
        )
    if version < 1:
        raise CheckpointError(f"{p} claims checkpoint format {version}, which no codeq writes", hint="the file is damaged; copy it again or compress again")
    expected = HEADER_BYTES + meta_len + payload_len
    if size < expected:
        raise CheckpointError(f"{p} is truncated ({size} of {expected} bytes)", hint="the write or the copy was cut short; copy it again or compress again")
    if size > expected:
        raise CheckpointError(f"{p} has {size - expected} unexpected bytes after the end of the checkpoint",
                              hint="the file is damaged or was appended to; copy it again or compress again")
    view = memoryview(data)
    digest = hashlib.sha256(view[: _HEAD.size])
    digest.update(view[HEADER_BYTES:])
    if digest.digest() != data[_HEAD.size : HEADER_BYTES]:
        raise CheckpointError(f"{p} is damaged: its checksum does not match its contents",
                              hint="copy it again from the original or compress again")
    try:
        meta = _metadata_json(version, bytes(view[HEADER_BYTES : HEADER_BYTES + meta_len]))
        if isinstance(meta, dict) and meta.get("format_version") != version:
            raise ValueError(f"format_version: {meta.get('format_version')!r} differs from the header's {version}")
        payload = view[HEADER_BYTES + meta_len :]
        return CompressedModel(p, validate_meta(meta, len(payload)), payload, size)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{p} has malformed metadata ({one_line(exc)})",
                              hint="it was not written by codeq or was edited; compress again") from None


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise ValueError(what)

"""Leaving codeq: dense weights for plain PyTorch, and ONNX.

Both exports hold the *decoded* model: every quantized weight dequantized to
float32 exactly as the trained quantizer computed it, so the exported model's
outputs equal those of the fake-quantized model it came from. Neither keeps
the compression: the sizes are those of the dense fp32 model (see
``docs/format.md`` for what ONNX could express of sub-8-bit sparse weights).
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from codeq_cli._io import torch_save_atomic, write_bytes
from codeq_cli.errors import CodeqError, UsageError, one_line

if TYPE_CHECKING:  # pragma: no cover
    from codeq_cli.formats.checkpoint import CompressedModel

STATE_DICT_SUFFIXES = (".safetensors", ".pt", ".pth")


def export_state_dict(ckpt: CompressedModel, path: str | os.PathLike) -> Path:
    """Write the dense dequantized state dict, ``.safetensors`` or ``.pt``/``.pth`` by suffix.

    It loads with ``strict=True`` into ``codeq_cli.models.factory.create(ckpt.spec)``,
    the plain timm/torchvision model. The ``.pt`` file holds a dict of tensors
    only (it loads with ``torch.load(..., weights_only=True)``).
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in STATE_DICT_SUFFIXES:
        raise UsageError(f"cannot tell the format of {str(p)!r} from its suffix",
                         hint="name it .safetensors (recommended) or .pt/.pth")
    state = ckpt.state_dict()
    if suffix == ".safetensors":
        from safetensors.torch import save

        import json

        meta = {"format": "pt", "codeq_model": ckpt.spec.label, "codeq_source": str(ckpt.path)}
        if ckpt.meta.get("module_versions"):  # safetensors holds no _metadata: a model that reads one (MNASNet) finds it here
            meta["codeq_module_versions"] = json.dumps(ckpt.meta["module_versions"], separators=(",", ":"))
        write_bytes(p, save({k: v.contiguous() for k, v in state.items()}, metadata=meta))
    else:
        torch_save_atomic(state, p)
    return p


def _onnx_modules() -> tuple[bool, bool]:
    return importlib.util.find_spec("onnx") is not None, importlib.util.find_spec("onnxscript") is not None


def export_onnx(
    ckpt: CompressedModel,
    path: str | os.PathLike,
    *,
    opset: int = 18,
    img_size: int | None = None,
    dynamic_batch: bool = True,
) -> Path:
    """Export the decoded model to ONNX (float32 weights), input ``1×C×H×W`` at the model's size.

    Needs the ``onnx`` package (and ``onnxscript`` for PyTorch's current
    exporter; without it the TorchScript-based exporter is used). Written
    atomically; models whose weights pass 2 GB are refused by ONNX's single-file limit.
    """
    import torch

    has_onnx, has_script = _onnx_modules()
    if not has_onnx:
        raise CodeqError("ONNX export needs the onnx package, which is not installed",
                         hint="pip install onnx onnxscript")
    p = Path(path)
    if p.exists() and p.is_dir():
        raise UsageError(f"{str(p)!r} is a folder", hint="give a file path such as model.onnx")
    folder = p.parent if str(p.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"folder {str(folder)!r} for {str(p)!r} does not exist", hint="create it first or choose another output path")
    model = ckpt.build_model()
    c, h, w = ckpt.data_config.input_size
    if img_size is not None:
        h = w = int(img_size)
    example = torch.zeros(1, c, h, w)
    with tempfile.TemporaryDirectory(prefix=".codeq-onnx-", dir=folder) as tmp:
        out = Path(tmp) / "model.onnx"
        try:
            if has_script:
                shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
                torch.onnx.export(model, (example,), str(out), dynamo=True, opset_version=opset, external_data=False,
                                  input_names=["input"], output_names=["logits"], dynamic_shapes=shapes)
            else:
                axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
                # Without onnxscript only the TorchScript exporter is there; torch warns that it is
                # deprecated on every call, which is no news to the user (and no library warnings on a normal run).
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    torch.onnx.export(model, (example,), str(out), dynamo=False, opset_version=opset,
                                      input_names=["input"], output_names=["logits"], dynamic_axes=axes)
        except CodeqError:
            raise
        except Exception as exc:
            raise CodeqError(f"ONNX export of {ckpt.spec.label} failed ({type(exc).__name__}: {one_line(exc, 200)})",
                             hint="try another --opset, or export the state dict and convert it yourself") from exc
        write_bytes(p, out.read_bytes())
    return p

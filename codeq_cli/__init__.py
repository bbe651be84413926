"""codeq: compress image classifiers with CoDeQ (joint pruning and quantization).

The library comes first; the ``codeq`` command is a thin layer over it::

    from codeq_cli import DeadZoneQuantizer, quantize_, bake_, load

Names are imported lazily so that ``codeq --help`` never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from codeq_cli._version import __version__

_EXPORTS = {
    "DeadZoneQuantizer": "codeq_cli.core.quantizer",
    "Encoded": "codeq_cli.core.quantizer",
    "dequantize": "codeq_cli.core.quantizer",
    "quantize_": "codeq_cli.core.insert",
    "bake_": "codeq_cli.core.insert",
    "plan": "codeq_cli.core.insert",
    "quantized_weights": "codeq_cli.core.insert",
    "quantizer_parameters": "codeq_cli.core.insert",
    "measure_macs": "codeq_cli.core.bops",
    "bops_rows": "codeq_cli.core.bops",
    "bops_totals": "codeq_cli.core.bops",
    "dequantized_state_dict": "codeq_cli.core.insert",
    "save": "codeq_cli.formats.checkpoint",
    "load": "codeq_cli.formats.checkpoint",
    "CompressedModel": "codeq_cli.formats.checkpoint",
    "SaveInfo": "codeq_cli.formats.checkpoint",
    "report_data": "codeq_cli.commands.report",
    "export_state_dict": "codeq_cli.formats.export",
    "export_onnx": "codeq_cli.formats.export",
    "entropy_bound_bits": "codeq_cli.formats.entropy",
    "load_recipe": "codeq_cli.train.recipe",
    "Recipe": "codeq_cli.train.recipe",
    "load_model": "codeq_cli.models.factory",
    "ModelSpec": "codeq_cli.models.factory",
    "CheckpointError": "codeq_cli.errors",
    "CodeqError": "codeq_cli.errors",
    "UsageError": "codeq_cli.errors",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # pragma: no cover
    from codeq_cli.core.bops import bops_rows, bops_totals, measure_macs
    from codeq_cli.formats.checkpoint import CompressedModel, SaveInfo, load, save
    from codeq_cli.formats.entropy import entropy_bound_bits
    from codeq_cli.errors import CheckpointError, CodeqError, UsageError
    from codeq_cli.formats.export import export_onnx, export_state_dict
    from codeq_cli.core.insert import bake_, dequantized_state_dict, plan, quantize_, quantized_weights, quantizer_parameters
    from codeq_cli.models.factory import ModelSpec, load_model
    from codeq_cli.train.recipe import Recipe, load_recipe
    from codeq_cli.commands.report import report_data
    from codeq_cli.core.quantizer import DeadZoneQuantizer, Encoded, dequantize


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'codeq_cli' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

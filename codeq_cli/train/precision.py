"""The arithmetic a model runs in: autocast dtype and memory format, one choice for training and evaluation.

``codeq compress`` trains and evaluates under the same :class:`Arithmetic`
(bfloat16 autocast and channels_last on CUDA when the recipe asks for them)
and records it in the checkpoint's provenance (``eval_dtype``,
``eval_channels_last``); ``codeq eval`` reads it back and evaluates the same
way, so the two top-1 figures are the same computation and a ``--min-top1``
gate set from compress output does not flap.

The quantizers and their logits stay in float32 under autocast (see
``docs/method.md``). A GPU without native bfloat16 (before compute
capability 8.0: V100, T4) would emulate it slowly; there ``amp`` falls back
to float32 with a note rather than half precision, whose narrow range would
need a loss scaler for the regularizer's gradients.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class Arithmetic:
    dtype: str = "float32"  # the autocast dtype; "float32": no autocast
    channels_last: bool = False

    def autocast(self, device: torch.device):
        """The autocast context for ``device`` (CUDA or CPU), or a null context in float32."""
        if self.dtype == "float32" or device.type not in ("cuda", "cpu"):
            return nullcontext()
        return torch.autocast(device.type, dtype=getattr(torch, self.dtype))

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last and images.dim() == 4:
            return images.contiguous(memory_format=torch.channels_last)
        return images

    def to_provenance(self) -> dict:
        return {"eval_dtype": self.dtype, "eval_channels_last": self.channels_last}

    @staticmethod
    def from_provenance(prov: dict | None, recipe: dict | None = None) -> Arithmetic:
        """What a checkpoint recorded; for one written before it did, what its recipe and device implied."""
        prov = prov if isinstance(prov, dict) else {}
        if prov.get("eval_dtype") in _DTYPES:
            return Arithmetic(prov["eval_dtype"], bool(prov.get("eval_channels_last", False)))
        recipe = recipe if isinstance(recipe, dict) else {}
        if prov.get("device") == "cuda":
            return Arithmetic("bfloat16" if recipe.get("amp", True) else "float32", bool(recipe.get("channels_last", False)))
        return Arithmetic()


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively (CUDA compute capability 8.0 or later)."""
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 8


def resolve(amp: bool, channels_last: bool, device: torch.device) -> tuple[Arithmetic, str | None]:
    """The arithmetic of training on ``device`` for a recipe's ``amp``/``channels_last``, and a note when amp is dropped.

    Only CUDA uses either: on CPU training runs in float32, contiguous.
    """
    if device.type != "cuda":
        return Arithmetic(), None
    if amp and not native_bf16(device):
        name = torch.cuda.get_device_name(device)
        return Arithmetic("float32", channels_last), (
            f"amp: {name} has no native bfloat16, so training runs in float32 (set amp=false to silence this)")
    return Arithmetic("bfloat16" if amp else "float32", channels_last), None


def for_device(recorded: Arithmetic, device: torch.device) -> tuple[Arithmetic, str | None]:
    """``recorded`` where ``device`` can run it: bfloat16 on a GPU without it becomes float32, with a note."""
    if recorded.dtype == "bfloat16" and device.type == "cuda" and not native_bf16(device):
        return Arithmetic("float32", recorded.channels_last), (
            f"{torch.cuda.get_device_name(device)} has no native bfloat16: evaluating in float32, "
            "where compress evaluated in bfloat16 (top-1 may differ slightly)")
    return recorded, None

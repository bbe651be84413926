"""Options shared by several ``codeq`` commands (Typer's ``Annotated`` form), and their parsing."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from codeq_cli.errors import UsageError

CropPctOpt = Annotated[Optional[float], typer.Option("--crop-pct", help="Centre-crop fraction for evaluation, in (0, 1]; 1.0: no crop [default: the model's; eval: the checkpoint's].")]
MeanOpt = Annotated[Optional[str], typer.Option("--mean", help="Normalization mean per channel: 0.5,0.5,0.5 [default: the model's; eval: the checkpoint's].")]
StdOpt = Annotated[Optional[str], typer.Option("--std", help="Normalization std per channel: 0.5,0.5,0.5 [default: the model's; eval: the checkpoint's].")]
InterpOpt = Annotated[Optional[str], typer.Option("--interpolation", help="Resize interpolation: bilinear, bicubic, nearest, box, hamming, lanczos [default: the model's; eval: the checkpoint's].")]


def numbers(flag: str, text: str | None) -> list[float] | None:
    """``--mean 0.5,0.4,0.3`` (commas or spaces) as numbers."""
    if text is None:
        return None
    parts = [p for p in text.replace(",", " ").split() if p]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if not values:
        raise UsageError(f"{flag} {text!r} is not a list of numbers", hint=f"write it like {flag} 0.485,0.456,0.406")
    return values


JsonOpt = Annotated[bool, typer.Option("--json", help="Print exactly one JSON document on stdout (logs go to stderr).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print only the result.")]


LogToOpt = Annotated[Optional[str], typer.Option("--log-to", help="Also log the run to tensorboard, mlflow and/or wandb (comma-separated; each an extra: pip install 'codeq[tracking]'; docs/tracking.md).")]
LogDirOpt = Annotated[Optional[Path], typer.Option("--log-dir", help="TensorBoard's folder for the event files [default: RUN_DIR/tensorboard; batch: JOBS.tensorboard/JOB].")]

"""The resumable state of a training run: progress, random generators, and reading it back.

Written by :meth:`codeq_cli.train.loop.Fit.save` as plain containers of tensors
(``torch.save``) and read with ``weights_only``: nothing in it can run code.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

STATE_FORMAT = "codeq-run-state"
STATE_VERSION = 1


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


@dataclass
class Progress:
    """Where a run stands: the next step to take is ``(epoch, batch)``."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    history: list = field(default_factory=list)
    fp_top1: float | None = None


def load_state(path: Path) -> dict:
    """A run state written by :meth:`Fit.save` (weights_only: nothing in it can run)."""
    from codeq_cli._io import torch_load_safe
    from codeq_cli.errors import CheckpointError, one_line

    try:
        state = torch_load_safe(path)
    except FileNotFoundError:
        raise CheckpointError(f"no run state at {str(path)!r}", hint="start without --resume") from None
    except Exception as exc:
        raise CheckpointError(
            f"the run state {str(path)!r} is damaged or not codeq's ({one_line(exc)})",
            hint="start again without --resume, or with --overwrite",
        ) from exc
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a codeq run state", hint="start without --resume")
    if int(state.get("version", 0)) > STATE_VERSION:
        raise CheckpointError(
            f"{str(path)!r} was written by a newer codeq (run state version {state['version']})", hint="upgrade codeq"
        )
    return state


def progress_from_state(state: dict) -> Progress:
    p = state["progress"]
    return Progress(p["epoch"], p["batch"], p["step"], json.loads(state.get("history", "[]")), p.get("fp_top1"))

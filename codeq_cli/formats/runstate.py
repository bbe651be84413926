"""The resumable state of a training run: where it stands, its random generators, writing and reading it.

:func:`run_state` assembles it and :func:`save_state` writes it (plain
containers of tensors, ``torch.save``, atomically); :func:`load_state` reads it
back with ``weights_only``: nothing in it can run code.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

STATE_FORMAT = "codeq-run-state"
STATE_VERSION = 1
STATE_FILE = "state.pt"  # in the run folder


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
class RunPosition:
    """Where a run stands: the next step to take is ``(epoch, batch)``."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    history: list = field(default_factory=list)
    fp_top1: float | None = None


def run_state(model, optimizer, scheduler, position: RunPosition, fingerprint: dict, world_size: int) -> dict:
    """Everything a run needs to continue exactly: ``model`` is the plain (unwrapped) module."""
    p = position
    return {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "progress": {"epoch": p.epoch, "batch": p.batch, "step": p.step, "fp_top1": p.fp_top1},
        "history": json.dumps(p.history),
        "rng": rng_state(),
        "fingerprint": json.dumps(fingerprint, sort_keys=True),
        "world_size": world_size,
    }


def save_state(state: dict, path: Path) -> None:
    """Write a :func:`run_state` atomically: a kill leaves the previous state or this one."""
    from codeq_cli._io import torch_save_atomic

    torch_save_atomic(state, path)


def load_state(path: Path) -> dict:
    """A run state written by :func:`save_state` (weights_only: nothing in it can run)."""
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


def discard_state(run_dir: Path) -> int:
    """Delete the run state of a finished run (it only serves ``--resume``); returns the bytes freed."""
    path = Path(run_dir) / STATE_FILE
    try:
        size = path.stat().st_size
        path.unlink()
    except FileNotFoundError:
        return 0
    return size


def progress_from_state(state: dict) -> RunPosition:
    p = state["progress"]
    return RunPosition(p["epoch"], p["batch"], p["step"], json.loads(state.get("history", "[]")), p.get("fp_top1"))

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


def rng_state(device: torch.device | None = None) -> dict:
    """This process's generators: torch's CPU one, Python's, and the CUDA one of ``device``.

    Only this process's own GPU: under torchrun every rank drives one device,
    and the generators of the others belong to other processes.
    """
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    """Restore :func:`rng_state` (``device``: this process's GPU, for the CUDA generator)."""
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    cuda = state.get("cuda")
    if cuda is None or device is None or device.type != "cuda":
        return
    if isinstance(cuda, (list, tuple)):  # version 1: every visible GPU's generator, from rank 0's process
        index = device.index or 0
        if index < len(cuda):
            torch.cuda.set_rng_state(cuda[index], device)
        return
    torch.cuda.set_rng_state(cuda, device)


def gather_rng_states(device: torch.device | None = None, group=None) -> list[dict]:
    """Every rank's :func:`rng_state`, in rank order (a collective: every rank calls it).

    Dropout and drop-path draw from each rank's own generators, which advance
    differently on each; rank 0 alone cannot save them. One process: ``[rng_state()]``.
    ``group``: the process group to gather over (a gloo group keeps it off the GPU).
    """
    import torch.distributed as td

    mine = rng_state(device)
    if not (td.is_available() and td.is_initialized()) or td.get_world_size() == 1:
        return [mine]
    out: list = [None] * td.get_world_size()
    td.all_gather_object(out, mine, group=group)  # between this job's own processes, never from a file
    return out


def restore_rng_state(state: dict, rank: int, world_size: int, device: torch.device | None = None) -> bool:
    """Restore this rank's generators from a run state; True when they are its own.

    With the world size of the saved run every rank gets back the generators it
    had, so dropout and drop-path masks continue as in an uninterrupted run. On
    another number of processes (or from a version-1 state) every rank takes
    rank 0's: the run continues correctly, but its random masks (like its
    per-process batch statistics) differ from an uninterrupted run.
    """
    ranks = state.get("rng_ranks")
    own = isinstance(ranks, (list, tuple)) and len(ranks) == world_size
    set_rng_state(ranks[rank] if own else state["rng"], device)
    return own or world_size == 1


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


def run_state(model, optimizer, scheduler, position: RunPosition, fingerprint: dict, world_size: int,
              rngs: list[dict] | None = None) -> dict:
    """Everything a run needs to continue exactly: ``model`` is the plain (unwrapped) module.

    ``rngs``: every rank's generators (:func:`gather_rng_states`); without them this process's.
    """
    p = position
    rngs = rngs or [rng_state()]
    return {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "progress": {"epoch": p.epoch, "batch": p.batch, "step": p.step, "fp_top1": p.fp_top1},
        "history": json.dumps(p.history),
        "rng": rngs[0],
        "rng_ranks": rngs,  # restored by rank when the world size matches (restore_rng_state)
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

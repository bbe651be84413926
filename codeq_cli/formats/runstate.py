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
    from codeq_cli.errors import CheckpointError

    try:
        state = torch_load_safe(path)
    except FileNotFoundError:
        raise CheckpointError(f"no run state at {str(path)!r}", hint="start without --resume") from None
    except Exception as exc:
        raise CheckpointError(
            f"the run state {str(path)!r} is damaged or not codeq's ({' '.join(str(exc).split())[:120]})",
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

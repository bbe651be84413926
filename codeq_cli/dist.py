"""Distributed helpers: one code path for one process and for torchrun.

Under ``torchrun`` the environment carries ``RANK``/``WORLD_SIZE``/
``LOCAL_RANK``; :func:`init` then joins the process group (NCCL on GPU, gloo
on CPU). Without it everything here degrades to the single-process case.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as td

from codeq_cli.errors import UsageError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(spec: str | None, local_rank: int = 0) -> torch.device:
    """``--device``: ``cuda``/``cuda:N``/``cpu``; default CUDA when present."""
    if spec in (None, "", "auto"):
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError as exc:
        raise UsageError(f"--device {spec!r} is not a device", hint="use cpu, cuda or cuda:N") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec!r}: no CUDA device is available", hint="use --device cpu")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    return dev


def init(device: str | None = None) -> DistInfo:
    """Join the process group when launched by torchrun; otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    if world > 1 and not td.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        td.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return DistInfo(rank, world, local, dev)


def shutdown() -> None:
    if td.is_available() and td.is_initialized():
        td.destroy_process_group()


def barrier() -> None:
    if td.is_available() and td.is_initialized():
        td.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of a list of numbers across ranks (float64)."""
    if not (td.is_available() and td.is_initialized()):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    td.all_reduce(t)
    return t.tolist()


def broadcast_object(obj, src: int = 0):
    if not (td.is_available() and td.is_initialized()):
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=src)
    return box[0]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model

"""Distributed helpers: one code path for one process and for torchrun.

Under ``torchrun`` the environment carries ``RANK``/``WORLD_SIZE``/
``LOCAL_RANK``; :func:`init` then joins the process group (NCCL on GPU, gloo
on CPU). Without it everything here degrades to the single-process case.

Two kinds of collectives are used. Device collectives (DDP's gradient
all-reduce, :func:`all_reduce_sum` for evaluation) run on the main backend.
Small per-step agreements between the ranks (mean loss, "is any loss
non-finite", "did any rank get a stop signal") go through :func:`host_sum`, a
gloo all-reduce of a few host numbers: it never touches the GPU stream, so it
costs a network round trip and no device synchronisation.
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as td

from codeq_cli.errors import UsageError

# gloo group for host-side agreements when the main backend is NCCL (None: the default group).
_host_group = None


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


def resolve_device(spec: str | None, local_rank: int = 0, local_world: int = 1) -> torch.device:
    """``--device``: ``cuda``/``cuda:N``/``cpu``; default CUDA when present.

    ``local_world`` is the number of processes on this machine (torchrun's
    ``LOCAL_WORLD_SIZE``): with several, each takes ``cuda:LOCAL_RANK`` and an
    explicit index would put them all on one GPU. MPS is refused: evaluation
    and the ranks' reductions sum in float64, which MPS cannot hold.
    """
    if spec in (None, "", "auto"):
        dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    else:
        try:
            dev = torch.device(spec)
        except RuntimeError as exc:
            raise UsageError(f"--device {spec!r} is not a device", hint="use cpu, cuda or cuda:N") from exc
    if dev.type == "mps":
        raise UsageError(f"--device {spec!r}: Apple MPS is not supported (evaluation sums in float64, which MPS lacks)",
                         hint="use --device cpu")
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise UsageError(f"--device {spec!r}: no CUDA device is available", hint="use --device cpu")
    count = torch.cuda.device_count()
    if dev.index is not None and local_world > 1:
        raise UsageError(f"--device {spec}: with {local_world} processes on this machine every one would use GPU {dev.index}",
                         hint="pass --device cuda (process r then uses cuda:r)")
    index = local_rank if dev.index is None else dev.index
    if index >= count:
        if dev.index is not None:
            raise UsageError(f"--device {spec}: this machine has {count} GPU{'s' if count != 1 else ''} "
                             f"(cuda:0 to cuda:{count - 1})", hint=f"pass --device cuda:N with N below {count}")
        raise UsageError(f"{local_world} processes on this machine but only {count} GPU{'s' if count != 1 else ''} visible",
                         hint=f"start at most {count} processes per machine (--nproc {count}, torchrun --nproc-per-node {count})")
    return torch.device(f"cuda:{index}")


def _limit_cpu_threads() -> None:
    """Size numba's thread pool like torch's before numba starts it.

    torchrun sets ``OMP_NUM_THREADS`` (1 unless given) so that N processes do
    not oversubscribe the cores; numba's pool would otherwise start one
    thread per core in every process, and its idle threads spin against the
    others' work (a 2-process CPU run on 2 cores trained several times slower).
    """
    if "numba" not in sys.modules:
        os.environ.setdefault("NUMBA_NUM_THREADS", str(max(1, torch.get_num_threads())))


def init(device: str | None = None) -> DistInfo:
    """Join the process group when launched by torchrun; otherwise a single process."""
    global _host_group
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local, int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))
    if dev.type == "cuda":
        # Always, also for one process: the pin-memory thread and any tensor made on
        # plain "cuda" use the current device, which is otherwise GPU 0.
        torch.cuda.set_device(dev)
    if world > 1 and not td.is_initialized():
        _limit_cpu_threads()
        backend = "nccl" if dev.type == "cuda" else "gloo"
        td.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
        _host_group = td.new_group(backend="gloo") if backend != "gloo" else None
    return DistInfo(rank, world, local, dev)


def host_group():
    """The gloo group of :func:`host_sum` (None: the default group, or no group at all)."""
    return _host_group


def shutdown() -> None:
    global _host_group
    if td.is_available() and td.is_initialized():
        td.destroy_process_group()
    _host_group = None


def _active() -> bool:
    return td.is_available() and td.is_initialized()


def barrier() -> None:
    if _active():
        td.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of a list of numbers across ranks (float64, on the main backend)."""
    if not _active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    td.all_reduce(t)
    return t.tolist()


def all_reduce_(tensors: list[torch.Tensor]) -> None:
    """Sum each tensor across ranks, in place (nothing without a process group)."""
    if not _active():
        return
    for t in tensors:
        td.all_reduce(t)


def host_sum(values: list[float]) -> list[float]:
    """Element-wise sum across ranks of a few host numbers (gloo; no device synchronisation)."""
    if not _active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    td.all_reduce(t, group=_host_group)
    return t.tolist()


def broadcast_object(obj, src: int = 0):
    if not _active():
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_buffers(model: torch.nn.Module, src: int = 0) -> None:
    """Give every rank ``src``'s buffers (BatchNorm running statistics).

    DDP broadcasts them at the start of each training forward, so after the
    last step each rank still holds the statistics of its own last batch.
    Evaluation and the saved model use rank 0's.
    """
    if not _active():
        return
    for buf in unwrap(model).buffers():
        td.broadcast(buf.data, src)


def check_sync_bn(info: DistInfo, sync_bn: bool) -> None:
    """``sync_bn: true`` needs a GPU backend: PyTorch's SyncBatchNorm has no CPU kernel."""
    if sync_bn and info.distributed and info.device.type != "cuda":
        raise UsageError(
            "sync_bn: true needs GPUs (PyTorch's SyncBatchNorm does not run on CPU)",
            hint="pass --set sync_bn=false for a CPU run (every process then normalizes over its own share of the batch)",
        )


def wrap(model: torch.nn.Module, info: DistInfo, sync_bn: bool = False) -> torch.nn.Module:
    """``model`` for training on ``info``: DDP (and SyncBatchNorm with ``sync_bn``) when distributed.

    As the torchvision reference: BatchNorm stays per process unless asked
    (``sync_bn``); DDP broadcasts rank 0's parameters and buffers at
    construction and its buffers (BN running statistics) before every
    training forward, so every rank holds the same model.
    """
    if not info.distributed:
        return model
    check_sync_bn(info, sync_bn)
    if sync_bn:
        model = convert_sync_batchnorm(model)
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[info.device.index] if info.device.type == "cuda" else None
    )


def convert_sync_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """Every BatchNorm of ``model`` as SyncBatchNorm, keeping timm's fused activations.

    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` turns timm's
    ``BatchNormAct2d`` (EfficientNet, MobileNetV3, RegNet, ...) into a plain
    SyncBatchNorm whose forward drops the layer's ``act``/``drop``: training
    would run another network than the one evaluated and shipped. timm's
    converter makes ``SyncBatchNormAct`` for those and plain SyncBatchNorm for
    the rest; the parameters and buffers keep their names.
    """
    from timm.layers import convert_sync_batchnorm as timm_convert

    from codeq_cli.core.act_quant import rehook_

    model = timm_convert(model)
    rehook_(model)  # the converter copies an activation quantizer on a batch norm's output, not its hook
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP and ``torch.compile`` wrappers (timm's ``unwrap_model``)."""
    from timm.utils import unwrap_model

    return unwrap_model(model)


def debug_dump(model: torch.nn.Module, info: DistInfo, step: int, folder: Path, extra: dict | None = None) -> Path:
    """Write this rank's quantizer state to ``folder/rank{R}.pt`` (a debugging aid).

    Holds, per quantized layer, ``theta_dz``, ``theta_bit`` (or None) and the
    int8 codes, plus the whole plain state dict and ``extra`` (e.g. the budget
    controller's state): comparing the files of two ranks shows whether DDP
    kept them identical.
    """
    from codeq_cli._io import torch_save_atomic
    from codeq_cli.core.insert import quantized_weights

    plain = unwrap(model)
    layers = {}
    with torch.no_grad():
        for qw in quantized_weights(plain):
            q = qw.quantizer
            layers[qw.name] = {
                "theta_dz": q.theta_dz.detach().cpu().clone(),
                "theta_bit": None if q.theta_bit is None else q.theta_bit.detach().cpu().clone(),
                "codes": q.encode(qw.original).codes.cpu(),
            }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"rank{info.rank}.pt"
    state = {k: v.detach().cpu() for k, v in plain.state_dict().items()}
    torch_save_atomic({"rank": info.rank, "world_size": info.world_size, "step": step, "layers": layers,
                       "state_dict": state, "extra": extra or {}}, path)
    return path

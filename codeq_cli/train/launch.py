"""``codeq compress --nproc N``: the same run through torch's elastic launcher.

Equivalent to ``torchrun --standalone --nproc-per-node N -m codeq_cli compress …``
on one machine; every process joins the group through the environment torchrun
sets (see :mod:`codeq_cli.train.dist`). Several machines are torchrun's business
(``docs/distributed.md``).
"""

from __future__ import annotations

import os


def strip_nproc(argv: list[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N`` (the children must not launch again)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        out.append(a)
    return out


def threads_per_process(nproc: int) -> int:
    """The cores this process may use, shared among ``nproc`` processes (at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, nproc))


def check_gpus(nproc: int, device: str | None) -> None:
    """Refuse more processes than GPUs before starting any (each would fail with "invalid device ordinal")."""
    import torch

    from codeq_cli.errors import UsageError

    if device is not None and not str(device).startswith("cuda"):
        return
    if not torch.cuda.is_available():
        return  # CPU processes (gloo); an explicit --device cuda is refused by every process alike
    count = torch.cuda.device_count()
    if nproc > count:
        raise UsageError(f"--nproc {nproc}: this machine has {count} GPU{'s' if count != 1 else ''}",
                         hint=f"pass --nproc {count} or fewer (one process per GPU)")
    if device is not None and ":" in str(device):
        raise UsageError(f"--device {device} with --nproc {nproc} would put every process on one GPU",
                         hint="pass --device cuda (process r then uses cuda:r)")


def launch(nproc: int, argv: list[str], device: str | None = None) -> int:
    """Run ``codeq <argv without --nproc>`` in ``nproc`` processes; the exit code of the group.

    Unless ``OMP_NUM_THREADS`` is set, each process gets an equal share of the
    cores (torchrun alone would give each one thread). A failed group returns
    the exit code of its first failed process (2 for a usage error).
    """
    check_gpus(nproc, device)
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_process(nproc)))
    args = ["--standalone", "--nproc-per-node", str(nproc), "-m", "codeq_cli", *strip_nproc(argv)]
    try:
        torchrun.main(args)
    except ChildFailedError as exc:
        codes = [f.exitcode for _, f in sorted(exc.failures.items()) if isinstance(f.exitcode, int) and f.exitcode > 0]
        return codes[0] if codes else 1
    except SystemExit as exc:  # the launcher exits on its own argument errors
        return int(exc.code or 0)
    return 0

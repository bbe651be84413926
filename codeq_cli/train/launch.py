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


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``codeq <argv without --nproc>`` in ``nproc`` processes; the exit code of the group.

    Unless ``OMP_NUM_THREADS`` is set, each process gets an equal share of the
    cores (torchrun alone would give each one thread). A failed group returns
    the exit code of its first failed process (2 for a usage error).
    """
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

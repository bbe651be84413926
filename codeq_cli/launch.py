"""``codeq compress --nproc N``: the same run through torch's elastic launcher.

Equivalent to ``torchrun --standalone --nproc-per-node N -m codeq_cli compress …``
on one machine; every process joins the group through the environment torchrun
sets (see :mod:`codeq_cli.dist`).
"""

from __future__ import annotations


def strip_nproc(argv: list[str]) -> list[str]:
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


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``codeq <argv without --nproc>`` in ``nproc`` processes; the exit code of the group."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = ["--standalone", "--nproc-per-node", str(nproc), "-m", "codeq_cli", *strip_nproc(argv)]
    try:
        torchrun.main(args)
    except ChildFailedError:
        return 1
    except SystemExit as exc:  # the launcher exits on its own argument errors
        return int(exc.code or 0)
    return 0

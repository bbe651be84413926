"""Run control for the long commands: the signals that stop a run cleanly, and the command that resumes it.

Only the CLI installs signal handlers: the library sees a ``should_stop``
callable and finishes the step, saves the run state and raises
:class:`~codeq_cli.errors.InterruptedRun`.
"""

from __future__ import annotations

import os
import shlex
import signal


def rank() -> int:
    """This process's rank under ``torchrun`` (0 alone)."""
    return int(os.environ.get("RANK", "0"))


def resume_command(argv: list[str]) -> str:
    """The command line that resumes this run: the same arguments, ``--resume`` instead of ``--overwrite``."""
    args = [a for a in argv if a != "--overwrite"]
    if "--resume" not in args:
        args.append("--resume")
    return "codeq " + " ".join(shlex.quote(a) for a in args)


class StopOnSignal:
    """First Ctrl-C (or SIGTERM): finish the step, save, stop. Second Ctrl-C: stop at once.

    ``state["interrupted"]`` receives the line :func:`codeq_cli.cli.app.main`
    prints when the second Ctrl-C stops the run at once.
    """

    def __init__(self, output, state: dict) -> None:
        self.output = output
        self.state = state
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self.state["interrupted"] = ("stopped at once (second Ctrl-C); the run state saved last, if any, is kept: "
                                         "resume with --resume or start over with --overwrite")
            raise KeyboardInterrupt
        self.requested = True
        if rank() == 0:
            self.output.err.print("stopping after this step and saving the run state (Ctrl-C again to stop at once)", markup=False)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def __call__(self) -> bool:
        return self.requested

"""One error base class for everything a user can get wrong or meet at run time.

The CLI catches :class:`CodeqError`, prints ``error: <message>`` as one line on
stderr and exits with :attr:`CodeqError.exit_code`; a traceback is shown only
with ``--debug``. Messages name the bad value and say what to do instead.

Exit codes: 2 when the command line itself is wrong (an option value, a path
that does not exist or is the wrong kind, a recipe key, a refused overwrite or
resume), 1 when what it names is there but cannot be used (unreadable data,
weights that do not fit, a damaged checkpoint) or the run fails (a non-finite
loss, a failed write), 130 when the user interrupted the run.
"""

from __future__ import annotations


class CodeqError(Exception):
    """A failure explained to the user in one line (exit code 1)."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}; {hint}")

    def __str__(self) -> str:  # one line, always
        text = self.message if self.hint is None else f"{self.message}; {self.hint}"
        return " ".join(text.split())


class UsageError(CodeqError):
    """The command line, a recipe or an override is wrong (exit code 2)."""

    exit_code = 2


class RecipeError(UsageError):
    """A recipe key, type or value is invalid."""


class ModelError(CodeqError):
    """A model name cannot be resolved or its weights cannot be loaded."""


class DataError(CodeqError):
    """A data folder is missing, malformed or unreadable."""


class CheckpointError(CodeqError):
    """A checkpoint or run state is missing, damaged, foreign or too new."""


class TrainingError(CodeqError):
    """Training stopped (non-finite loss, interrupted, ...)."""


class InterruptedRun(TrainingError):
    """The user stopped the run (Ctrl-C, SIGTERM) after its state was saved (exit code 130).

    ``step`` is the number of training steps taken when it stopped.
    """

    exit_code = 130

    def __init__(self, message: str, *, hint: str | None = None, step: int | None = None) -> None:
        super().__init__(message, hint=hint)
        self.step = step


# A path on the command line that does not exist or is the wrong kind is a
# usage error (exit 2), and still the error of its area for callers that catch it.
class DataPathError(UsageError, DataError):
    """``--data`` names no folder (exit code 2)."""


class CheckpointPathError(UsageError, CheckpointError):
    """No checkpoint file at the path given (exit code 2)."""


def one_line(exc: BaseException | str, limit: int = 120, *, line: int | None = None) -> str:
    """A library's message squashed to one line of at most ``limit`` characters, for quoting in ours.

    ``line`` picks one of a multi-line message's non-blank lines (negative
    counts from the end); by default all of them are joined. An empty message
    gives the exception's type name; a cut one ends with ``...``.
    """
    text = str(exc)
    if line is not None:
        lines = [part for part in text.splitlines() if part.strip()]
        text = lines[line] if -len(lines) <= line < len(lines) else (lines[-1] if lines else "")
    text = " ".join(text.split())
    if not text and isinstance(exc, BaseException):
        text = type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def require_package(module: str, *, what: str, hint: str) -> None:
    """Import ``module`` now, so that an optional extra that is missing is one line before any work.

    ``what`` names the choice that needs it (``--log-to wandb``), ``hint`` how to install it.
    """
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as exc:
        missing = getattr(exc, "name", None) or module
        raise UsageError(f"{what}: the Python package {missing!r} is not installed ({one_line(exc)})",
                         hint=hint) from None

"""One error base class for everything a user can get wrong or meet at run time.

The CLI catches :class:`CodeqError`, prints ``error: <message>`` as one line on
stderr and exits with :attr:`CodeqError.exit_code`; a traceback is shown only
with ``--debug``. Messages name the bad value and say what to do instead.
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

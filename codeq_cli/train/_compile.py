"""``--compile``: a failure of ``torch.compile`` becomes one clear error."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from codeq_cli.errors import TrainingError, one_line


@contextmanager
def compile_errors() -> Iterator[None]:
    """Turn a ``torch.compile`` failure (met at the first forward or backward) into one clear error.

    A failure while compiling is a dynamo exception, or any exception raised
    from inside dynamo's frame conversion or inductor (an internal assertion,
    a C++ compiler error). Errors of the compiled code itself pass unchanged.
    """
    try:
        yield
    except Exception as exc:
        if not compile_failure(exc):
            raise
        raise TrainingError(f"torch.compile failed on this model ({type(exc).__name__}: {one_line(exc, 160)})",
                            hint="run without --compile") from exc


# Frames that are on the stack while compiling (not while running compiled code).
_COMPILER_FILES = ("torch/_dynamo/convert_frame.py", "torch/_inductor/compile_fx.py", "torch/_inductor/codecache.py",
                   "torch/_inductor/async_compile.py")


def compile_failure(exc: BaseException) -> bool:
    dynamo = sys.modules.get("torch._dynamo.exc")
    if dynamo is None:  # nothing was ever compiled
        return False
    if isinstance(exc, dynamo.TorchDynamoException):
        return True
    tb = exc.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename.replace("\\", "/")
        if any(part in name for part in _COMPILER_FILES):
            return True
        tb = tb.tb_next
    return False

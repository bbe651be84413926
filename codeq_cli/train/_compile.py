"""``--compile``: a failure of ``torch.compile`` becomes one clear error."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from codeq_cli.errors import TrainingError, UsageError, one_line

# DDP's graph splitting (dynamo's DDPOptimizer) refuses the higher-order op that codeq's
# autograd Functions become before this torch.
DDP_COMPILE_TORCH = (2, 6)


def torch_version(text: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def check_compile(info, version: str | None = None) -> None:
    """``--compile`` under DDP needs torch 2.6 or later: one line before anything is loaded, not a traceback at step 1."""
    import torch

    version = version or str(torch.__version__)
    if info.distributed and torch_version(version) < DDP_COMPILE_TORCH:
        need = ".".join(map(str, DDP_COMPILE_TORCH))
        raise UsageError(f"--compile with {info.world_size} processes needs torch {need} or later (this is torch {version})",
                         hint=f"upgrade torch to {need} or later, or run without --compile")


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
                   "torch/_inductor/async_compile.py", "torch/_inductor/runtime/compile_tasks.py",
                   "triton/compiler/")
# Triton kernels are compiled lazily, at their first launch, from the same module that
# launches them: only these functions of it compile (``run`` itself launches).
_COMPILER_FUNCTIONS = {
    "torch/_inductor/runtime/triton_heuristics.py": {
        "precompile", "_precompile_worker", "_precompile_config", "_make_launchers", "make_launcher",
        "autotune_to_one_config", "benchmark_all_configs", "coordinate_descent_tuning",
    },
}


def compile_failure(exc: BaseException) -> bool:
    dynamo = sys.modules.get("torch._dynamo.exc")
    if dynamo is None:  # nothing was ever compiled
        return False
    if isinstance(exc, dynamo.TorchDynamoException):
        return True
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        name = code.co_filename.replace("\\", "/")
        if any(part in name for part in _COMPILER_FILES):
            return True
        if any(name.endswith(f) and code.co_name in funcs for f, funcs in _COMPILER_FUNCTIONS.items()):
            return True
        tb = tb.tb_next
    return False

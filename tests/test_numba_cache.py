"""The numba loops compile once per machine, not once per process (numba's on-disk cache is hit)."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = """
import numpy as np
from codeq_cli.core import _kernels
k = _kernels._numba()
w = np.linspace(-1, 1, 64, dtype=np.float32)
out = np.empty_like(w)
k["forward"](w, out, np.float32(0.1), np.float32(0.05), np.float32(7))
k["encode"](w, np.empty(64, np.int8), np.float32(0.1), np.float32(0.05), np.float32(7))
k["backward"](w, w, np.float32(0.1), np.float32(0.05), np.float32(7))
k["cached_order_stats"](w, np.arange(8, dtype=np.int64), 3, True)
"""


def _run(cache: str) -> str:
    env = {**os.environ, "NUMBA_CACHE_DIR": cache, "NUMBA_DEBUG_CACHE": "1"}
    env.pop("CODEQ_KERNELS", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


def test_a_second_process_loads_the_compiled_loops_instead_of_compiling_them(tmp_path):
    first = _run(str(tmp_path))
    assert first.count("[cache] data saved") == 4, first  # compiled once, stored
    second = _run(str(tmp_path))
    assert "[cache] data saved" not in second, second  # nothing compiled again
    assert second.count("[cache] data loaded") == 4, second

"""The numba loops of :mod:`codeq_cli.core._kernels` (imported only when they are used).

Module-level functions, so that numba's on-disk cache (``cache=True``, in
``NUMBA_CACHE_DIR``, set by :func:`codeq_cli.core._kernels._numba` before this
module is imported) finds them again in the next process. Defined inside a
function, as closures over another jitted function, their cache key held that
function's per-process identity: every process compiled them anew (seconds of
CPU per ``codeq`` command) and added another entry to the cache.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

zero = np.float32(0.0)


@njit(inline="always", nogil=True)
def code(x, s, shift, qmax):  # pragma: no cover - compiled
    # §1 step 7 on one weight: (|unrounded code| r, |q|), float32 throughout.
    t = abs(x) - shift
    if t < zero:
        t = zero
    r = t / s
    m = np.rint(r)
    if m > qmax:
        m = qmax
    return r, m


@njit(parallel=True, cache=True, nogil=True)
def forward(w, out, s, shift, qmax):  # pragma: no cover - compiled
    for i in prange(w.shape[0]):
        x = w[i]
        _, m = code(x, s, shift, qmax)
        # m != 0 rather than m > 0: a NaN weight stays NaN, as on the eager path
        level = m * s + shift if m != zero else zero
        out[i] = np.copysign(level, x)


@njit(parallel=True, cache=True, nogil=True)
def encode(w, out, s, shift, qmax):  # pragma: no cover - compiled
    for i in prange(w.shape[0]):
        x = w[i]
        _, m = code(x, s, shift, qmax)
        out[i] = np.int8(m) if x >= zero else -np.int8(m)


@njit(parallel=True, cache=True, nogil=True, fastmath={"reassoc"})
def backward(g, w, s, shift, qmax):  # pragma: no cover - compiled
    acc_s = 0.0
    acc_d = 0.0
    for i in prange(w.shape[0]):
        x = w[i]
        r, m = code(x, s, shift, qmax)
        gs = g[i] * np.sign(x)
        acc_s += gs * (r - m)
        acc_d += gs if m == zero else zero
    return -acc_s, -acc_d


@njit(parallel=True, cache=True, nogil=True)
def cached_order_stats(w, idx, pos, need_next):  # pragma: no cover - compiled
    # |w| at the remembered indices, the pos-th (and next) smallest of them,
    # and the proof that nothing outside them is larger (see _select).
    c = idx.shape[0]
    cand = np.empty(c, np.float32)
    for j in range(c):
        cand[j] = abs(w[idx[j]])
    if need_next:
        part = np.partition(cand, (pos, pos + 1))
        lo, hi = part[pos], part[pos + 1]
    else:
        part = np.partition(cand, pos)
        lo, hi = part[pos], part[pos]
    inside = c - pos - 1
    for j in range(pos + 1, c):  # ties with lo above position pos
        if part[j] == lo:
            inside -= 1
    total = 0
    for i in prange(w.shape[0]):
        if abs(w[i]) > lo:
            total += 1
    return lo, hi, total == inside

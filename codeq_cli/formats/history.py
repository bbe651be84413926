"""The compact training history a checkpoint carries, so a report can draw the run from the file alone.

``codeq compress`` logs one JSON object per event to ``metrics.jsonl`` in the
run folder (``docs/cli.md``): ``step`` events every ``--log-every`` steps with
the task loss and the compression figures, ``eval`` events at epoch ends with
the validation top-1. :func:`from_log` turns that log into at most
:data:`MAX_POINTS` points, and the checkpoint stores them in its metadata
under the optional key ``history`` (columns of equal length)::

    {"step":      [20, 40, ...],       # optimizer step (1-based, increasing)
     "task_loss": [2.1, 1.7, ...],     # cross-entropy, mean of the logged steps since the previous point
     "top1":      [null, 71.2, ...],   # validation top-1 (percent) at epoch ends, else null
     "rel_bops":  [43.0, 12.5, ...],   # relative BOPs (percent) at that step
     "sparsity":  [0.12, 0.5, ...],    # parameter-weighted fraction of zero codes
     "avg_bits":  [6.9, 4.1, ...],     # parameter-weighted mean bit-width
     "total_steps": 740}               # steps the run was planned for

Any figure not measured at a point is ``null``. Files written before this key
existed, or by runs that logged nothing, have no history: readers treat a
missing key as "no curves". :func:`validate` checks what a reader uses.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

MAX_POINTS = 256
SERIES = ("task_loss", "top1", "rel_bops", "sparsity", "avg_bits")
COLUMNS = ("step", *SERIES)


def _number(x) -> float | None:
    if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x):
        return float(x)
    return None


def _events(path: Path) -> list[dict]:
    """The log's events, a resumed run's replayed steps replacing the ones they repeat.

    A run resumed from the state saved at step S logs ``start`` with ``step: S``;
    the steps after S logged before the interruption were trained again, so the
    earlier copies are dropped. A line cut short by a kill is skipped.
    """
    rows: list[dict] = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if not isinstance(e, dict) or not isinstance(e.get("step"), int) or isinstance(e.get("step"), bool):
                continue
            if e.get("event") == "start":
                rows = [r for r in rows if r["step"] <= e["step"]]
            elif e.get("event") in ("step", "eval"):
                rows.append(e)
    return rows


def from_log(path: str | os.PathLike, max_points: int = MAX_POINTS) -> dict | None:
    """The thinned history of a run from its ``metrics.jsonl``; None when the log is missing, unreadable or empty.

    Never raises for a bad log: the history is an extra, and a run must not lose
    its checkpoint over it.
    """
    p = Path(path)
    try:
        events = _events(p) if p.is_file() else []
    except OSError:
        return None
    points: dict[int, dict] = {}  # step -> merged figures of that step (a step event and an epoch's eval)
    losses: dict[int, float] = {}
    total = None
    for e in events:
        step = e["step"]
        pt = points.setdefault(step, {"step": step})
        if e["event"] == "step":
            loss = _number(e.get("task_loss"))
            if loss is not None:
                losses[step] = loss
            total = e.get("total_steps", total)
        else:
            pt["top1"] = _number(e.get("top1"))
        for key in ("rel_bops", "sparsity", "avg_bits"):
            if _number(e.get(key)) is not None:
                pt[key] = _number(e[key])
    if not points:
        return None
    steps = sorted(points)
    keep = _thin(steps, {s for s in steps if points[s].get("top1") is not None}, max_points)
    out: dict = {c: [] for c in COLUMNS}
    logged = sorted(losses.items())
    i = 0
    for s in keep:  # the mean of the losses logged in (previous kept step, s]
        window = []
        while i < len(logged) and logged[i][0] <= s:
            window.append(logged[i][1])
            i += 1
        points[s]["task_loss"] = sum(window) / len(window) if window else None
        for c in COLUMNS:
            out[c].append(points[s].get(c))
    out["total_steps"] = total if isinstance(total, int) and not isinstance(total, bool) else None
    return out


def _thin(steps: list[int], must: set[int], max_points: int) -> list[int]:
    """At most ``max_points`` of ``steps``, evenly spread, the last step and (room allowing) every eval kept."""
    if len(steps) <= max_points:
        return steps
    chosen = {steps[-1]}
    evals = sorted(must)
    if len(evals) > max_points // 2:  # a run with very many epochs: thin the evals too
        evals = [evals[round(i * (len(evals) - 1) / (max_points // 2 - 1))] for i in range(max_points // 2)]
    chosen.update(evals)
    others = [s for s in steps if s not in chosen]
    room, n = max_points - len(chosen), len(others)
    if room > 0:  # evenly spread over the rest: distinct indices, since room < n
        chosen.update(others[(i + 1) * n // room - 1] for i in range(room))
    return sorted(chosen)


def validate(history) -> None:
    """Raise ValueError unless ``history`` has the shape above (None, meaning no history, passes)."""
    if history is None:
        return
    if not isinstance(history, dict):
        raise ValueError("history is not an object")
    steps = history.get("step")
    if not isinstance(steps, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in steps):
        raise ValueError("history step is not a list of step numbers")
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError("history steps do not increase")
    for key in SERIES:
        col = history.get(key)
        if not isinstance(col, list) or len(col) != len(steps):
            raise ValueError(f"history {key} is not a list as long as its steps")
        if not all(v is None or _number(v) is not None for v in col):
            raise ValueError(f"history {key} holds something other than finite numbers and nulls")
    total = history.get("total_steps")
    if total is not None and (not isinstance(total, int) or isinstance(total, bool) or total < 0):
        raise ValueError("history total_steps is not a count")

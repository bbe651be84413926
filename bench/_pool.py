"""Runs a bench's workers side by side (bench/budget.py, bench/transfer.py).

Each key runs as ``CHILD --worker KEY`` in its own process, ``jobs`` at a
time; a worker writes ``RESULTS/KEY.json`` and exits 0, and its result goes to
``on_result(key, result)`` as soon as it ends. :func:`keep_result` adds it
to the bench's ``results.json``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


def run_workers(child: list[str], keys: list[str], jobs: int, env: dict, results: Path,
                on_result: Callable[[str, dict], None], *, logs: bool = False, poll: float = 0.5) -> None:
    """Every key's worker, ``jobs`` at a time; with ``logs`` each one's output goes to ``RESULTS/KEY.log``."""
    pending, procs = list(keys), []
    while pending or procs:
        while pending and len(procs) < max(1, jobs):
            key = pending.pop(0)
            print(f"running {key} ...", file=sys.stderr, flush=True)
            out = open(results / f"{key}.log", "w") if logs else None
            procs.append((key, subprocess.Popen([*child, "--worker", key], env=env, stdout=out, stderr=out), out))
        time.sleep(poll)
        for item in list(procs):
            key, proc, out = item
            if proc.poll() is None:
                continue
            procs.remove(item)
            if out is not None:
                out.close()
            got = results / f"{key}.json"
            if proc.returncode == 0 and got.exists():
                result = json.loads(got.read_text())
                on_result(key, result)
                print(json.dumps(result), file=sys.stderr, flush=True)
            else:
                where = f"; see {results / (key + '.log')}" if logs else ""
                print(f"{key} failed (exit {proc.returncode}){where}", file=sys.stderr, flush=True)


def keep_result(store: Path, results: dict, key: str, result: dict) -> None:
    """Add ``result`` under ``key`` to ``results`` and to the file ``store``, atomically.

    Other benches writing the same store at the same time (two ``--only`` lists
    side by side) keep their results: the file is read again and merged before
    each write, and ``results`` takes in what they added.
    """
    from codeq_cli._io import write_json

    try:
        results.update({k: v for k, v in json.loads(store.read_text()).items() if k not in results})
    except (OSError, ValueError):
        pass
    results[key] = result
    write_json(store, results)

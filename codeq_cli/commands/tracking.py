"""Experiment tracking: ``codeq compress --log-to tensorboard,mlflow,wandb`` (``docs/tracking.md``).

The tracker is an event consumer. ``codeq compress`` reports everything through
its ``on_event`` callback; :meth:`Tracker.wrap` puts the tracker in front of
the console's handler, turns the events into metrics and parameters, and hands
them to the backends (:mod:`codeq_cli.commands._tracking_backends`), one small
interface for TensorBoard, MLflow and W&B.

Three promises, and how they are kept:

- *Logging never slows a run.* The training thread only appends to a queue at
  the run's ``--log-every``; one worker thread talks to the backends (files,
  a tracking server). A server that answers slowly delays the worker, never a step.
- *Logging never breaks a run.* A backend that fails (disk full, server gone,
  bad credentials) is switched off with one warning line, given as a ``note``
  event on the main thread; the run and the other backends go on.
- *A resumed run continues the same tracked run.* The backends' run ids (and
  TensorBoard's folder) are kept in ``RUN_DIR/tracking.json``, written
  atomically; ``--resume`` reads them back.

Only rank 0 logs (``torch.distributed``'s rank, or ``RANK`` before it is set
up): on the other ranks :func:`open_tracker` returns a tracker that does nothing.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from codeq_cli.errors import UsageError, one_line, require_package

log = logging.getLogger(__name__)

KINDS = ("tensorboard", "mlflow", "wandb")
# The Python module each backend needs, and the extra that installs it.
MODULES = {"tensorboard": "torch.utils.tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
STATE_FILE = "tracking.json"
GROUP_ENV, NAME_ENV = "CODEQ_TRACKING_GROUP", "CODEQ_TRACKING_NAME"  # set by `codeq batch` for its jobs
FLUSH_TIMEOUT_S = 60.0  # at the end, how long the worker may take to send what is queued

# step event key → metric name; the loss terms are averaged over the steps since the last logged one.
AVERAGED = {"loss": "train/loss", "task_loss": "train/task_loss", "reg_loss": "train/penalty",
            "distill_loss": "train/distill_loss"}
STEP_KEYS = {
    "lr": "train/lr",
    "rel_bops": "compression/rel_bops", "sparsity": "compression/sparsity", "avg_bits": "compression/avg_bits",
    "mean_layer_sparsity": "compression/mean_layer_sparsity", "mean_layer_bits": "compression/mean_layer_bits",
    "target": "budget/target", "planned": "budget/planned", "measured": "budget/achieved",
    "pressure": "budget/pressure",
    "images_per_s": "perf/images_per_s", "data_wait": "perf/data_wait",
}
EVAL_KEYS = {"top1": "eval/top1", "top5": "eval/top5"}
FINAL_KEYS = ("top1", "top5", "fp_top1", "top1_drop", "rel_bops", "sparsity", "avg_bits")


def parse_log_to(text: str | None) -> list[str]:
    """``"tensorboard,mlflow"`` → ``["tensorboard", "mlflow"]``; an unknown name is a usage error."""
    if not text:
        return []
    kinds: list[str] = []
    for part in text.replace(" ", ",").split(","):
        name = part.strip().lower()
        if not name:
            continue
        if name == "all":
            kinds += [k for k in KINDS if k not in kinds]
            continue
        if name not in KINDS:
            near = difflib.get_close_matches(name, KINDS, n=1)
            raise UsageError(f"--log-to {part.strip()!r} is not a tracking backend",
                             hint=(f"did you mean {near[0]!r}? " if near else "") + "choose from " + ", ".join(KINDS))
        if name not in kinds:
            kinds.append(name)
    return kinds


def check_installed(kinds: list[str]) -> None:
    """Import each backend's package now, so that a missing one is one line before any work."""
    for kind in kinds:
        require_package(MODULES[kind], what=f"--log-to {kind}", hint=f"pip install 'codeq[{kind}]'")


def process_rank() -> int:
    """This process's rank: ``torch.distributed``'s once it is set up, else ``RANK`` (torchrun's), else 0."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0") or 0)


@dataclass
class RunInfo:
    """What the backends need to open (or reopen) a run; filled from the events and the options."""

    run_dir: Path
    log_dir: Path | None = None  # TensorBoard's event folder (--log-dir); None: RUN_DIR/tensorboard
    name: str | None = None  # the run's display name (MLflow run name, W&B name)
    group: str | None = None  # the batch's name: MLflow experiment, W&B group
    command: str | None = None
    resumed: bool = False
    start_step: int = 0
    params: dict = field(default_factory=dict)


class Tracker:
    """Turns compress events into metrics for the backends; see the module docstring."""

    def __init__(self, backends: list, info: RunInfo, log_every: int = 20):
        self.backends = backends
        self.info = info
        self.log_every = max(1, int(log_every))
        self.active = bool(backends)
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._pending: list[tuple] = []  # calls made before the backends open (at the 'start' event)
        self._opened = False
        self._closed = False
        self._failed: dict[str, str] = {}  # backend → why; written by the worker
        self._warned: set[str] = set()
        self._sums: dict[str, float] = {}
        self._count = 0
        self._step = 0
        self._emit: Callable[[dict], None] = lambda e: None
        self._lock = threading.Lock()
        self.observe_s = 0.0  # seconds spent in observe() on the caller's thread
        self.worker_cpu_s = 0.0  # CPU seconds of the worker thread, once it has ended

    # -- the event side (main thread) ------------------------------------------------------------
    def wrap(self, on_event: Callable[[dict], None]) -> Callable[[dict], None]:
        """``on_event`` with the tracker in front of it (``close`` and other attributes kept)."""
        if not self.active:
            return on_event
        self._emit = on_event

        def tracked(e: dict) -> None:
            t0 = time.perf_counter()
            self.observe(e)
            self.observe_s += time.perf_counter() - t0  # the tracker's cost on the training thread (bench/tracking.py)
            on_event(e)
            self._warn()

        for attr, value in vars(on_event).items() if hasattr(on_event, "__dict__") else ():
            setattr(tracked, attr, value)
        return tracked

    def observe(self, e: dict) -> None:
        if not self.active:
            return
        try:
            self._observe(e)
        except Exception as exc:  # a bug here must not stop the run either
            self._fail("tracking", exc)

    def _observe(self, e: dict) -> None:
        kind = e.get("event")
        info = self.info
        if kind == "data":
            info.params.update({f"data.{k}": e[k] for k in ("train", "val", "classes", "input_size") if k in e})
        elif kind == "plan":
            info.resumed = bool(e.get("resumed"))
            info.params.update({"model": e.get("model"), "seed": e.get("seed"), "out": e.get("out"),
                                "run_dir": e.get("run_dir"), "log_every": self.log_every})
            info.params.update({f"recipe.{k}": v for k, v in (e.get("recipe") or {}).items()})
            if info.command:
                info.params["command"] = info.command
            if e.get("run_dir"):
                info.run_dir = Path(e["run_dir"])
        elif kind == "baseline":
            self._call("metrics", _numbers({"baseline/top1": e.get("top1"), "baseline/top5": e.get("top5")}), 0)
        elif kind == "start":
            self._step = info.start_step = int(e.get("step", 0))
            self._open()
        elif kind == "step":
            self._on_step(e)
        elif kind == "eval":
            values = {name: e.get(key) for key, name in EVAL_KEYS.items()}
            self._call("metrics", _numbers(values), int(e.get("step", self._step)))
            if e.get("layers"):
                self._call("layers", e["layers"], int(e.get("step", self._step)))
        elif kind == "final":
            self._call("metrics", _numbers({f"final/{k}": e.get(k) for k in FINAL_KEYS}), self._step)

    def _on_step(self, e: dict) -> None:
        self._step = step = int(e["step"])
        for key in AVERAGED:
            if e.get(key) is not None:
                self._sums[key] = self._sums.get(key, 0.0) + float(e[key])
        self._count += 1
        if step % self.log_every and step != e.get("total_steps"):
            return
        values = {name: self._sums[key] / self._count for key, name in AVERAGED.items() if key in self._sums}
        values.update({name: e.get(key) for key, name in STEP_KEYS.items()})
        values["train/epoch"] = e.get("epoch")
        self._sums, self._count = {}, 0
        self._call("metrics", _numbers(values), step)
        if e.get("layers"):
            self._call("layers", e["layers"], step)

    def finish(self, result=None) -> None:
        """After a finished run: the summary, the per-layer figures and the report page; then close."""
        if not self.active or self._closed:
            return
        if result is not None and self._opened:
            try:
                files, layers = self._end_files(result)
            except Exception as exc:  # the checkpoint is written; its report is a nicety here
                files, layers = [], []
                self._emit({"event": "note", "text": f"warning: tracking: no report page ({one_line(exc)})"})
            if layers:
                self._call("layers", layers, self._step)
            self._call("finish", _flat_summary(result), files, self._step)
        self.close("FINISHED")

    def close(self, status: str = "FAILED") -> None:
        """Close every backend (``FINISHED``, ``FAILED`` or ``KILLED``) and wait, bounded, for the worker."""
        if not self.active or self._closed:
            return
        self._closed = True
        if self._opened:
            self._queue.put(("close", (status,)))
            self._queue.put(None)
            assert self._thread is not None
            self._thread.join(FLUSH_TIMEOUT_S)
            if self._thread.is_alive():
                self._emit({"event": "note", "text": f"warning: tracking: still sending after {FLUSH_TIMEOUT_S:.0f} s; "
                            "not waiting (the last figures may be missing)"})
        self._warn()

    # -- plumbing ----------------------------------------------------------------------------------
    def _call(self, method: str, *args) -> None:
        if self._opened:
            self._queue.put((method, args))
        elif not self._closed:
            self._pending.append((method, args))

    def _open(self) -> None:
        if self._opened:
            return
        if process_rank() != 0:  # torch.distributed is set up now: the launcher's RANK may have been absent
            self.active = False
            return
        self._opened = True
        self._thread = threading.Thread(target=self._work, name="codeq-tracking", daemon=True)
        self._thread.start()
        self._queue.put(("open", ()))
        for item in self._pending:
            self._queue.put(item)
        self._pending = []

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                self.worker_cpu_s = time.thread_time()
                return
            method, args = item
            if method == "open":
                self._open_backends()
                continue
            for b in self.backends:
                if b.name in self._failed:
                    continue
                try:
                    getattr(b, method)(*args)
                except Exception as exc:
                    self._fail(b.name, exc)
                    _quietly(b.abandon)  # local resources only: no request to a server that may be gone

    def _open_backends(self) -> None:
        previous = read_state(self.info.run_dir) if self.info.resumed else {}
        state = {}
        for b in self.backends:
            try:
                state[b.name] = b.open(self.info, previous.get(b.name) or {})
            except Exception as exc:
                self._fail(b.name, exc)
        if state:
            try:
                write_state(self.info.run_dir, {**previous, **state})
            except Exception as exc:
                self._fail("tracking", exc)

    def _fail(self, name: str, exc: BaseException) -> None:
        with self._lock:
            self._failed.setdefault(name, one_line(f"{type(exc).__name__}: {exc}", 300))
        if threading.current_thread() is threading.main_thread():
            self._warn()

    def _warn(self) -> None:
        """Each failed backend's one warning line, said on the main thread (the console is not thread-safe)."""
        with self._lock:
            new = [(k, v) for k, v in self._failed.items() if k not in self._warned]
            self._warned.update(k for k, _ in new)
        for name, why in new:
            self._emit({"event": "note", "text": f"warning: {name} logging failed and is off for the rest of the run "
                        f"({why}); the run goes on"})

    def _end_files(self, result) -> tuple[list[Path], list[dict]]:
        """The summary and the report page (written into the run folder) and the per-layer rows of the checkpoint."""
        from codeq_cli.commands.report import report_data
        from codeq_cli.commands.report_html import write_page
        from codeq_cli.formats.checkpoint import load

        run_dir = Path(result.run_dir)
        data = report_data(load(result.out))
        page = write_page(run_dir / "report.html", [data])
        files = [p for p in (run_dir / "summary.json", page) if p.is_file()]
        layers = [{"name": r["name"], "bits": r["bits"], "sparsity": r["sparsity"]}
                  for r in data["layers"] if r.get("quantized")]
        return files, layers


class _Inactive(Tracker):
    def __init__(self):
        super().__init__([], RunInfo(run_dir=Path(".")))


def open_tracker(kinds: list[str], *, run_dir: Path, log_dir: Path | None = None, log_every: int = 20,
                 command: str | None = None, name: str | None = None, group: str | None = None) -> Tracker:
    """A tracker for ``kinds`` (from :func:`parse_log_to`); inactive for none, or off rank 0.

    The packages are imported here (a missing one is a :class:`UsageError`);
    the backends open at the run's ``start`` event, in the worker thread.
    ``name`` and ``group`` default to ``CODEQ_TRACKING_NAME`` and
    ``CODEQ_TRACKING_GROUP`` (``codeq batch`` sets them for its jobs).
    """
    if log_dir is not None and "tensorboard" not in kinds:
        raise UsageError(f"--log-dir {str(log_dir)!r} is TensorBoard's folder, but --log-to has no tensorboard",
                         hint="add tensorboard to --log-to, or leave --log-dir out")
    if not kinds or process_rank() != 0:
        return _Inactive()
    check_installed(kinds)
    from codeq_cli.commands._tracking_backends import BACKENDS

    info = RunInfo(run_dir=Path(run_dir), log_dir=log_dir, command=command,
                   name=name or os.environ.get(NAME_ENV) or None, group=group or os.environ.get(GROUP_ENV) or None)
    return Tracker([BACKENDS[k]() for k in kinds], info, log_every=log_every)


def read_state(run_dir: Path) -> dict:
    """The backends' run ids saved by an earlier attempt of this run ({} when none or unreadable)."""
    try:
        data = json.loads((Path(run_dir) / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_state(run_dir: Path, state: dict) -> None:
    from codeq_cli._io import write_json

    write_json(Path(run_dir) / STATE_FILE, state)


def _numbers(values: dict) -> dict[str, float]:
    """The finite numbers of ``values`` (no None, no bools, no strings)."""
    out = {}
    for k, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(float(v)):
            out[k] = float(v)
    return out


def _flat_summary(result) -> dict:
    """The result's figures as one flat mapping of numbers and short strings."""
    d = result.to_dict() if hasattr(result, "to_dict") else dict(result)
    out: dict = {"file_bytes": d.get("file_bytes"), "seconds": d.get("seconds"), "out": d.get("out")}
    for group in ("metrics", "totals"):
        for k, v in (d.get(group) or {}).items():
            out.setdefault(k, v)
    for k, v in (d.get("budget") or {}).items():
        if isinstance(v, (int, float, str)):
            out[f"budget_{k}"] = v
    return {k: v for k, v in out.items() if v is not None and isinstance(v, (int, float, str))}


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except Exception:
        pass



def batch_tracking(kinds: list[str], log_dir: Path | None, group: str, default_dir: Path) -> dict | None:
    """The tracking settings ``codeq batch`` hands to each job (None without ``--log-to``); packages checked now."""
    if not kinds:
        if log_dir is not None:
            raise UsageError(f"--log-dir {str(log_dir)!r} is TensorBoard's folder, but --log-to has no tensorboard",
                             hint="add tensorboard to --log-to, or leave --log-dir out")
        return None
    open_tracker(kinds, run_dir=default_dir, log_dir=log_dir)  # the same checks as a job's, once, before any job
    return {"kinds": list(kinds), "log_dir": str(log_dir or default_dir), "group": group}


def job_tracking(tracking: dict | None, job_name: str) -> tuple[list[str], dict[str, str]]:
    """One job's extra ``codeq compress`` arguments and environment: its own run, grouped under the batch's name.

    TensorBoard: one subfolder per job of the batch's folder; MLflow: the
    batch's name is the experiment (and the ``codeq.group`` tag); W&B: it is the group.
    """
    if not tracking:
        return [], {}
    args = ["--log-to", ",".join(tracking["kinds"])]
    if "tensorboard" in tracking["kinds"]:
        args += ["--log-dir", str(Path(tracking["log_dir"]) / job_name)]
    return args, {GROUP_ENV: tracking["group"], NAME_ENV: job_name}

"""Terminal output for the CLI: results on stdout, everything else on stderr.

* ``--json``: exactly one JSON document on stdout; logs and progress on stderr.
* Not a terminal, or ``NO_COLOR`` set: no colours, no animation; progress is a
  plain line at a modest rate.
* ``--quiet``: only the result.

Only the CLI (and the report renderer) use this module; the library reports
through events and return values.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field

from rich.console import Console


def _plain() -> bool:
    return bool(os.environ.get("NO_COLOR")) or not sys.stderr.isatty()


@dataclass
class Output:
    json_mode: bool = False
    quiet: bool = False
    err: Console = field(init=False)
    out: Console = field(init=False)

    def __post_init__(self) -> None:
        plain = _plain()
        # Off a terminal rich would assume 80 columns and cut table cells; files and
        # pipes get a wide page instead.
        self.err = Console(stderr=True, no_color=plain, highlight=False, soft_wrap=True,
                           force_terminal=None if not plain else False,
                           width=None if sys.stderr.isatty() else 240)
        out_plain = bool(os.environ.get("NO_COLOR")) or not sys.stdout.isatty()
        self.out = Console(no_color=out_plain, highlight=False, soft_wrap=True,
                           force_terminal=None if not out_plain else False,
                           width=None if sys.stdout.isatty() else 240)

    @property
    def animated(self) -> bool:
        return not self.quiet and not _plain()

    def info(self, text: str) -> None:
        """A log line (stderr), suppressed by --quiet."""
        if not self.quiet:
            self.err.print(text, markup=False)

    def warn(self, text: str) -> None:
        self.err.print(f"warning: {text}", markup=False)

    def result(self, data: dict, human: str | None = None) -> None:
        """The command's result: JSON on stdout in --json mode, else the human text."""
        if self.json_mode:
            sys.stdout.write(json.dumps(data, indent=2, default=_default) + "\n")
            sys.stdout.flush()
        elif human is not None:
            self.out.print(human, markup=False)


def _default(obj):
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


# Compression figures a step or eval event may carry: (key, label, format).
FIGURES = (("sparsity", "sparsity", "{:.3f}"), ("avg_bits", "bits", "{:.2f}"), ("rel_bops", "rel BOPs", "{:.2f}%"))
# Loss terms beside the task loss and the penalty, shown when an event carries them.
LOSS_TERMS = (("distill_loss", "distill"),)


WAIT_SHOWN = 0.2  # the progress line says when a fifth or more of the time goes to waiting for data


def _figures(e: dict) -> list[str]:
    return [f"{label} {fmt.format(e[key])}" for key, label, fmt in FIGURES if e.get(key) is not None]


class TrainingDisplay:
    """Renders training events: a rich progress bar on a terminal, plain lines elsewhere."""

    def __init__(self, output: Output, plain_interval_s: float = 10.0):
        self.o = output
        self.interval = plain_interval_s
        self.last_plain = 0.0
        self.stats: dict = {}
        self.progress = None
        self.task = None
        self.quantized = True  # the start event says whether the model has quantizers (no penalty without)
        self.wait = 0.0  # the last logged share of time spent waiting for data

    def __enter__(self):
        if self.o.animated:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"),
                console=self.o.err,
                transient=False,
            )
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    def _status(self, e: dict) -> str:
        """The step's losses, the task loss and each extra term apart, then the last measured figures."""
        if "task_loss" in e:
            parts = [f"task loss {e['task_loss']:.3f}"]
            if self.quantized:
                parts.append(f"penalty {e['reg_loss']:.3f}")
            parts += [f"{label} {e[key]:.3f}" for key, label in LOSS_TERMS if e.get(key) is not None]
        else:
            parts = [f"loss {e['loss']:.3f}"] if "loss" in e else []
        if e.get("data_wait") is not None:
            self.wait = e["data_wait"]
        if self.wait >= WAIT_SHOWN:  # the loader, not the model, sets the pace: say so
            parts.append(f"waiting for data {100 * self.wait:.0f}%")
        return "  ".join(parts + _figures(self.stats))

    def __call__(self, e: dict) -> None:
        kind = e.get("event")
        if any(k in e for k, _, _ in FIGURES):  # only what was measured, never a placeholder
            self.stats = {k: e[k] for k, _, _ in FIGURES if k in e}
        if kind == "start":
            self.quantized = bool(e.get("quantized_layers", 1))
            if self.progress is not None:
                self.task = self.progress.add_task("training", total=e["total_steps"], completed=e["step"], status="")
            else:
                self.o.info(f"training: {e['total_steps']} steps, {e['steps_per_epoch']} per epoch, "
                            f"from step {e['step']}, {e['world_size']} process(es)")
        elif kind == "step":
            if self.progress is not None and self.task is not None:
                self.progress.update(self.task, completed=e["step"], description=f"epoch {e['epoch'] + 1}",
                                     status=self._status(e))
            elif time.monotonic() - self.last_plain >= self.interval or e["step"] == e["total_steps"]:
                self.last_plain = time.monotonic()
                self.o.info(f"step {e['step']}/{e['total_steps']} epoch {e['epoch'] + 1}  {self._status(e)}  lr {e['lr']:.2e}")
        elif kind == "eval":
            line = "  ".join([f"epoch {e['epoch'] + 1}: top-1 {e['top1']:.2f}%", f"top-5 {e['top5']:.2f}%", *_figures(e)])
            if self.progress is not None:
                self.progress.console.print(line, markup=False)
            else:
                self.o.info(line)
        elif kind == "saved" and e.get("reason") in ("interrupted", "non-finite loss"):
            self.o.info(f"run state saved at step {e['step']}")


# -- what the commands print: summaries, event handlers, tables ---------------------------------
def budget_lines(b: dict, m: dict) -> str:
    """The budget and accuracy lines of the summary ('' when there is nothing to say)."""
    from codeq_cli.train.budget import Budget

    budget = Budget.from_dict(b)
    lines = f"  budget: {budget.summary_line(b)}\n" if budget is not None else ""
    if m.get("top1_before_bn") is not None:
        lines += ("  batch-norm re-estimation: not kept (it broke --max-drop); the trained statistics give top-1 "
                  f"{m['top1']:.2f}%\n" if m.get("bn_kept", 1) == 0 else
                  f"  batch-norm re-estimation: top-1 {m['top1_before_bn']:.2f}% before, {m['top1']:.2f}% after\n")
    return lines


def compress_events(output):
    """An event handler for compress runs: log lines plus the training progress display."""
    progress = TrainingDisplay(output)
    state = {"open": False}

    def on_event(e: dict) -> None:
        kind = e.get("event")
        if kind in ("note", "stage"):
            if state["open"]:
                progress.__exit__(None, None, None)
                state["open"] = False
            output.info(e["text"])
        elif kind == "data":
            output.info(f"data: {e['train']} training and {e['val']} validation images, {e['classes']} classes, "
                        f"input {'x'.join(str(x) for x in e['input_size'][1:])}"
                        + (f" (crop {e['crop_pct']:g}, {e['interpolation']})" if "crop_pct" in e else ""))
        elif kind == "baseline":
            output.info(f"FP baseline: top-1 {e['top1']:.2f}%  top-5 {e['top5']:.2f}% ({e['samples']} images)")
        elif kind == "quantized":
            output.info(f"quantizers inserted into {e['layers']} layers")
        elif kind == "resumed":
            output.info(f"resumed at step {e['step']} (epoch {e['epoch'] + 1})")
        elif kind == "budget":
            if state["open"]:
                progress.__exit__(None, None, None)
                state["open"] = False
            t = e.get("trim") or {}
            if t.get("trimmed"):
                output.info(f"trim: {e['kind']} {t['before']:.4g} -> {t['after']:.4g} "
                            f"({t['weights_changed']} weights moved {'into' if t['direction'] == 'down' else 'out of'} the dead zones)")
        elif kind == "final":
            if state["open"]:
                progress.__exit__(None, None, None)
                state["open"] = False
            output.info(f"compressed model: top-1 {e['top1']:.2f}%  sparsity {e['sparsity']:.3f}  "
                        f"bits {e['avg_bits']:.2f}  rel BOPs {e['rel_bops']:.2f}%")
        else:
            if kind == "start" and not state["open"]:
                progress.__enter__()
                state["open"] = True
            progress(e)

    def close() -> None:
        if state["open"]:
            progress.__exit__(None, None, None)
            state["open"] = False

    on_event.close = close  # type: ignore[attr-defined]
    return on_event


class EvalProgress:
    """A progress bar over batches on a terminal; nothing otherwise."""

    def __init__(self, output) -> None:
        self.output = output
        self.bar = None
        self.task = None

    def __enter__(self):
        if self.output.animated:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("evaluating"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                console=self.output.err, transient=True)
            self.bar.start()
        return self

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            return
        if self.task is None:
            self.task = self.bar.add_task("eval", total=total)
        self.bar.update(self.task, completed=done, total=total)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


def batch_table(rows: list[dict], output) -> None:
    from rich.table import Table

    def pct(v):
        return "-" if v is None else f"{v:.2f}"

    from codeq_cli.commands.batch import budget_label

    table = Table(title="codeq batch", title_justify="left")
    budgets = any(r.get("budget") for r in rows)  # a column only when some job had a budget
    cols = ("job", "model", "recipe", *(("budget",) if budgets else ()), "FP top-1", "top-1", "drop", "rel BOPs %",
            "size MB", "time s", "status")
    for col in cols:
        table.add_column(col, justify="right" if col not in ("job", "model", "recipe", "budget", "status") else "left")
    for r in rows:
        status = r["status"] + (f": {r['error']}" if r.get("error") else "")
        table.add_row(r["name"], r["model"], r["recipe"], *((budget_label(r.get("budget")),) if budgets else ()),
                      pct(r["fp_top1"]), pct(r["top1"]), pct(r["drop"]),
                      pct(r["rel_bops"]), "-" if r["bytes"] is None else f"{r['bytes'] / 1e6:.2f}",
                      f"{r['seconds']:.0f}", status)
    output.out.print(table)


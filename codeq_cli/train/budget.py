"""What a run is compressed to: the :class:`Budget` value type (``docs/method.md``, "Compressing to a budget").

A budget is one of three kinds (codeq's extension, not the paper's):

- ``target_bops``: relative BOPs in percent of the dense FP32 BOPs (``codeq report``'s figure);
- ``target_size``: bytes of the compressed checkpoint as written;
- ``max_drop``: top-1 points below the FP model's, compressing as far as that allows.

Every place that needs to know something about a budget asks its
:class:`BudgetKind` (the recipe key and flag it comes from, the figure the
controller steers, the metric the checkpoint records, how it is printed):
nothing else in codeq compares kind names. A fourth kind is one more
:class:`BudgetKind` in :data:`KINDS`.

The module is plain Python (no torch): the recipe parses budgets with it, and
the CLI and the report print them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from codeq_cli.errors import UsageError

TOLERANCE = 0.03  # a target's end figure lies in [target·(1 − 3%), target]


@dataclass(frozen=True)
class Figure:
    """What the controller measures and steers during training: relative BOPs (%) or the file's bytes."""

    name: str  # "bops" or "size": the figure's name in the run state and the trim's report
    counts_activations: bool  # BOPs count input widths (so steer learned ones); the file does not

    def show(self, v: float) -> str:
        return f"{v:.3g}%" if self.counts_activations else f"{int(math.ceil(v))} bytes ({v / 1e6:.3f} MB)"

    def layer_cost(self, bits: int, act_bits: int, macs: int, params: int) -> float:
        """A layer's dense cost in this figure: ``bits · act_bits · MACs`` for BOPs, ``bits · params`` for the size."""
        return float(bits * act_bits * macs) if self.counts_activations else float(bits * params)


BOPS_FIGURE = Figure("bops", counts_activations=True)
SIZE_FIGURE = Figure("size", counts_activations=False)


@dataclass(frozen=True)
class BudgetKind:
    """One kind of budget and everything codeq does differently for it."""

    name: str  # in events, summaries and --json: "bops", "size", "max_drop"
    recipe_key: str  # the recipe key (and, with dashes, the flag)
    figure: Figure  # what training steers
    metric_key: str  # the checkpoint's metrics key holding the target
    achieved_metric: str  # the figure `codeq report` sets against the target: rel_bops, file_bytes, top1_drop
    searches: bool = False  # max_drop: a bound on accuracy, searched over evaluations (no figure to trim to)

    @property
    def flag(self) -> str:
        return "--" + self.recipe_key.replace("_", "-")

    @property
    def target_figure(self) -> bool:
        """A target figure (BOPs or bytes) trimmed to at the end; not a bound on accuracy."""
        return not self.searches

    @property
    def measures_file(self) -> bool:
        """The target is the file's own length (read from the file; its metadata cannot state it)."""
        return self.figure is SIZE_FIGURE and not self.searches

    def label(self, target: float) -> str:
        """``8% BOPs``, ``60000 B`` or ``drop 1``: a table cell."""
        if self.searches:
            return f"drop {target:g}"
        return f"{target:g}% BOPs" if self.figure is BOPS_FIGURE else f"{int(target)} B"

    def shown(self, target: float) -> str:
        """The target as the user typed it, for messages: ``--target-bops 4.5``."""
        return f"{self.flag} {target:g}" if self.figure is BOPS_FIGURE or self.searches else f"{self.flag} {int(target)}"


BOPS = BudgetKind("bops", "target_bops", BOPS_FIGURE, "budget_target_bops", "rel_bops")
SIZE = BudgetKind("size", "target_size", SIZE_FIGURE, "budget_target_size", "file_bytes")
MAX_DROP = BudgetKind("max_drop", "max_drop", BOPS_FIGURE, "budget_max_drop", "top1_drop", searches=True)
KINDS: dict[str, BudgetKind] = {k.name: k for k in (BOPS, SIZE, MAX_DROP)}
RECIPE_KEYS: tuple[str, ...] = tuple(k.recipe_key for k in KINDS.values())


@dataclass(frozen=True)
class Budget:
    """A run's budget: its kind and its value (percent, bytes or top-1 points)."""

    kind: BudgetKind
    value: float

    # -- where budgets come from
    @staticmethod
    def of(recipe: Any) -> Budget | None:
        """The budget a recipe sets (None: λ as given, the paper's way); the recipe allows at most one."""
        for kind in KINDS.values():
            value = getattr(recipe, kind.recipe_key, None)
            if value is not None:
                return Budget(kind, float(value))
        return None

    @staticmethod
    def from_metrics(metrics: Mapping[str, Any]) -> Budget | None:
        """The budget ``codeq compress`` recorded in a checkpoint's metrics (``budget_target_*``), or None."""
        for kind in KINDS.values():
            if metrics.get(kind.metric_key) is not None:
                return Budget(kind, float(metrics[kind.metric_key]))
        return None

    @staticmethod
    def from_dict(d: Mapping[str, Any] | None) -> Budget | None:
        """From :meth:`to_dict`'s ``{"kind", "target"}`` (or a summary's budget entry); None for an empty one."""
        if not d or d.get("kind") not in KINDS:
            return None
        target = d.get("target", d.get("max_drop"))
        return Budget(KINDS[d["kind"]], float(target)) if target is not None else None

    def to_dict(self) -> dict:
        return {"kind": self.kind.name, "target": self.value}

    # -- how it is printed
    def label(self) -> str:
        return self.kind.label(self.value)

    def summary_line(self, entry: Mapping[str, Any]) -> str:
        """The summary's budget line for the run's budget entry (what :func:`~codeq_cli.train.finish.finish_budget` returned)."""
        if self.kind.searches:
            if entry.get("met"):
                return f"top-1 within {self.value:g} points of FP; checkpoint from epoch {entry['best_epoch'] + 1}"
            return f"no evaluation stayed within {self.value:g} points; the final model is written"
        if self.kind.figure is BOPS_FIGURE:
            return f"target {entry['target']:.3g}% rel BOPs, achieved {entry['achieved']:.3g}%"
        return f"target {int(entry['target'])} bytes, achieved {int(entry['achieved'])} bytes"

    def flat_metrics(self, entry: Mapping[str, Any]) -> dict:
        """The budget entry as the checkpoint's metrics hold it: plain numbers under ``budget_*`` keys."""
        # A file cannot state its own size stably (its metadata is compressed): a size budget's
        # achieved figure is the file's length, which `codeq report` reads from the file itself.
        out = {} if self.kind.measures_file else {"budget_achieved": float(entry["achieved"])}
        if self.kind.searches:
            out[self.kind.metric_key] = float(entry["max_drop"])
            out["budget_best_epoch"] = entry["best_epoch"]
            return out
        out[self.kind.metric_key] = float(entry["target"])
        out["budget_before_trim"] = float(entry["before_trim"])
        out["budget_trimmed_weights"] = int(entry["trim"]["weights_changed"])
        return out

    def target_pair(self, metrics: Mapping[str, Any], totals: Mapping[str, Any]) -> dict | None:
        """``{"target", "achieved", "metric"}`` for the report, or None when the file cannot say (no FP top-1)."""
        metric = self.kind.achieved_metric
        if self.kind.searches:
            if metrics.get("top1_drop") is None:
                return None
            return {"target": self.value, "achieved": metrics["top1_drop"], "metric": metric}
        return {"target": self.value, "achieved": totals[metric], "metric": metric}

    # -- checks before training
    def check_reachable(self, low: float, start: float, size_floor: float | None = None) -> None:
        """Refuse a target outside ``(low, start)``: one line naming the reachable range."""
        fig = self.kind.figure
        shown = self.kind.shown(self.value)
        span = f"reachable from this start: {fig.show(low)} to {fig.show(start)}"
        if size_floor is not None and self.value < size_floor:
            raise UsageError(f"{shown} is smaller than the float tensors and metadata alone ({int(size_floor)} bytes)",
                             hint=f"{span}; exclude fewer layers or raise the target")
        if self.value >= start:
            raise UsageError(f"{shown} is already met at the start ({fig.show(start)})",
                             hint=f"{span}; choose a smaller target")
        if self.value <= low * (1 + TOLERANCE):
            raise UsageError(f"{shown} is below what the allowed bit-widths and sparsity can give",
                             hint=f"{span}; raise the target, or lower b_min/bits")


def one_budget(values: Mapping[str, Any]) -> list[str]:
    """The budget keys set (not None) in ``values``, in :data:`KINDS` order: a recipe allows at most one."""
    return [k for k in RECIPE_KEYS if values.get(k) is not None]


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(value) -> int:
    """``2MB``, ``1.5 MiB``, ``800kB``, ``123456`` → bytes (MB = 10⁶ bytes, MiB = 2²⁰)."""
    if isinstance(value, bool):
        raise ValueError("not a size")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{value!r} is not a size")
    return int(round(float(m.group(1)) * _UNITS[m.group(2).lower()]))

"""What a compressed checkpoint holds, as data first and text second.

:func:`report_data` turns a loaded checkpoint into one plain dict (the JSON
that ``codeq report --json`` prints; schema in ``docs/report.md``) from the
metadata alone: no model is built and no data is read, so it answers in the
time it takes to read the file. The renderers (:func:`render_table`,
:func:`to_csv`, :func:`to_markdown`) take only that dict.

BOPs follow ``docs/method.md``, "BOPs" (:mod:`codeq_cli.core.bops`): products of
two activations (attention's ``QKᵀ`` and ``AV``) are in neither sum.
"""

from __future__ import annotations

import csv
import io
import math
from typing import TYPE_CHECKING

from codeq_cli.core.bops import A_BITS, FP_BITS, bops_totals

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console

    from codeq_cli.formats.checkpoint import CompressedModel

LAYER_KEYS = ("name", "kind", "shape", "params", "macs", "bits", "sparsity", "bops", "bops_share", "quantized", "act_bits")
NOTES = ("BOPs count the weight × activation products of convolution and linear layers at 32-bit activations; "
         "products of two activations (attention's QKᵀ and AV) are in neither sum",)
# With activation quantizers (codeq's extension, docs/method.md): what the BOPs then count.
ACT_NOTES = ("BOPs count the weight × activation products of convolution and linear layers at each layer's weight "
             "bits × input activation bits (a-bits; 32 where the input stays float, e.g. layers excluded by "
             "act_exclude); products of two activations (attention's QKᵀ and AV) are in neither sum",)


def report_data(ckpt: CompressedModel) -> dict:
    """The report of a checkpoint as plain data (see ``docs/report.md``)."""
    rows = ckpt.rows
    t = bops_totals(rows)
    bops = t["bops"]
    layers = [
        {
            "name": r.name,
            "kind": r.kind,
            "shape": list(r.shape),
            "params": r.params,
            "macs": r.macs,
            "bits": r.bits,
            "sparsity": r.sparsity,
            "bops": r.bops,
            "bops_share": 100.0 * r.bops / bops if bops else 0.0,
            "quantized": r.quantized,
            "act_bits": r.act_bits,  # codeq's extension: 32 = float activations
        }
        for r in rows
    ]
    bound = ckpt.entropy_bound_bits / 8.0
    weight_bytes = ckpt.weight_bytes
    fp32 = ckpt.fp32_bytes
    totals = {
        "layers": t["layers"],
        "quantized_layers": t["quantized_layers"],
        "params": t["params"],
        "quantized_params": t["quantized_params"],
        "macs": t["macs"],
        "bops": bops,
        "dense_bops": t["macs"] * FP_BITS * A_BITS,
        "rel_bops": t["rel_bops"],
        "sparsity": t["sparsity"],
        "avg_bits": t["avg_bits"],
        "mean_layer_sparsity": t["mean_layer_sparsity"],
        "mean_layer_bits": t["mean_layer_bits"],
        **{k: t[k] for k in ("min_layer_bits", "max_layer_bits", "min_layer_sparsity", "max_layer_sparsity")},
        "file_bytes": ckpt.file_bytes,
        "fp32_bytes": fp32,
        "weight_bytes": weight_bytes,
        "entropy_bound_bytes": bound,
        "compression_ratio": fp32 / ckpt.file_bytes if ckpt.file_bytes else 0.0,
        "file_vs_bound": ckpt.file_bytes / bound if bound else None,
        "weights_vs_bound": weight_bytes / bound if bound else None,
    }
    spec = ckpt.spec
    model = {
        "label": spec.label,
        **spec.to_dict(),
        "input_size": list(ckpt.data_config.input_size),
        "classes": len(ckpt.class_names) if ckpt.class_names is not None else None,
    }
    return {
        "file": str(ckpt.path),
        "format_version": ckpt.format_version,
        "model": model,
        "layers": layers,
        "totals": totals,
        "metrics": dict(ckpt.metrics),
        "recipe": dict(ckpt.recipe),
        "provenance": dict(ckpt.provenance),
        "history": ckpt.history,
        "budget": budget_pair(ckpt.meta.get("budget") or _budget_from_metrics(ckpt.metrics, totals)),
        "notes": list(ACT_NOTES if any(r.act_bits != A_BITS for r in rows) else NOTES),
    }


def _figure(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def top1_line(metrics: dict, compressed: str, fp: str, change: str) -> str:
    """The compressed and FP top-1 and their difference, each given a format; "" when neither was measured."""
    top1, base = metrics.get("top1"), metrics.get("fp_top1")
    parts = [compressed.format(top1)] if top1 is not None else []
    parts += [fp.format(base)] if base is not None else []
    parts += [change.format(top1 - base)] if top1 is not None and base is not None else []
    return ", ".join(parts)


def budget_of(metrics: dict) -> dict | None:
    """The budget ``codeq compress`` recorded in the metrics: ``{"kind", "target"}``, or None (λ as given)."""
    from codeq_cli.train.budget import Budget

    b = Budget.from_metrics(metrics)
    return None if b is None else b.to_dict()


def _budget_from_metrics(m: dict, totals: dict) -> dict | None:
    """The budget ``codeq compress`` recorded in the metrics (``budget_target_*``), as a target/achieved pair."""
    from codeq_cli.train.budget import Budget

    b = Budget.from_metrics(m)
    return None if b is None else b.target_pair(m, totals)


def budget_pair(budget) -> dict | None:
    """A budget's target and achieved figures, when the checkpoint records them (optional metadata ``budget``).

    ``{"target": T, "achieved": A, ...}`` where ``T`` and ``A`` are numbers (the
    figure named by ``metric``, default ``rel_bops``) or objects of figure name
    to number. Returns ``{"rows": [{"figure", "target", "achieved"}], ...}``
    with the other keys kept, or None when there is no usable pair.
    """
    if not isinstance(budget, dict) or "target" not in budget or "achieved" not in budget:
        return None
    target, achieved = budget["target"], budget["achieved"]
    if isinstance(target, dict) and isinstance(achieved, dict):
        names = [k for k in target if isinstance(k, str)] + [k for k in achieved if isinstance(k, str) and k not in target]
        rows = [{"figure": k, "target": _figure(target.get(k)), "achieved": _figure(achieved.get(k))} for k in names]
    else:
        metric = budget.get("metric") if isinstance(budget.get("metric"), str) else "rel_bops"
        rows = [{"figure": metric, "target": _figure(target), "achieved": _figure(achieved)}]
    rows = [r for r in rows if r["target"] is not None or r["achieved"] is not None]
    if not rows:
        return None
    return {"rows": rows, **{k: v for k, v in budget.items() if k not in ("target", "achieved", "rows")}}


# -- formatting helpers -----------------------------------------------------------


def _si(n: float) -> str:
    """``11689512`` → ``11.69M``."""
    n = float(n)
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _shape(shape) -> str:
    return "×".join(str(d) for d in shape)


def _flat(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out += _flat(v, key + ".")
        else:
            out.append((key, v))
    return out


def _value(v) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(_value(x) for x in v) if v else "[]"
    if isinstance(v, float):
        return f"{v:g}"
    return "none" if v is None else str(v)


_RECIPE_CORE = ("mode", "bits", "b_min", "b_max", "lambda_dz", "lambda_bit", "optimizer", "lr", "lr_dz", "lr_bit",
                "epochs", "schedule", "batch_size")


def recipe_line(recipe: dict) -> str:
    """The recipe's essentials on one line: precision, λ, optimizer, regime (and patterns if any)."""
    if not recipe:
        return "(none recorded)"
    if not all(k in recipe for k in _RECIPE_CORE):  # not a codeq recipe: show it all
        return " ".join(f"{k}={_value(v)}" for k, v in _flat(recipe))
    r = recipe
    mixed = r["mode"] == "mixed"
    parts = [f"mixed {r['b_min']}-{r['b_max']} bits" if mixed else f"fixed {r['bits']} bits",
             f"lambda_dz={_value(r['lambda_dz'])}"]
    if mixed:
        parts.append(f"lambda_bit={_value(r['lambda_bit'])}")
    lrs = f"{r['optimizer']} lr={_value(r['lr'])} lr_dz={_value(r['lr_dz'])}"
    if mixed:
        lrs += f" lr_bit={_value(r['lr_bit'])}"
    parts += [lrs, f"{r['epochs']} epochs {r['schedule']}", f"batch {r['batch_size']}"]
    act = r.get("act_bits")
    if act is not None:  # codeq's extension
        parts.append(f"activations {r.get('act_b_min')}-{r.get('act_b_max')} bits learned" if act == "learned"
                     else f"activations {act} bits")
    for key in ("include", "exclude"):
        if r.get(key):
            parts.append(f"{key}={_value(r[key])}")
    return ", ".join(parts)


def summary_lines(data: dict) -> list[str]:
    """The summary under the table, also used by :func:`to_markdown`."""
    t, m = data["totals"], data["metrics"]
    lines = [
        f"params {_si(t['params'])} ({_si(t['quantized_params'])} quantized in {t['quantized_layers']} of {t['layers']} layers), "
        f"MACs {_si(t['macs'])}, relative BOPs {t['rel_bops']:.2f}%",
        f"sparsity {t['sparsity']:.3f}, bits {t['avg_bits']:.2f} (parameter-weighted; layer means "
        f"{t['mean_layer_sparsity']:.3f} and {t['mean_layer_bits']:.2f})",
        f"per layer: bits {t['min_layer_bits']}–{t['max_layer_bits']}, "
        f"sparsity {t['min_layer_sparsity']:.3f}–{t['max_layer_sparsity']:.3f}",
    ]
    if m.get("budget_target_bops") is not None:
        lines.append(f"budget: target {m['budget_target_bops']:.3g}% relative BOPs, achieved {t['rel_bops']:.3g}%")
    elif m.get("budget_target_size") is not None:
        lines.append(f"budget: target {int(m['budget_target_size'])} bytes, file {t['file_bytes']} bytes")
    elif m.get("budget_max_drop") is not None:
        epoch = m.get("budget_best_epoch")
        lines.append(f"budget: top-1 within {m['budget_max_drop']:g} points of FP"
                     + (f", checkpoint from epoch {int(epoch) + 1}" if epoch is not None else ", not met"))
    size = f"file {_mb(t['file_bytes'])}, fp32 {_mb(t['fp32_bytes'])}: {t['compression_ratio']:.1f}× smaller"
    if t["file_vs_bound"] is not None:
        size += (f"; entropy bound of the codes {_mb(t['entropy_bound_bytes'])} (file {t['file_vs_bound']:.3f}×, "
                 f"coded weights {t['weights_vs_bound']:.4f}× the bound)")
    lines.append(size)
    top1 = top1_line(m, "top-1 {:.2f}% (compressed)", "{:.2f}% (FP)", "change {:+.2f}")
    if top1:
        lines.append(top1)
    lines.append(f"recipe: {recipe_line(data['recipe'])}")
    return lines


def shows_act_bits(layers: list[dict]) -> bool:
    """Whether any layer's input is quantized: the tables and the page show ``a-bits`` only then."""
    return any(layer.get("act_bits", A_BITS) != A_BITS for layer in layers)


def _cells(layer: dict, act: bool = True) -> list[str]:
    cells = [
        layer["name"],
        layer["kind"],
        _shape(layer["shape"]),
        _si(layer["params"]),
        _si(layer["macs"]),
        str(layer["bits"]) if layer["quantized"] else "fp32",
        str(layer["act_bits"]) if layer["act_bits"] != A_BITS else "fp32",
        f"{layer['sparsity']:.3f}",
        _si(layer["bops"]),
        f"{layer['bops_share']:.2f}%",
    ]
    return _columns(cells, act)


def _total_cells(data: dict, act: bool = True) -> list[str]:
    t = data["totals"]
    cells = ["total", "", "", _si(t["params"]), _si(t["macs"]), f"{t['avg_bits']:.2f}", "", f"{t['sparsity']:.3f}",
             _si(t["bops"]), "100.00%" if t["bops"] else "0.00%"]
    return _columns(cells, act)


_HEADERS = ("layer", "kind", "shape", "params", "MACs", "bits", "a-bits", "sparsity", "BOPs", "share")


_ACT = _HEADERS.index("a-bits")


def _columns(row, act: bool):
    """``row`` (one value per :data:`_HEADERS`), without ``a-bits`` when every input is float (as the page)."""
    return row if act else type(row)([*row[:_ACT], *row[_ACT + 1:]])


def _headers(act: bool) -> tuple[str, ...]:
    return _columns(_HEADERS, act)


# -- renderers --------------------------------------------------------------------


def render_table(data: dict, console: Console) -> None:
    """A rich table of the layers with a totals row, then the summary."""
    from rich.table import Table

    m = data["model"]
    title = f"{m['label']}  {_shape(m['input_size'])}  ({data['file']})"
    table = Table(title=title, title_justify="left")
    act = shows_act_bits(data["layers"])
    for i, h in enumerate(_headers(act)):
        table.add_column(h, justify="left" if i < 3 else "right", no_wrap=i == 0)
    layers = data["layers"]
    for i, layer in enumerate(layers):
        table.add_row(*_cells(layer, act), end_section=i == len(layers) - 1)
    table.add_row(*_total_cells(data, act), style="bold")
    console.print(table)
    for line in summary_lines(data):
        console.print(line, markup=False, highlight=False)
    for note in data.get("notes", ()):
        console.print(f"note: {note}", markup=False, highlight=False, style="dim")


def to_csv(data: dict) -> str:
    """One row per layer, the columns of ``layers`` in the JSON (shape as ``64x3x7x7``)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(LAYER_KEYS)
    for layer in data["layers"]:
        w.writerow([
            layer["name"], layer["kind"], "x".join(str(d) for d in layer["shape"]), layer["params"], layer["macs"],
            layer["bits"], repr(float(layer["sparsity"])), repr(float(layer["bops"])), repr(float(layer["bops_share"])),
            layer["quantized"], layer["act_bits"],
        ])
    return buf.getvalue()


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def to_markdown(data: dict) -> str:
    """A heading, the summary as a list, and the per-layer table with a totals row."""
    m = data["model"]
    out = [f"## {m['label']} ({_shape(m['input_size'])})", ""]
    out += [f"- {_md_escape(line)}" for line in summary_lines(data)]
    act = shows_act_bits(data["layers"])
    headers = _headers(act)
    out += ["", "| " + " | ".join(headers) + " |", "|" + "|".join(":---" if i < 3 else "---:" for i in range(len(headers))) + "|"]
    for layer in data["layers"]:
        out.append("| " + " | ".join(_md_escape(c) for c in _cells(layer, act)) + " |")
    out.append("| " + " | ".join(f"**{c}**" if c else "" for c in _total_cells(data, act)) + " |")
    for note in data.get("notes", ()):
        out += ["", f"Note: {note}."]
    return "\n".join(out) + "\n"

"""The report as one self-contained HTML page: a checkpoint, its training, and several runs side by side.

Data first, rendering second: the pages are drawn from :func:`report_data`
dicts only (``docs/report.md``), the figures by :mod:`codeq_cli.commands._plots`
(matplotlib's SVG, inlined). A page makes no request of any kind: no script,
no external stylesheet, font or image; it reads the same without JavaScript,
in a light or dark browser theme, and printed. Every table cell carries the
exact JSON value in ``data-value`` (the text shows it rounded), so the numbers
on the page are those of ``codeq report --json``. Everything taken from a file
is HTML-escaped.
"""

from __future__ import annotations

import json
import os
from html import escape
from pathlib import Path

from codeq_cli._version import __version__
from codeq_cli.commands import _plots
from codeq_cli.commands.report import LAYER_KEYS, _mb, _shape, _si, recipe_line, shows_act_bits, top1_line

_CSS = """
:root { color-scheme: light dark; --bg: #ffffff; --fg: #1b1f24; --muted: #57606a; --rule: #d0d7de; --stripe: #f3f5f7;
        --accent: #2f6fab; }
@media (prefers-color-scheme: dark) {
  :root { --bg: #0f1419; --fg: #e6edf3; --muted: #9aa4ae; --rule: #343b44; --stripe: #171d24; --accent: #6cb0ee; }
}
@media print {
  :root { color-scheme: light; --bg: #ffffff; --fg: #000000; --muted: #404040; --rule: #9a9a9a; --stripe: #ffffff; }
  body { max-width: none; padding: 0; }
  .scroll { overflow: visible; }
  svg.plot, tr { break-inside: avoid; }
}
html { background: var(--bg); }
body { background: var(--bg); color: var(--fg); margin: 0 auto; max-width: 1100px; padding: 1.5rem;
       font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, "Noto Sans",
       "Liberation Sans", "DejaVu Sans", sans-serif; }
h1 { font-size: 1.5rem; margin: 0 0 .2rem; }
h2 { font-size: 1.15rem; margin: 2rem 0 .6rem; padding-bottom: .2rem; border-bottom: 1px solid var(--rule); }
h3 { font-size: 1rem; margin: 1.2rem 0 .4rem; }
.muted, .note { color: var(--muted); }
code, .mono { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, "DejaVu Sans Mono", monospace; font-size: .92em; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: .4rem 0; }
th, td { padding: .18rem .6rem; border-bottom: 1px solid var(--rule); text-align: left; vertical-align: top; }
thead th { border-bottom: 2px solid var(--rule); white-space: nowrap; }
tbody tr:nth-child(even) { background: var(--stripe); }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tfoot td { font-weight: 600; border-top: 2px solid var(--rule); }
table.summary th { font-weight: 600; white-space: nowrap; padding-right: 1.2rem; }
svg.plot { display: block; width: 100%; height: auto; color: var(--fg); margin: .4rem 0 .8rem; }
details { margin: .6rem 0; border: 1px solid var(--rule); border-radius: 6px; padding: .4rem .8rem; }
summary { cursor: pointer; font-weight: 600; }
a { color: var(--accent); }
footer { margin-top: 2.5rem; font-size: .85rem; }
""".strip()


def _page(title: str, body: list[str]) -> str:
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta name="color-scheme" content="light dark">',
        f"<title>{escape(title)}</title>",
        '<link rel="icon" href="data:,">',  # no favicon request
        f"<style>\n{_CSS}\n</style>",
        "</head>",
        "<body>",
        *body,
        f'<footer class="muted">Written by codeq {escape(__version__)}. One file: no scripts, no requests. '
        "Definitions: docs/report.md.</footer>",
        "</body>",
        "</html>",
        "",
    ])


def _cell(value, text: str | None = None, num: bool = False) -> str:
    """A table cell showing ``text`` (default: the value) and holding the exact value in ``data-value``."""
    shown = text if text is not None else ("" if value is None else str(value))
    cls = ' class="num"' if num else ""
    return f"<td{cls} data-value=\"{escape(json.dumps(value), quote=True)}\">{escape(shown)}</td>"


def _pct(v, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}%"


def _int(v) -> str:
    return f"{v:,}"


# -- one checkpoint -------------------------------------------------------------


def _budget_value(figure: str, v) -> str:
    """One side of a budget pair in the figure's own unit (``2.93%``, ``994,072 bytes``, ``0.8 points``)."""
    if v is None:
        return "–"
    if figure == "rel_bops":
        return f"{v:.3g}%"
    if figure == "file_bytes":
        return f"{int(round(v)):,} bytes"
    if figure == "top1_drop":
        return f"{v:.2f} points"
    return f"{v:.4g}"


def summary_rows(data: dict) -> list[tuple[str, str]]:
    """The terminal's summary as (label, text) pairs."""
    m, t, met = data["model"], data["totals"], data["metrics"]
    rows = [
        ("model", f"{m['label']}, input {_shape(m['input_size'])}"
         + (f", {m['classes']} classes" if m.get("classes") else "")),
        ("parameters", f"{_si(t['params'])} ({_si(t['quantized_params'])} quantized in {t['quantized_layers']} of "
                       f"{t['layers']} layers)"),
        ("MACs", f"{_si(t['macs'])} (dense, batch 1)"),
        ("relative BOPs", f"{t['rel_bops']:.2f}% of FP32"),
        ("sparsity", f"{t['sparsity']:.3f} (parameter-weighted; layer mean {t['mean_layer_sparsity']:.3f})"),
        ("mean bits", f"{t['avg_bits']:.2f} (parameter-weighted; layer mean {t['mean_layer_bits']:.2f})"),
        ("file size", f"{_mb(t['file_bytes'])}, fp32 {_mb(t['fp32_bytes'])}: {t['compression_ratio']:.1f}× smaller"),
    ]
    if t["file_vs_bound"] is not None:
        rows.append(("entropy bound", f"{_mb(t['entropy_bound_bytes'])}: file {t['file_vs_bound']:.3f}×, coded weights "
                                      f"{t['weights_vs_bound']:.4f}× the bound"))
    top1 = top1_line(met, "{:.2f}% compressed", "{:.2f}% FP", "change {:+.2f} points")
    if top1:
        rows.append(("top-1", top1))
    for row in (data.get("budget") or {}).get("rows", ()):
        target, achieved = (_budget_value(row["figure"], row[k]) for k in ("target", "achieved"))
        label = {"rel_bops": "relative BOPs", "file_bytes": "file size", "top1_drop": "top-1 drop"}.get(row["figure"], row["figure"])
        rows.append((f"budget ({label})", f"target {target}, achieved {achieved}"))
    rows.append(("recipe", recipe_line(data["recipe"])))
    prov = data.get("provenance") or {}
    made = ", ".join(f"{k} {prov[k]}" for k in ("codeq", "torch", "steps", "created") if k in prov)
    if made:
        rows.append(("written by", made))
    return rows


def _summary_table(data: dict) -> str:
    rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in summary_rows(data))
    return f'<table class="summary">{rows}</table>'


_LAYER_HEAD = {"name": "layer", "kind": "kind", "shape": "shape", "params": "params", "macs": "MACs", "bits": "bits",
               "sparsity": "sparsity", "bops": "BOPs", "bops_share": "share of BOPs", "quantized": "quantized",
               "act_bits": "a-bits"}
_NUM = {"params", "macs", "bits", "sparsity", "bops", "bops_share", "act_bits"}


def _layer_cells(layer: dict, keys: tuple[str, ...]) -> str:
    text = {
        "shape": _shape(layer["shape"]), "params": _int(layer["params"]), "macs": _int(layer["macs"]),
        "bits": str(layer["bits"]) if layer["quantized"] else "32 (float)", "sparsity": f"{layer['sparsity']:.4f}",
        "bops": _si(layer["bops"]), "bops_share": _pct(layer["bops_share"]),
        "quantized": "yes" if layer["quantized"] else "no",
        "act_bits": str(layer["act_bits"]) if layer["act_bits"] != 32 else "32 (float)",
    }
    return "".join(_cell(layer[k], text.get(k), num=k in _NUM) for k in keys)


def layer_keys_shown(layers: list[dict]) -> tuple[str, ...]:
    """The page's columns: ``LAYER_KEYS`` with the input widths beside the weights' bits, and only
    when some layer's input is quantized (a float-activation model would show 32 everywhere)."""
    keys = [k for k in LAYER_KEYS if k != "act_bits"]
    if shows_act_bits(layers):
        keys.insert(keys.index("bits") + 1, "act_bits")
    return tuple(keys)


def layer_table(data: dict) -> str:
    keys = layer_keys_shown(data["layers"])
    head = "".join(f'<th data-key="{k}"{" class=num" if k in _NUM else ""}>{_LAYER_HEAD[k]}</th>' for k in keys)
    body = "".join(f"<tr>{_layer_cells(layer, keys)}</tr>" for layer in data["layers"])
    t = data["totals"]
    totals = {"name": "total", "params": _int(t["params"]), "macs": _int(t["macs"]), "bits": f"{t['avg_bits']:.2f}",
              "sparsity": f"{t['sparsity']:.4f}", "bops": escape(_si(t["bops"])),
              "bops_share": "100.00%" if t["bops"] else "0.00%"}
    foot = "<tr>" + "".join(f'<td class="num">{totals[k]}</td>' if k in totals and k != "name" else
                            f"<td>{totals.get(k, '')}</td>" for k in keys) + "</tr>"
    return (f'<div class="scroll"><table class="layers"><thead><tr>{head}</tr></thead><tbody>{body}</tbody>'
            f"<tfoot>{foot}</tfoot></table></div>")


def _history_section(data: dict, n: int) -> list[str]:
    history = data.get("history")
    if not history or not history.get("step"):
        return ['<p class="note" id="no-history">This checkpoint holds no training history (it was written before '
                "codeq stored one, or its run logged no step), so there are no curves.</p>"]
    steps = len(history["step"])
    return [
        f'<p class="muted">{steps} points logged during training'
        + (f" (of {history['total_steps']} planned steps)" if history.get("total_steps") else "")
        + "; top-1 is measured on the validation set at the end of each epoch, by the fake-quantized model. "
        "The star is the decoded model as shipped.</p>",
        _plots.history_svg(history, data["metrics"], data.get("budget"), n=n),
    ]


def checkpoint_sections(data: dict, n: int = 0, level: int = 2) -> list[str]:
    """The body of one checkpoint's report; figure ids start at ``n``."""
    h = f"h{level}"
    notes = "".join(f"<p class=\"note\">Note: {escape(note)}.</p>" for note in data.get("notes", ()))
    return [
        f"<section class=\"summary\"><{h}>Summary</{h}>{_summary_table(data)}</section>",
        f"<section class=\"layers\"><{h}>Per layer, in network order</{h}>",
        _plots.layers_svg(data["layers"], n=n),
        layer_table(data),
        notes,
        "</section>",
        f"<section class=\"training\"><{h}>Training</{h}>",
        *_history_section(data, n + 1),
        "</section>",
    ]


def page(data: dict) -> str:
    """The HTML page of one checkpoint's :func:`report_data`."""
    m = data["model"]
    title = f"codeq report: {m['label']}"
    head = [f"<header><h1>{escape(title)}</h1>",
            f'<p class="muted mono">{escape(data["file"])}</p></header>']
    return _page(title, head + checkpoint_sections(data))


# -- several checkpoints ------------------------------------------------------------


def _labels(datas: list[dict]) -> list[str]:
    """Short names for the files: their stems, or the paths as given where two stems are the same."""
    stems = [Path(d["file"]).stem for d in datas]
    return [s if stems.count(s) == 1 else d["file"] for s, d in zip(stems, datas)]


def comparison(datas: list[dict]) -> dict:
    """The figures the comparison page shows, as data: one row per file, and the FP models."""
    labels = _labels(datas)
    rows = []
    for label, d in zip(labels, datas):
        t, met = d["totals"], d["metrics"]
        rows.append({"label": label, "file": d["file"], "model": d["model"]["label"], "recipe": recipe_line(d["recipe"]),
                     "fp_top1": met.get("fp_top1"), "top1": met.get("top1"), "rel_bops": t["rel_bops"],
                     "sparsity": t["sparsity"], "avg_bits": t["avg_bits"], "file_bytes": t["file_bytes"],
                     "compression_ratio": t["compression_ratio"], "pareto": False})
    plotted = [i for i, r in enumerate(rows) if _plots.is_finite(r["top1"]) and _plots.is_finite(r["rel_bops"])
               and r["rel_bops"] > 0]
    for k in _plots.pareto([(rows[i]["rel_bops"], rows[i]["top1"]) for i in plotted]):
        rows[plotted[k]]["pareto"] = True
    fp, seen = [], set()
    for r in rows:
        if _plots.is_finite(r["fp_top1"]) and (r["model"], r["fp_top1"]) not in seen:
            seen.add((r["model"], r["fp_top1"]))
            fp.append({"label": f"FP {r['model']}", "top1": r["fp_top1"]})
    return {"rows": rows, "plotted": plotted, "fp": fp}


_CMP_COLS = (("label", "file", False), ("model", "model", False), ("fp_top1", "FP top-1", True),
             ("top1", "top-1", True), ("rel_bops", "relative BOPs", True), ("sparsity", "sparsity", True),
             ("avg_bits", "mean bits", True), ("file_bytes", "file size", True),
             ("compression_ratio", "× smaller", True), ("pareto", "on the front", False), ("recipe", "recipe", False))


def _cmp_text(key: str, v) -> str:
    if v is None:
        return "–"
    return {"fp_top1": lambda: f"{v:.2f}%", "top1": lambda: f"{v:.2f}%", "rel_bops": lambda: f"{v:.2f}%",
            "sparsity": lambda: f"{v:.3f}", "avg_bits": lambda: f"{v:.2f}", "file_bytes": lambda: _mb(v),
            "compression_ratio": lambda: f"{v:.1f}×", "pareto": lambda: "yes" if v else ""}.get(key, lambda: str(v))()


def comparison_table(cmp: dict) -> str:
    head = "".join(f'<th data-key="{k}"{" class=num" if num else ""}>{escape(title)}</th>' for k, title, num in _CMP_COLS)
    body = "".join("<tr>" + "".join(_cell(r[k], _cmp_text(k, r[k]), num) for k, _, num in _CMP_COLS) + "</tr>"
                   for r in cmp["rows"])
    return f'<div class="scroll"><table class="comparison"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _jobs_table(jobs: list[dict]) -> str:
    cols = ("name", "model", "recipe", "status", "error", "seconds")
    head = "".join(f'<th data-key="{k}">{k}</th>' for k in cols)
    body = "".join("<tr>" + "".join(_cell(j.get(k), f"{j[k]:.0f} s" if k == "seconds" and j.get(k) is not None else None,
                                          num=k == "seconds") for k in cols) + "</tr>" for j in jobs)
    return f'<div class="scroll"><table class="jobs"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def comparison_page(datas: list[dict], *, title: str | None = None, jobs: list[dict] | None = None) -> str:
    """Several checkpoints: top-1 against relative BOPs with the Pareto front, a table, then each file's report.

    ``jobs`` (the rows of ``codeq batch``) adds a table of every job with its status, failed ones included.
    """
    title = title or f"codeq: {len(datas)} checkpoints compared"
    body = [f"<header><h1>{escape(title)}</h1></header>"]
    if jobs is not None:
        body += ["<section class=\"jobs\"><h2>Jobs</h2>", _jobs_table(jobs), "</section>"]
    if not datas:
        body.append('<p class="note">No checkpoint was written, so there is nothing to compare.</p>')
        return _page(title, body)
    cmp = comparison(datas)
    body.append("<section class=\"tradeoff\"><h2>Accuracy against cost</h2>")
    if cmp["plotted"]:
        runs = [{**cmp["rows"][i], "front": cmp["rows"][i]["pareto"]} for i in cmp["plotted"]]
        body.append('<p class="muted">Top-1 of each compressed model against its relative BOPs (log scale); the '
                    "Pareto front joins the runs no other run beats on both; FP models sit at 100%.</p>")
        body.append(_plots.tradeoff_svg(runs, cmp["fp"], n=0))
    missing = [f"{r['label']} ({'no top-1 recorded' if not _plots.is_finite(r['top1']) else 'zero BOPs'})"
               for i, r in enumerate(cmp["rows"]) if i not in cmp["plotted"]]
    if missing:
        body.append(f'<p class="note">Not plotted: {escape(", ".join(missing))}.</p>')
    body += [comparison_table(cmp), "</section>"]
    body.append("<section class=\"files\"><h2>Each checkpoint</h2>")
    for i, (label, d) in enumerate(zip(_labels(datas), datas)):
        body.append(f"<details><summary>{escape(label)}: {escape(d['model']['label'])}, top-1 "
                    f"{_cmp_text('top1', d['metrics'].get('top1'))}, relative BOPs {d['totals']['rel_bops']:.2f}%"
                    f"</summary><p class=\"muted mono\">{escape(d['file'])}</p>")
        body += checkpoint_sections(d, n=2 * i + 1, level=3)
        body.append("</details>")
    body.append("</section>")
    return _page(title, body)


def write_page(path: str | os.PathLike, datas: list[dict], *, title: str | None = None,
               jobs: list[dict] | None = None) -> Path:
    """Write the page of one report (or the comparison of several) to ``path``, atomically; returns the path."""
    from codeq_cli._io import write_text
    from codeq_cli.errors import UsageError

    p = Path(path)
    if p.is_dir():
        raise UsageError(f"--html {str(p)!r} is a folder", hint="give a file path such as report.html")
    if not datas and jobs is None:
        raise UsageError("there is no checkpoint to draw", hint="pass at least one checkpoint")
    text = page(datas[0]) if len(datas) == 1 and jobs is None else comparison_page(datas, title=title, jobs=jobs)
    write_text(p, text)
    return p

"""The figures of the HTML report, drawn by matplotlib as static SVG text to inline in the page.

No pyplot and no global backend: each figure is a bare
:class:`matplotlib.figure.Figure` saved through the SVG backend, so a user's
own matplotlib session is left alone. The output is deterministic (fixed
``svg.hashsalt``, no date, the bundled DejaVu Sans) and self-contained:
text is drawn as paths, so the page needs no font. Axes, ticks and text are
drawn in a placeholder colour that is replaced by ``currentColor``, so each
figure takes the page's text colour (light theme, dark theme, print); the
data colours are mid-tones readable on both backgrounds. Element ids are
prefixed per figure so that several figures can share one page.

Every label that comes from a file (layer names, file names) is drawn with
mathtext off: a ``$`` in a name is a dollar sign.
"""

from __future__ import annotations

import io
import math
import re
from html import escape

FG = "#010203"  # placeholder for currentColor
BITS, SPARSITY, SHARE, FLOAT = "#3a86c8", "#e69f00", "#009e73", "#8c8c8c"
LOSS, TOP1, BOPS, FP, FRONT = "#cc79a7", "#3a86c8", "#009e73", "#8c8c8c", "#d55e00"

_RC = {
    "svg.hashsalt": "codeq", "svg.fonttype": "path", "font.family": "DejaVu Sans", "font.size": 8.0,
    "text.color": FG, "axes.edgecolor": FG, "axes.labelcolor": FG, "xtick.color": FG, "ytick.color": FG,
    "axes.facecolor": "none", "figure.facecolor": "none", "savefig.facecolor": "none", "savefig.edgecolor": "none",
    "axes.spines.top": False, "axes.spines.right": False, "grid.color": FG, "grid.alpha": 0.15,
    "legend.frameon": False, "axes.titlesize": 9.0, "axes.titleweight": "bold", "axes.titlelocation": "left",
}


def _svg(fig, n: int, label: str) -> str:
    """The figure as an ``<svg>`` element for inline use (no XML prolog or comments, ids prefixed with ``f{n}-``)."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": "codeq"})
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    text = re.sub(r"<metadata>.*?</metadata>|<!--.*?-->\n?", "", text, flags=re.S)
    text = re.sub(r'(id="|href="#|url\(#)([^")]+)', lambda m: f"{m.group(1)}f{n}-{m.group(2)}", text)
    text = text.replace(FG, "currentColor")
    return re.sub(r'<svg([^>]*?) width="[^"]*" height="[^"]*"', lambda m: f'<svg{m.group(1)} class="plot" role="img" '
                  f'aria-label="{escape(label, quote=True)}"', text, count=1)


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=72, layout="constrained")


def _no_math(texts) -> None:
    for t in texts:
        t.set_parse_math(False)


def layers_svg(layers: list[dict], n: int = 0) -> str:
    """Bit-width, sparsity and share of BOPs per layer, in network order (one row per layer)."""
    import matplotlib
    import matplotlib.ticker

    with matplotlib.rc_context(_RC):
        count = len(layers)
        fig = _figure(9.0, max(2.2, 0.17 * count + 1.0))
        axes = fig.subplots(1, 3, sharey=True, width_ratios=[1.1, 1.0, 1.0])
        y = list(range(count))
        quantized = [lay["quantized"] for lay in layers]
        qbits = [lay["bits"] for lay in layers if lay["quantized"]]
        # quantized inputs (codeq's activation quantizers): a diamond at each layer's input width
        acts = [(i, lay["act_bits"]) for i, lay in enumerate(layers) if lay.get("act_bits", 32) < 32]
        top = max(qbits + [a for _, a in acts], default=8)
        ax = axes[0]
        floats = [i for i, q in enumerate(quantized) if not q]
        ax.barh([i for i, q in enumerate(quantized) if q], qbits, height=0.7, color=BITS, edgecolor="none")
        if floats:  # a layer left in float: a hatched bar across the axis, labelled
            ax.barh(floats, [top] * len(floats), height=0.7, color=FLOAT, hatch="//", edgecolor="none")
        for i, q in enumerate(quantized):
            if not q:
                ax.text(top * 0.03, i, "float", va="center", ha="left", fontsize=6.5, color="white")
        if acts:
            ax.scatter([a for _, a in acts], [i for i, _ in acts], marker="D", s=12, color=FG, zorder=3, linewidths=0)
        ax.set_xlim(0, top + 0.5)
        ax.set_xticks(range(0, top + 1, 2 if top > 6 else 1))
        ax.set_title("bit-width (bars: weights, ◆: inputs)" if acts else "bit-width")
        ax.set_yticks(y, [lay["name"] for lay in layers], fontsize=7)
        _no_math(ax.get_yticklabels())
        ax.invert_yaxis()
        axes[1].barh(y, [lay["sparsity"] for lay in layers], height=0.7, color=SPARSITY, edgecolor="none")
        axes[1].set_xlim(0, 1)
        axes[1].set_title("sparsity (fraction of zero weights)")
        axes[2].barh(y, [lay["bops_share"] for lay in layers], height=0.7, color=SHARE, edgecolor="none")
        axes[2].set_title("share of BOPs (%)")
        axes[2].set_xlim(0, max([lay["bops_share"] for lay in layers] + [1.0]) * 1.08)
        for a in axes:
            a.grid(axis="x")
            a.tick_params(axis="y", length=0)
            a.set_axisbelow(True)
            a.set_ylim(count - 0.5, -0.5)
        label = "bit-width" + (" of weights and inputs" if acts else "")
        return _svg(fig, n, f"{label}, sparsity and share of BOPs of each layer")


def _series(history: dict, key: str) -> tuple[list[int], list[float]]:
    pairs = [(s, v) for s, v in zip(history["step"], history[key]) if v is not None]
    return [s for s, _ in pairs], [v for _, v in pairs]


def history_svg(history: dict, metrics: dict, budget: dict | None = None, n: int = 0) -> str:
    """Task loss, validation top-1, relative BOPs, sparsity and mean bits against the step."""
    import matplotlib
    import matplotlib.ticker

    panels = [
        ("task_loss", "task loss (cross-entropy)", LOSS),
        ("top1", "validation top-1 (%)", TOP1),
        ("rel_bops", "relative BOPs (%)", BOPS),
        ("sparsity", "sparsity", SPARSITY),
        ("avg_bits", "mean bits (parameter-weighted)", BITS),
    ]
    last = history["step"][-1] if history["step"] else 0
    with matplotlib.rc_context(_RC):
        fig = _figure(9.0, 1.55 * len(panels) + 0.4)
        axes = fig.subplots(len(panels), 1, sharex=True)
        for ax, (key, title, color) in zip(axes, panels):
            xs, ys = _series(history, key)
            ax.set_title(title)
            ax.grid(True)
            if xs:
                ax.plot(xs, ys, color=color, lw=1.4, marker="o" if len(xs) < 30 or key == "top1" else None, ms=3)
            else:
                ax.text(0.5, 0.5, "not logged", transform=ax.transAxes, ha="center", va="center", alpha=0.6)
            if key == "top1":
                if metrics.get("fp_top1") is not None:
                    ax.axhline(metrics["fp_top1"], color=FP, ls="--", lw=1, label=f"FP model {metrics['fp_top1']:.2f}")
                if metrics.get("top1") is not None:
                    ax.plot([last], [metrics["top1"]], marker="*", ms=9, color=FRONT, ls="none",
                            label=f"decoded model {metrics['top1']:.2f}")
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(loc="lower right", fontsize=7)
            if key == "rel_bops" and ys and max(ys) / max(min(ys), 1e-9) > 10:
                ax.set_yscale("log")
            for row in (budget or {}).get("rows", ()):
                if row["figure"] == key and row["target"] is not None:
                    ax.axhline(row["target"], color=FRONT, ls=":", lw=1.2, label=f"target {row['target']:g}")
                    ax.legend(loc="upper right", fontsize=7)
        axes[-1].set_xlabel("optimizer step")
        if history.get("total_steps"):
            axes[-1].set_xlim(0, max(history["total_steps"], last) * 1.03)
        return _svg(fig, n, "task loss, validation top-1, relative BOPs, sparsity and mean bits against the step")


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats (lower or equal BOPs and higher or equal top-1, one strictly)."""
    front = []
    for i, (b, t) in enumerate(points):
        beaten = any((b2 <= b and t2 >= t) and (b2 < b or t2 > t) for j, (b2, t2) in enumerate(points) if j != i)
        if not beaten:
            front.append(i)
    return sorted(front, key=lambda i: points[i])


def tradeoff_svg(runs: list[dict], fp: list[dict], n: int = 0) -> str:
    """Top-1 against relative BOPs (log axis): one labelled point per run, the Pareto front, the FP models.

    ``runs``: ``{"label", "rel_bops", "top1", "front"}``; ``fp``: ``{"label", "top1"}`` drawn at 100 %.
    """
    import matplotlib
    import matplotlib.ticker

    with matplotlib.rc_context(_RC):
        fig = _figure(9.0, 4.8)
        ax = fig.subplots()
        ax.grid(True, which="both")
        front = sorted((r for r in runs if r["front"]), key=lambda r: r["rel_bops"])
        if len(front) > 1:
            ax.plot([r["rel_bops"] for r in front], [r["top1"] for r in front], color=FRONT, lw=1.2,
                    drawstyle="steps-post", label="Pareto front", zorder=2)
        ax.scatter([r["rel_bops"] for r in runs], [r["top1"] for r in runs], s=[36 if r["front"] else 22 for r in runs],
                   c=[FRONT if r["front"] else TOP1 for r in runs], zorder=3, label="compressed")
        for r in runs:
            t = ax.annotate(r["label"], (r["rel_bops"], r["top1"]), xytext=(4, 4), textcoords="offset points", fontsize=7)
            t.set_parse_math(False)
        if fp:
            ax.scatter([100.0] * len(fp), [f["top1"] for f in fp], marker="D", s=26, c=FP, zorder=3, label="FP model")
            for f in fp:
                t = ax.annotate(f["label"], (100.0, f["top1"]), xytext=(-4, 4), textcoords="offset points", fontsize=7,
                                ha="right")
                t.set_parse_math(False)
        ax.set_xscale("log")
        xs = [r["rel_bops"] for r in runs] + ([100.0] if fp else [])
        lo, hi = min(xs), max(xs)
        ax.set_xlim(lo / 1.6, hi * 1.6)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}%"))
        ax.set_xlabel("relative BOPs (% of FP32, log scale)")
        ax.set_ylabel("top-1 (%)")
        ax.legend(loc="lower right", fontsize=7)
        return _svg(fig, n, "top-1 against relative BOPs of each checkpoint, with the Pareto front")


def is_finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

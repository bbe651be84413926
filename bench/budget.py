"""Compressing to a budget on the bundled Fashion-MNIST demo, beside a hand grid of λ.

Starts from the demo's FP32 model (trained once by ``codeq demo``'s own code
and cached in ``--out-dir``), compresses it with the demo's settings
(``timm:resnet10t``, 32x32, batch 64, the ``mixed`` recipe with the demo's
logit learning rates) for ``--epochs`` epochs, and prints one table:

* budget runs: ``--target-bops`` 2, 4 and 8 and one ``--target-size``
  (achieved figure, top-1, per-layer bit-width and sparsity spread, the
  figure before the final trim);
* a hand grid of λ (λ_dz = λ_bit/4 ∈ {0.002, 0.01, 0.05, 0.2, 1.0}, no target) at
  the same epochs, its top-1 interpolated (linearly in log BOPs) to each
  budget run's BOPs;
* at 4%: distillation off and batch-norm re-estimation off, and the step
  time with and without distillation (from ``metrics.jsonl``).

    python bench/budget.py [--epochs 2] [--subset 200] [--out-dir codeq-demo] [--only bops4,grid0.2] [--table]

Each run is written under ``OUT_DIR/bench-budget/``; results accumulate in
``OUT_DIR/bench-budget/results.json`` so that the table can be printed from
runs made in several sittings (``--only`` picks runs; ``--table`` just prints).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GRID = [0.002, 0.01, 0.05, 0.2, 1.0]  # λ_dz; λ_bit = 4·λ_dz (the mixed recipe's ratio); 0.002 so that the grid reaches above 3.4%


def runs(size_target: str) -> dict[str, dict]:
    out = {
        "bops2": {"target_bops": 2.0},
        "bops4": {"target_bops": 4.0},
        "bops8": {"target_bops": 8.0},
        "size": {"target_size": size_target},
        "bops4-nodistill": {"target_bops": 4.0, "overrides": ["distill_weight=0"]},
        "bops4-nobn": {"target_bops": 4.0, "overrides": ["bn_reestimate=0"]},
        "bops5-3ep": {"target_bops": 5.0, "epochs": 3},
    }
    for lam in GRID:
        out[f"grid{lam:g}"] = {"overrides": [f"lambda_dz={lam:g}", f"lambda_bit={4 * lam:g}"]}
    return out


def step_seconds(run_dir: Path) -> float | None:
    """Median seconds per step between consecutive logged steps of one epoch."""
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [e for e in events if e["event"] == "step"]
    gaps = []
    for a, b in zip(steps, steps[1:]):
        if a["epoch"] == b["epoch"] and b["step"] > a["step"]:
            gaps.append((b["time"] - a["time"]) / (b["step"] - a["step"]))
    return statistics.median(gaps) if gaps else None


def run_one(name: str, spec: dict, data: Path, fp: Path, work: Path, epochs: int, demo, subset: str | None) -> dict:
    from codeq_cli.commands import compress
    from codeq_cli.commands.report import report_data
    from codeq_cli.formats.checkpoint import load

    out = work / f"{name}.pt"
    t0 = time.monotonic()
    res = compress.run(compress.CompressOptions(
        model=demo.DEFAULT_MODEL, data=data, recipe="mixed",
        overrides=[*demo._AUGMENT, *demo._SHORT, *spec.get("overrides", [])], out=out, weights=fp, num_classes=10,
        img_size=32, batch_size=64, epochs=spec.get("epochs", epochs), workers=0, seed=0, overwrite=True, subset=subset,
        log_every=10, target_bops=spec.get("target_bops"), target_size=spec.get("target_size"),
    ))
    rep = report_data(load(out))
    q = [r for r in rep["layers"] if r["quantized"]]
    m = res.metrics
    return {
        "name": name, "epochs": spec.get("epochs", epochs), "subset": subset, "seconds": time.monotonic() - t0,
        "target_bops": spec.get("target_bops"), "target_size": spec.get("target_size"),
        "rel_bops": rep["totals"]["rel_bops"], "file_bytes": rep["totals"]["file_bytes"],
        "top1": m["top1"], "fp_top1": m["fp_top1"], "top1_before_bn": m.get("top1_before_bn"),
        "before_trim": m.get("budget_before_trim"), "trimmed_weights": m.get("budget_trimmed_weights"),
        "bits": [min(r["bits"] for r in q), max(r["bits"] for r in q)],
        "sparsity": [min(r["sparsity"] for r in q), max(r["sparsity"] for r in q)],
        "step_s": step_seconds(out.with_name(out.stem + ".run")),
    }


def interpolate(grid: list[dict], bops: float) -> float | None:
    """Top-1 of the λ grid at ``bops``, linear in log BOPs between the two neighbouring runs (None outside)."""
    pts = sorted((math.log(g["rel_bops"]), g["top1"]) for g in grid)
    x = math.log(bops)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def table(results: dict[str, dict]) -> str:
    grid = [r for n, r in results.items() if n.startswith("grid")]
    lines = ["| run | epochs (train images/class) | target | achieved | before trim | top-1 (FP) | grid top-1 at same BOPs | bits min–max | sparsity min–max |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if r.get("target_size"):
            target, achieved = f"{r['target_size']}", f"{r['file_bytes']} B ({r['rel_bops']:.2f}% BOPs)"
            before = f"{r['before_trim']:.0f} B" if r.get("before_trim") is not None else "–"
        else:
            target = f"{r['target_bops']:g}% BOPs" if r.get("target_bops") else "– (λ grid)"
            achieved = f"{r['rel_bops']:.3f}%"
            before = f"{r['before_trim']:.2f}%" if r.get("before_trim") is not None else "–"
        g = interpolate(grid, r["rel_bops"]) if grid and not name.startswith("grid") else None
        lines.append(
            f"| {name} | {r['epochs']} ({r.get('subset') or 600}) | {target} | {achieved} | {before} | {r['top1']:.2f} ({r['fp_top1']:.2f}) | "
            f"{'–' if g is None else f'{g:.2f}'} | {r['bits'][0]}–{r['bits'][1]} | "
            f"{r['sparsity'][0]:.3f}–{r['sparsity'][1]:.3f} |")
    extra = []
    if "bops4" in results and "bops4-nodistill" in results:
        a, b = results["bops4"], results["bops4-nodistill"]
        extra.append(f"distillation at 4%: top-1 {a['top1']:.2f} on vs {b['top1']:.2f} off ({a['top1'] - b['top1']:+.2f}); "
                     f"step {a['step_s']:.3f} s vs {b['step_s']:.3f} s ({100 * (a['step_s'] / b['step_s'] - 1):+.0f}%)")
    if "bops4" in results and "bops4-nobn" in results:
        a, b = results["bops4"], results["bops4-nobn"]
        extra.append(f"BN re-estimation at 4%: top-1 {a['top1']:.2f} on vs {b['top1']:.2f} off ({a['top1'] - b['top1']:+.2f}); "
                     f"same run before re-estimation: {a['top1_before_bn']:.2f}")
    return "\n".join(lines + [""] + extra)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out-dir", type=Path, default=Path("codeq-demo"))
    ap.add_argument("--size", default="300kB", help="the --target-size run's target")
    ap.add_argument("--subset", default=None, help="training images per class for the compress runs (validation: all 100 per class)")
    ap.add_argument("--only", default=None, help="comma-separated run names (default: all)")
    ap.add_argument("--table", action="store_true", help="only print the table of the results so far")
    args = ap.parse_args()

    from codeq_cli.commands import demo
    from codeq_cli.data.fashion_mnist import write_image_folder

    work = args.out_dir / "bench-budget"
    work.mkdir(parents=True, exist_ok=True)
    store = work / "results.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    if not args.table:
        data = write_image_folder(args.out_dir / "data")
        fp, _ = demo.pretrain_fp(demo.DemoOptions(out_dir=args.out_dir), data, lambda e: None)
        todo = runs(args.size)
        names = args.only.split(",") if args.only else list(todo)
        for name in names:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            results[name] = run_one(name, todo[name], data, fp, work, args.epochs, demo, args.subset)
            store.write_text(json.dumps(results, indent=1))
            print(json.dumps(results[name]), file=sys.stderr, flush=True)
    print(table(results))


if __name__ == "__main__":
    main()

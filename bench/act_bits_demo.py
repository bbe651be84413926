"""Float, 8-bit and learned (4-8 bit) activations on the bundled demo, at the same weight budget.

Runs the demo's pieces: the FP32 starting point (trained once, cached in
``--out-dir``), then one ``codeq compress`` per activation setting with the
demo's recipe (``mixed`` with its short-schedule overrides) and the same
weight budget, ``--target-size`` (the file holds the weights only, so every
setting gets the same bytes for its weights; ``--target-size none``: the
recipe's λ as they are), each evaluated from its file with ``codeq eval``.
Prints a Markdown table and writes ``act_bits_demo.json`` in ``--out-dir``.

    PYTHONPATH=. python bench/act_bits_demo.py [--epochs 4] [--target-size 1MB] [--out-dir codeq-demo-act]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from codeq_cli.commands import compress, demo, evaluate
from codeq_cli.commands.report import report_data
from codeq_cli.data.fashion_mnist import write_image_folder
from codeq_cli.formats.checkpoint import load

SETTINGS = [("float (paper)", []), ("8-bit", ["act_bits=8"]), ("learned 4-8", ["act_bits=learned", "act_b_min=4", "act_b_max=8"])]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out-dir", type=Path, default=Path("codeq-demo-act"))
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--subset", default=None)
    ap.add_argument("--target-size", default="1MB", help="the weight budget of every setting ('none': no budget)")
    args = ap.parse_args()
    # The FP32 starting point is the demo's own (full data, cached); --subset cuts only the compression runs.
    opts = demo.DemoOptions(out_dir=args.out_dir, epochs=args.epochs)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    data = write_image_folder(args.out_dir / "data")
    fp_weights, _ = demo.pretrain_fp(opts, data, lambda e: None)
    results = []
    size = None if args.target_size.lower() == "none" else args.target_size
    for label, sets in SETTINGS:
        t0 = time.monotonic()
        out = args.out_dir / f"act-{label.split()[0]}.pt"
        res = compress.run(compress.CompressOptions(
            model=opts.model, data=data, recipe="mixed", overrides=[*demo._AUGMENT, *demo._SHORT, *sets], out=out,
            weights=fp_weights, num_classes=10, img_size=opts.img_size, batch_size=opts.batch_size,
            epochs=opts.epochs, workers=0, subset=args.subset, seed=0, overwrite=True, target_size=size))
        ev = evaluate.run(evaluate.EvalOptions(out, data=data, batch_size=256, workers=0))  # all 1,000 val images
        rep = report_data(load(out))
        t = rep["totals"]
        acts = [layer["act_bits"] for layer in rep["layers"] if layer["act_bits"] != 32]
        results.append({"setting": label, "top1": ev["top1"], "fp_top1": res.metrics["fp_top1"], "rel_bops": t["rel_bops"],
                        "sparsity": t["sparsity"], "avg_bits": t["avg_bits"],
                        "mean_act_bits": sum(acts) / len(acts) if acts else 32.0,
                        "file_bytes": t["file_bytes"], "seconds": time.monotonic() - t0, "checkpoint": str(out)})
    (args.out_dir / "act_bits_demo.json").write_text(json.dumps(results, indent=1))
    print(f"demo: {opts.model} on Fashion-MNIST subset, {opts.epochs} epochs"
          f"{f' on {args.subset} training images per class' if args.subset else ''}, recipe mixed + demo overrides,"
          f" weight budget {size or 'none (the recipe λ)'};"
          f" FP32 top-1 {results[0]['fp_top1']:.2f}%")
    print("| activations | top-1 % | rel. BOPs % | weight sparsity | weight bits | mean act. bits | file kB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['setting']} | {r['top1']:.2f} | {r['rel_bops']:.3f} | {r['sparsity']:.3f} | {r['avg_bits']:.2f} |"
              f" {r['mean_act_bits']:.2f} | {r['file_bytes'] / 1e3:.1f} |")


if __name__ == "__main__":
    main()

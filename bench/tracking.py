"""Cost of ``--log-to``: the same compress run with logging on and off, interleaved (ABAB...).

Each pair runs ``codeq compress`` in this process twice, once plain and once
with the tracker in front of its events (the CLI's wiring: ``open_tracker``,
``wrap``, ``finish``), on the bundled Fashion-MNIST at 32x32 with timm
``resnet10t`` (random weights). Two figures per run: the training loop (the
``start`` event to the last ``step``) and the whole command (from the call to
the tracker's ``finish``, which writes the report page and waits for the
backends), and the process's CPU time (less sensitive to a busy machine than
the clock). The tracker's own cost is printed too: the time its ``observe``
takes on the training thread and its worker thread's CPU time (W&B's service
process is not counted). The medians' ratios are printed; the issue's goal is
at most 1.02.

MLflow logs to a SQLite store in the bench folder, W&B offline; nothing leaves
the machine.

    python bench/tracking.py [--pairs 3] [--max-steps 60] [--log-to tensorboard,mlflow,wandb]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def one_run(data: Path, folder: Path, tag: str, kinds: list[str], args) -> dict:
    from codeq_cli.commands.compress import CompressOptions, run
    from codeq_cli.commands.tracking import open_tracker

    out = folder / f"{tag}.pt"
    opts = CompressOptions(model="timm:resnet10t", data=data, out=out, pretrained=False, num_classes=10, img_size=32,
                           workers=args.workers, subset=str(args.subset), max_steps=args.max_steps, batch_size=args.batch,
                           log_every=args.log_every, skip_baseline=True, overwrite=True, seed=0)
    marks: dict = {}

    def on_event(e: dict) -> None:
        if e.get("event") == "start":
            marks["start"] = time.perf_counter()
        elif e.get("event") == "step":
            marks["last_step"] = time.perf_counter()
        elif e.get("event") == "note" and str(e.get("text", "")).startswith("warning"):
            print("   ", e["text"])

    t0, c0 = time.perf_counter(), time.process_time()
    tracker = open_tracker(kinds, run_dir=folder / f"{tag}.run", log_every=args.log_every,
                           command="bench/tracking.py", name=tag)
    result = run(opts, on_event=tracker.wrap(on_event))
    tracker.finish(result)
    total = time.perf_counter() - t0
    return {"train": marks["last_step"] - marks["start"], "total": total, "cpu": time.process_time() - c0,
            "observe": tracker.observe_s, "worker_cpu": tracker.worker_cpu_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=3, help="ABAB pairs (plain, then logged)")
    ap.add_argument("--max-steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--subset", type=int, default=30, help="images per class")
    ap.add_argument("--log-every", type=int, default=20, help="the CLI's default")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--log-to", default="tensorboard,mlflow,wandb")
    args = ap.parse_args()

    from codeq_cli.commands.tracking import parse_log_to
    from codeq_cli.data.fashion_mnist import write_image_folder

    kinds = parse_log_to(args.log_to)
    folder = Path(tempfile.mkdtemp(prefix="codeq-bench-tracking-"))
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
    data = write_image_folder(folder / "data")
    print(f"{cpu_name()}, {os.cpu_count()} CPUs; resnet10t 32x32, batch {args.batch}, {args.max_steps} steps, "
          f"--log-every {args.log_every}; logging to {', '.join(kinds)}; in {folder}")
    one_run(data, folder, "warmup", [], args)  # imports, first-touch allocations
    plain, logged = [], []
    for i in range(args.pairs):
        for tag, kinds_i, sink in (("plain", [], plain), ("logged", kinds, logged)):
            r = one_run(data, folder, f"{tag}{i}", kinds_i, args)
            sink.append(r)
            print(f"  pair {i + 1} {tag:6s}: training {r['train']:7.2f} s   whole run {r['total']:7.2f} s   "
                  f"process CPU {r['cpu']:7.2f} s   tracker: {r['observe'] * 1e3:.1f} ms on the training thread, "
                  f"{r['worker_cpu']:.2f} s CPU in its worker", flush=True)
    for key, what in (("train", "training loop"), ("total", "whole run"), ("cpu", "process CPU")):
        a = statistics.median(r[key] for r in plain)
        b = statistics.median(r[key] for r in logged)
        print(f"{what:13s}: median {a:.2f} s plain, {b:.2f} s logged: ratio {b / a:.3f}")


if __name__ == "__main__":
    main()

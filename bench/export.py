"""int8 QDQ ONNX against fp32 ONNX of the same model: file size, top-1, CPU latency.

Two models:

* the demo model: a checkpoint compressed with ``act_bits`` (``--demo-ckpt``,
  e.g. from ``bench/act_bits_demo.py``), with ONNX Runtime's top-1 on the
  demo's validation images next to ``codeq eval``'s;
* torchvision ResNet-18 at 224×224 with random weights, every layer at 4 bits
  with ``init_dz`` 1.0 and 8-bit activations calibrated on random inputs
  (latency and size only: random weights have no accuracy).

Latency: ONNX Runtime CPU execution provider, ``--threads`` intra-op threads,
the two sessions timed alternately in one run (median of ``--reps``), batch 1
and batch 32. The ratio is fp32 time / int8 time (above 1: int8 is faster).
Also counts the integer kernels ONNX Runtime made (QLinearConv, QGemm).

    PYTHONPATH=. python bench/export.py --demo-ckpt codeq-demo-act/act-8-bit.pt [--reps 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def kernels(path: Path, tmp: Path) -> dict:
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp / "opt.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(str(tmp / "opt.onnx")).graph.node)
    return {"QLinearConv": ops.get("QLinearConv", 0), "QGemm": ops.get("QGemm", 0),
            "float Conv/FusedConv": ops.get("Conv", 0) + ops.get("FusedConv", 0), "Gemm": ops.get("Gemm", 0)}


def session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def latency(fp32: Path, int8: Path, shape, threads: int, reps: int) -> dict:
    a, b = session(fp32, threads), session(int8, threads)
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    for s in (a, b):
        for _ in range(2):
            s.run(None, {"input": x})
    ta, tb = [], []
    for _ in range(reps):  # alternate, so that load from other processes hits both alike
        for s, t in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            s.run(None, {"input": x})
            t.append(time.perf_counter() - t0)
    fa, fb = statistics.median(ta), statistics.median(tb)
    return {"batch": shape[0], "fp32_ms": 1e3 * fa, "int8_ms": 1e3 * fb, "fp32_over_int8": fa / fb}


def both_exports(ckpt, tmp: Path) -> tuple[Path, Path, dict]:
    from codeq_cli.formats.export import export_onnx
    from codeq_cli.formats.onnx_int8 import export_onnx_int8

    fp32 = export_onnx(ckpt, tmp / "fp32.onnx")
    info = export_onnx_int8(ckpt, tmp / "int8.onnx")
    return fp32, info.path, info.to_dict()


def onnx_top1(path: Path, ckpt, data: Path) -> tuple[float, int]:
    from codeq_cli.data.folders import eval_folder
    from codeq_cli.data.loader import build_loader

    ds = eval_folder(data, ckpt.data_config, class_names=ckpt.class_names)
    sess = session(path, 2)
    hits = n = 0
    for images, target in build_loader(ds, 256, workers=0):
        out = sess.run(None, {"input": images.numpy()})[0]
        hits += int((out.argmax(1) == target.numpy()).sum())
        n += int(target.numel())
    return 100.0 * hits / n, n


def resnet18_ckpt(tmp: Path):
    from codeq_cli.core.act_quant import ActSpec, calibrate_
    from codeq_cli.core.bops import measure_macs
    from codeq_cli.core.insert import quantize_
    from codeq_cli.formats import checkpoint
    from codeq_cli.models.factory import DataConfig, ModelSpec, create

    spec = ModelSpec("torchvision", "resnet18")
    torch.manual_seed(0)
    model = create(spec, pretrained=False)
    macs = measure_macs(model, (3, 224, 224))
    quantize_(model, bits=4, init_dz=1.0, activations=ActSpec(bits=8))
    model.train()
    with torch.no_grad():
        for _ in range(2):  # BN statistics of the random model on normalised-looking inputs
            model(torch.randn(8, 3, 224, 224))
    calibrate_(model, [torch.randn(8, 3, 224, 224)])
    model.eval()
    path = tmp / "r18.codeq"
    checkpoint.save(path, model, spec=spec, data_config=DataConfig(input_size=(3, 224, 224)), class_names=None,
                    recipe={}, provenance={}, metrics={}, macs=macs)
    return checkpoint.load(path)


def measure(label: str, ckpt, tmp: Path, args, data: Path | None = None) -> dict:
    fp32, int8, info = both_exports(ckpt, tmp)
    row = {"model": label, "fp32_onnx_bytes": fp32.stat().st_size, "int8_onnx_bytes": int8.stat().st_size,
           "codeq_bytes": ckpt.file_bytes, "int8_layers": info["int8_layers"], "exact_layers": info["exact_layers"],
           "max_weight_error": info["max_weight_error"], "kernels": kernels(int8, tmp)}
    if data is not None:
        from codeq_cli.commands import evaluate

        ev = evaluate.run(evaluate.EvalOptions(Path(ckpt.path), data=data, batch_size=256, workers=0))
        row["codeq_eval_top1"] = ev["top1"]
        row["int8_onnx_top1"], row["val_images"] = onnx_top1(int8, ckpt, data)
        row["fp32_onnx_top1"], _ = onnx_top1(fp32, ckpt, data)
    c, h, w = ckpt.data_config.input_size
    row["latency"] = [latency(fp32, int8, (b, c, h, w), args.threads, args.reps) for b in (1, 32)]
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo-ckpt", type=Path, default=None, help="a demo checkpoint compressed with act_bits")
    ap.add_argument("--demo-data", type=Path, default=None, help="its data folder [default: recorded in the file]")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-resnet18", action="store_true")
    args = ap.parse_args()
    from codeq_cli.formats.checkpoint import load

    rows = []
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        if args.demo_ckpt is not None:
            ck = load(args.demo_ckpt)
            data = args.demo_data or Path(ck.data_dir)
            (tmp / "demo").mkdir()
            rows.append(measure(f"demo {ck.spec.label} {ck.data_config.input_size[1]}px", ck, tmp / "demo", args, data))
        if not args.skip_resnet18:
            (tmp / "r18").mkdir()
            rows.append(measure("tv:resnet18 224px (random weights, 4-bit weights, 8-bit activations)",
                                resnet18_ckpt(tmp / "r18"), tmp / "r18", args))
    import onnxruntime

    print(json.dumps({"onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "threads": args.threads,
                      "reps": args.reps, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

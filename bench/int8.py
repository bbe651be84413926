"""codeq's int8 ONNX against the FP32 graph and against ONNX Runtime's own ``quantize_static``.

For each model: integer vs float ops after ONNX Runtime's optimizer (``ORT_ENABLE_EXTENDED``, the
graph ORT runs), and latency on the CPU execution provider, the three sessions timed alternately in
one run (median of ``--reps``), batch 1 and batch 8, ``--threads`` intra-op threads. Speed ratios
are FP32 time / other time (above 1: faster than FP32).

Models with random weights are quantized like a codeq run (4-bit weights, 8-bit activations
calibrated on random inputs): latency and op counts only, no accuracy. ``--ckpt`` measures a
real checkpoint instead. The reference is ``onnxruntime.quantization.quantize_static`` of the same
FP32 export (QDQ, per-channel int8 weights, uint8 activations, calibrated on the same inputs).

``--openvino`` adds OpenVINO's CPU plugin (the ``openvino`` extra) on the same FP32 and codeq files,
in the same loop (``INFERENCE_NUM_THREADS`` = ``--threads``, FP32 pinned to f32), and its integer
layers (``runtimePrecision`` u8/i8 of the compiled model).

    PYTHONPATH=. .venv/bin/python bench/int8.py --model tv:resnet18 --model timm:resnet10t [--reps 20] [--openvino]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from codeq_cli.commands.int8_check import (cpu_name, interleaved, op_summary, optimized_ops, ort_static, ov_ops,
                                           ov_version, plain_fp32)


def summary(ops) -> dict:
    return {**op_summary(ops), "QuantizeLinear": ops["QuantizeLinear"], "DequantizeLinear": ops["DequantizeLinear"]}


def random_ckpt(label: str, size: int, tmp: Path):
    from codeq_cli.core.act_quant import ActSpec, calibrate_
    from codeq_cli.core.bops import measure_macs
    from codeq_cli.core.insert import quantize_
    from codeq_cli.formats import checkpoint
    from codeq_cli.models.factory import DataConfig, create, resolve

    spec = resolve(label)
    torch.manual_seed(0)
    model = create(spec, pretrained=False)
    macs = measure_macs(model, (3, size, size))
    quantize_(model, bits=4, init_dz=1.0, activations=ActSpec(bits=8))
    model.train()
    with torch.no_grad():
        for _ in range(2):  # BN statistics of the random model on normalised-looking inputs
            model(torch.randn(4, 3, size, size))
    calibrate_(model, [torch.randn(4, 3, size, size)])
    model.eval()
    path = tmp / "m.codeq"
    checkpoint.save(path, model, spec=spec, data_config=DataConfig(input_size=(3, size, size)), class_names=None,
                    recipe={}, provenance={}, metrics={}, macs=macs)
    return checkpoint.load(path)


def measure(label: str, ckpt, tmp: Path, args) -> dict:
    from codeq_cli.formats.onnx_int8 import export_onnx_int8

    c, h, w = ckpt.data_config.input_size
    fp32 = plain_fp32(ckpt, tmp / "fp32.onnx")
    codeq = export_onnx_int8(ckpt, tmp / "codeq.onnx").path
    rng = np.random.default_rng(1)
    ort_q = ort_static(fp32, tmp / "ort.onnx", [rng.standard_normal((1, c, h, w), dtype=np.float32) for _ in range(4)])
    paths = {"fp32": fp32, "codeq": codeq, "ort_static": ort_q}
    if args.full_range:  # 8-bit weight codes (no reduce_range): exact on VNNI, may saturate without it
        paths["codeq_full_range"] = export_onnx_int8(ckpt, tmp / "codeq_full.onnx", reduce_range=False).path
    row = {"model": label, "ops": {k: summary(optimized_ops(p, tmp)) for k, p in paths.items()}, "latency": []}
    ov = {"fp32": fp32, "codeq": codeq} if args.openvino else None
    if ov:
        row["openvino_ops"] = {k: ov_ops(p) for k, p in ov.items()}
    for b in args.batch:
        ms = interleaved(paths, (b, c, h, w), args.threads, args.reps, openvino=ov)
        lat = {"batch": b, "ms": ms, "codeq_vs_fp32": ms["fp32"] / ms["codeq"],
               "codeq_vs_ort_static": ms["ort_static"] / ms["codeq"], "ort_static_vs_fp32": ms["fp32"] / ms["ort_static"]}
        if ov:
            lat["openvino_codeq_vs_fp32"] = ms["openvino_fp32"] / ms["openvino_codeq"]
        row["latency"].append(lat)
    return row


def _op_cells(ops: dict) -> tuple[str, str]:
    """The integer and the float op counts of one graph as two table cells."""
    return tuple(", ".join(f"{k} {v}" for k, v in ops[kind].items()) or "none" for kind in ("int", "float"))


def ov_table(rows: list[dict]) -> str:
    lines = ["| model | batch | OpenVINO FP32 ms | OpenVINO codeq ms | codeq vs FP32 | integer layers (codeq) | float layers (codeq) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ints, floats = _op_cells(r["openvino_ops"]["codeq"])
        for lat in r["latency"]:
            ms = lat["ms"]
            lines.append(f"| {r['model']} | {lat['batch']} | {ms['openvino_fp32']:.2f} | {ms['openvino_codeq']:.2f} | "
                         f"{lat['openvino_codeq_vs_fp32']:.2f}× | {ints} | {floats} |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    lines = ["| model | batch | FP32 ms | codeq ms | ORT static ms | codeq vs FP32 | codeq vs ORT static | codeq int ops | codeq float Conv/Gemm/MatMul/Add |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ints, floats = _op_cells(r["ops"]["codeq"])
        for lat in r["latency"]:
            ms = lat["ms"]
            lines.append(f"| {r['model']} | {lat['batch']} | {ms['fp32']:.2f} | {ms['codeq']:.2f} | {ms['ort_static']:.2f} | "
                         f"{lat['codeq_vs_fp32']:.2f}× | {lat['codeq_vs_ort_static']:.2f}× | {ints} | {floats} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="append", default=None, help="timm:/tv: name with random weights (repeatable)")
    ap.add_argument("--ckpt", type=Path, action="append", default=[], help="a codeq checkpoint with act_bits")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, action="append", default=None)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--full-range", action="store_true", help="also time codeq's graph with 8-bit weight codes")
    ap.add_argument("--openvino", action="store_true", help="also time the FP32 and codeq graphs in OpenVINO (same loop)")
    args = ap.parse_args()
    args.batch = args.batch or [1, 8]
    models = args.model if args.model is not None else ([] if args.ckpt else ["tv:resnet18"])
    from codeq_cli.formats.checkpoint import load

    rows = []
    with tempfile.TemporaryDirectory() as t:
        for i, label in enumerate(models):
            tmp = Path(t) / f"m{i}"
            tmp.mkdir()
            rows.append(measure(f"{label} {args.size}px", random_ckpt(label, args.size, tmp), tmp, args))
        for i, p in enumerate(args.ckpt):
            tmp = Path(t) / f"c{i}"
            tmp.mkdir()
            ck = load(p)
            rows.append(measure(f"{ck.spec.label} {ck.data_config.input_size[1]}px ({p.name})", ck, tmp, args))
    import onnxruntime

    head = {"cpu": cpu_name(), "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
            "threads": args.threads, "reps": args.reps, **({"openvino": ov_version()} if args.openvino else {})}
    if args.json:
        print(json.dumps({**head, "rows": rows}, indent=1))
    else:
        print(" ".join(f"{k}={v}" for k, v in head.items()))
        print(table(rows))
        if args.openvino:
            print(ov_table(rows))
        for r in rows:
            for lat in r["latency"]:
                if "codeq_full_range" in lat["ms"]:
                    print(f"{r['model']} batch {lat['batch']}: codeq full-range {lat['ms']['codeq_full_range']:.2f} ms")
            for k in ("fp32", "ort_static"):
                print(f"{r['model']} {k}: int {r['ops'][k]['int']} float {r['ops'][k]['float']}")


if __name__ == "__main__":
    main()

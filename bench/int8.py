"""codeq's int8 ONNX against the FP32 graph and against ONNX Runtime's own ``quantize_static``.

For each model: integer vs float ops after ONNX Runtime's optimizer (``ORT_ENABLE_EXTENDED``, the
graph ORT runs), and latency on the CPU execution provider, the three sessions timed alternately in
one run (median of ``--reps``), batch 1 and batch 8, ``--threads`` intra-op threads. Speed ratios
are FP32 time / other time (above 1: faster than FP32).

Models with random weights are quantized like a codeq run (4-bit weights, 8-bit activations
calibrated on random inputs): latency and op counts only, no accuracy. ``--ckpt`` measures a
real checkpoint instead. The reference is ``onnxruntime.quantization.quantize_static`` of the same
FP32 export (QDQ, per-channel int8 weights, uint8 activations, calibrated on the same inputs).

    PYTHONPATH=. .venv/bin/python bench/int8.py --model tv:resnet18 --model timm:resnet10t [--reps 20]
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

INT_OPS = ("QLinearConv", "ConvInteger", "QGemm", "MatMulInteger", "QLinearMatMul", "MatMulIntegerToFloat",
           "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearSigmoid")
FLOAT_OPS = ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul", "Add", "Mul")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def optimized_ops(path: Path, tmp: Path) -> collections.Counter:
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp / f"{path.stem}.opt.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


def summary(ops: collections.Counter) -> dict:
    return {"int": {k: ops[k] for k in INT_OPS if ops[k]}, "float": {k: ops[k] for k in FLOAT_OPS if ops[k]},
            "QuantizeLinear": ops["QuantizeLinear"], "DequantizeLinear": ops["DequantizeLinear"]}


def session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def interleaved(paths: dict[str, Path], shape, threads: int, reps: int) -> dict[str, float]:
    """Median milliseconds per graph, the graphs run one after another in each repetition."""
    sessions = {k: session(p, threads) for k, p in paths.items()}
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    for s in sessions.values():
        for _ in range(3):
            s.run(None, {s.get_inputs()[0].name: x})
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(reps):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, {s.get_inputs()[0].name: x})
            times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def ort_static(fp32: Path, out: Path, calib: list[np.ndarray], per_channel: bool = True) -> Path:
    """ONNX Runtime's own post-training quantization of the FP32 graph (QDQ, per-channel, uint8 activations)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {"input": x}

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


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


def plain_fp32(ckpt, path: Path) -> Path:
    """The decoded weights in the plain architecture, float activations (no quantizer arithmetic)."""
    import warnings

    from codeq_cli.models.factory import create

    model = create(ckpt.spec, pretrained=False)
    model.load_state_dict(ckpt.state_dict(), strict=True)
    c, h, w = ckpt.data_config.input_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(1, c, h, w),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


def measure(label: str, ckpt, tmp: Path, args) -> dict:
    from codeq_cli.formats.onnx_int8 import export_onnx_int8

    c, h, w = ckpt.data_config.input_size
    fp32 = plain_fp32(ckpt, tmp / "fp32.onnx")
    codeq = export_onnx_int8(ckpt, tmp / "codeq.onnx").path
    rng = np.random.default_rng(1)
    ort_q = ort_static(fp32, tmp / "ort.onnx", [rng.standard_normal((1, c, h, w), dtype=np.float32) for _ in range(4)])
    paths = {"fp32": fp32, "codeq": codeq, "ort_static": ort_q}
    row = {"model": label, "ops": {k: summary(optimized_ops(p, tmp)) for k, p in paths.items()}, "latency": []}
    for b in args.batch:
        ms = interleaved(paths, (b, c, h, w), args.threads, args.reps)
        row["latency"].append({"batch": b, "ms": ms, "codeq_vs_fp32": ms["fp32"] / ms["codeq"],
                               "codeq_vs_ort_static": ms["ort_static"] / ms["codeq"],
                               "ort_static_vs_fp32": ms["fp32"] / ms["ort_static"]})
    return row


def table(rows: list[dict]) -> str:
    lines = ["| model | batch | FP32 ms | codeq ms | ORT static ms | codeq vs FP32 | codeq vs ORT static | codeq int ops | codeq float Conv/Gemm/MatMul/Add |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ops = r["ops"]["codeq"]
        ints = ", ".join(f"{k} {v}" for k, v in ops["int"].items()) or "none"
        floats = ", ".join(f"{k} {v}" for k, v in ops["float"].items()) or "none"
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
            "threads": args.threads, "reps": args.reps}
    if args.json:
        print(json.dumps({**head, "rows": rows}, indent=1))
    else:
        print(" ".join(f"{k}={v}" for k, v in head.items()))
        print(table(rows))
        for r in rows:
            for k in ("fp32", "ort_static"):
                print(f"{r['model']} {k}: int {r['ops'][k]['int']} float {r['ops'][k]['float']}")


if __name__ == "__main__":
    main()

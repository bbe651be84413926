"""``codeq export --format onnx-int8 --check``: is the exported graph integer, fast and as accurate, here?

For an exported int8 ONNX file and the checkpoint it came from, on this machine:

* **ops** after ONNX Runtime's optimizer (``ORT_ENABLE_EXTENDED``, the graph it
  runs): integer kernels (QLinearConv, QGemm, MatMulInteger(ToFloat),
  QLinearMatMul, QLinearAdd, …) against float Conv/Gemm/MatMul/Add;
* **latency** on the CPU execution provider, batch 1 and 8, ``threads``
  intra-op threads, median of ``reps`` with the graphs run alternately in one
  loop: the plain FP32 model (decoded weights, float activations), codeq's
  graph, and ONNX Runtime's own ``quantize_static`` of that FP32 graph (QDQ,
  per-channel int8 weights, uint8 activations, calibrated on a few inputs);
* **top-1** of the exported graph against ``codeq eval`` of the checkpoint on
  the same images, when an image folder is given or recorded in the file.

The machine's CPU is named beside the figures: latencies compare only within
one run. Library code: returns data, prints nothing.
"""

from __future__ import annotations

import collections
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

INT_OPS = ("QLinearConv", "ConvInteger", "QGemm", "MatMulInteger", "MatMulIntegerToFloat", "QLinearMatMul",
           "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearSigmoid")
FLOAT_OPS = ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul", "Add", "Mul")


@dataclass
class CheckOptions:
    onnx: Path
    checkpoint: Path
    data: Path | None = None  # image folder for top-1 [default: recorded in the checkpoint, if it exists]
    reps: int = 20
    threads: int = 1
    batches: tuple[int, ...] = (1, 8)
    ort_static: bool = True
    subset: str | None = None  # images per class (or a fraction), as `codeq eval --subset`: both see the same images
    batch_size: int = 64


def cpu_name() -> str:
    """``model name`` of /proc/cpuinfo (and whether it has VNNI), else the platform's processor string."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "unknown CPU")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    vnni = "avx512_vnni" in flags or "avx_vnni" in flags
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{name} ({isa}, {'VNNI' if vnni else 'no VNNI'})"


def optimized_ops(path: Path, tmp: Path) -> collections.Counter:
    """Op types of the graph ONNX Runtime runs (its optimizer's output at ``ORT_ENABLE_EXTENDED``)."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp / f"{path.stem}.opt.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


def op_summary(ops: collections.Counter) -> dict:
    return {"int": {k: ops[k] for k in INT_OPS if ops[k]}, "float": {k: ops[k] for k in FLOAT_OPS if ops[k]}}


def session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def interleaved(paths: dict[str, Path], shape: tuple[int, ...], threads: int, reps: int) -> dict[str, float]:
    """Median milliseconds per graph; each repetition runs every graph once, one after another."""
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


def plain_fp32(ckpt, path: Path, opset: int = 17) -> Path:
    """The decoded weights in the plain architecture with float activations, as ONNX."""
    import warnings

    import torch

    from codeq_cli.models.factory import create

    model = create(ckpt.spec, pretrained=False)
    model.load_state_dict(ckpt.state_dict(), strict=True)
    c, h, w = ckpt.data_config.input_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(1, c, h, w),), str(path), dynamo=False, opset_version=opset,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


def ort_static(fp32: Path, out: Path, calib: list[np.ndarray]) -> Path:
    """ONNX Runtime's own post-training quantization of ``fp32``: QDQ, per-channel int8 weights, uint8 activations."""
    import logging

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {"input": x}

    pre = out.with_suffix(".pre.onnx")
    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # its "please consider pre-processing" advice
    try:
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    finally:
        logging.getLogger().setLevel(quiet)
    return out


def onnx_top1(path: Path, ckpt, folder: Path, batch_size: int, subset: str | None) -> tuple[float, int]:
    """Top-1 (%) of the ONNX graph on the evaluation images of ``folder``, preprocessed as ``codeq eval`` does."""
    from codeq_cli.data.folders import eval_folder
    from codeq_cli.data.loader import build_loader

    ds = eval_folder(folder, ckpt.data_config, class_names=ckpt.class_names, subset=subset)
    sess = session(path, 2)
    hits = n = 0
    for images, target in build_loader(ds, batch_size, workers=0):
        out = sess.run(None, {"input": images.numpy()})[0]
        hits += int((out.argmax(1) == target.numpy()).sum())
        n += int(target.numel())
    return 100.0 * hits / max(n, 1), n


def run(opts: CheckOptions, on_event=lambda e: None) -> dict:
    """The check; returns ``{"cpu", "onnxruntime", "ops", "latency", "top1"}`` (see the module docstring)."""
    import onnxruntime

    from codeq_cli.formats.checkpoint import load

    ckpt = load(opts.checkpoint)
    c, h, w = ckpt.data_config.input_size
    out: dict = {"cpu": cpu_name(), "onnxruntime": onnxruntime.__version__, "threads": opts.threads, "reps": opts.reps}
    with tempfile.TemporaryDirectory(prefix="codeq-check-") as t:
        tmp = Path(t)
        on_event({"event": "note", "text": "counting the integer kernels after ONNX Runtime's optimizer"})
        paths = {"codeq": Path(opts.onnx), "fp32": plain_fp32(ckpt, tmp / "fp32.onnx")}
        if opts.ort_static:
            rng = np.random.default_rng(1)
            paths["ort_static"] = ort_static(paths["fp32"], tmp / "ort_static.onnx",
                                             [rng.standard_normal((1, c, h, w), dtype=np.float32) for _ in range(8)])
        out["ops"] = {k: op_summary(optimized_ops(p, tmp)) for k, p in paths.items()}
        out["latency"] = []
        for b in opts.batches:
            on_event({"event": "note", "text": f"timing batch {b} ({opts.reps} alternating runs)"})
            ms = interleaved(paths, (b, c, h, w), opts.threads, opts.reps)
            row = {"batch": b, "ms": ms, "codeq_vs_fp32": ms["fp32"] / ms["codeq"]}
            if "ort_static" in ms:
                row["codeq_vs_ort_static"] = ms["ort_static"] / ms["codeq"]
            out["latency"].append(row)
        folder = opts.data or (Path(ckpt.data_dir) if ckpt.data_dir and Path(ckpt.data_dir).is_dir() else None)
        out["top1"] = None
        if folder is not None:
            from codeq_cli.commands import evaluate

            on_event({"event": "note", "text": f"top-1 on {folder}"})
            top, n = onnx_top1(Path(opts.onnx), ckpt, folder, opts.batch_size, opts.subset)
            ev = evaluate.run(evaluate.EvalOptions(Path(opts.checkpoint), data=folder, batch_size=opts.batch_size,
                                                   workers=0, subset=opts.subset, device="cpu"))
            out["top1"] = {"onnx_int8": top, "codeq_eval": ev["top1"], "images": n, "codeq_eval_images": ev["samples"],
                           "data": str(folder)}
    return out


def render(res: dict) -> str:
    """The check as text: one line of machine, ops per graph, the latency table, top-1."""
    lines = [f"machine: {res['cpu']}, ONNX Runtime {res['onnxruntime']}, {res['threads']} thread(s), "
             f"median of {res['reps']} alternating runs"]
    for k, ops in res["ops"].items():
        ints = ", ".join(f"{op} {n}" for op, n in ops["int"].items()) or "none"
        floats = ", ".join(f"{op} {n}" for op, n in ops["float"].items()) or "none"
        lines.append(f"{k:>10} ops: integer {ints}; float {floats}")
    for row in res["latency"]:
        ms = row["ms"]
        parts = [f"batch {row['batch']}: FP32 {ms['fp32']:.2f} ms, codeq int8 {ms['codeq']:.2f} ms "
                 f"({row['codeq_vs_fp32']:.2f}× FP32)"]
        if "ort_static" in ms:
            parts.append(f"ORT quantize_static {ms['ort_static']:.2f} ms (codeq {row['codeq_vs_ort_static']:.2f}× its speed)")
        lines.append(", ".join(parts))
    top = res.get("top1")
    if top:
        lines.append(f"top-1: exported graph {top['onnx_int8']:.2f}% on {top['images']} images, "
                     f"codeq eval {top['codeq_eval']:.2f}% on {top['codeq_eval_images']}")
    else:
        lines.append("top-1: no image folder (pass --data, or keep the one the checkpoint records)")
    return "\n".join(lines)

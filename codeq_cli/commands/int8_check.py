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

``runtimes`` picks ONNX Runtime (``ort``, the default) and/or OpenVINO
(``openvino``, an optional extra): OpenVINO reads the same two ONNX files, on
its CPU plugin with ``INFERENCE_NUM_THREADS`` = ``threads`` and FP32 pinned to
true f32 (``INFERENCE_PRECISION_HINT=f32``, so the float model is not silently
bf16); its graphs run in the same alternating loop as ORT's. Its op counts are
the compiled model's (``get_runtime_model()``), each layer's
``runtimePrecision``: ``u8``/``i8`` is an integer kernel.

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
RUNTIMES = ("ort", "openvino")
# OpenVINO's CPU layer types that compute (their runtimePrecision says integer or float); an Eltwise is any
# elementwise layer left unfused (residual adds, and the SE/SiLU products).
OV_COMPUTE = ("Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul", "Eltwise")
OV_INSTALL_HINT = "pip install 'codeq[openvino]'"


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
    runtimes: tuple[str, ...] = ("ort",)  # of RUNTIMES


def parse_runtimes(text: str | None) -> tuple[str, ...]:
    """``"ort,openvino"`` → ``("ort", "openvino")``; an unknown name is a usage error naming the choices."""
    import difflib

    from codeq_cli.errors import UsageError

    out: list[str] = []
    for part in (text or "ort").split(","):
        name = part.strip().lower().replace("onnxruntime", "ort")
        if name not in RUNTIMES:
            near = difflib.get_close_matches(name, RUNTIMES, n=1)
            raise UsageError(f"--runtime {part.strip()!r} is not a runtime --check knows",
                             hint=(f"did you mean {near[0]!r}? " if near else "") + "choose from ort, openvino (comma-separated)")
        if name not in out:
            out.append(name)
    return tuple(out)


def check_installed(runtimes: tuple[str, ...]) -> None:
    """Import each runtime's package now, so that a missing one is one line before any work."""
    from codeq_cli.errors import require_package
    from codeq_cli.formats.onnx_int8 import INSTALL_HINT

    modules = {"ort": ("onnxruntime", INSTALL_HINT), "openvino": ("openvino", OV_INSTALL_HINT)}
    for rt in runtimes:
        module, hint = modules[rt]
        require_package(module, what=f"--runtime {rt}", hint=hint)


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


def ov_compile(path: Path, threads: int, batch: int | None = None):
    """OpenVINO's CPU plugin on the ONNX file: ``threads`` threads, one stream, FP32 kept f32; ``batch``: a static batch."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    if batch is not None:
        shape = model.input(0).get_partial_shape()
        shape[0] = batch
        model.reshape({model.input(0): shape})
    return core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32",
                                             "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1})


def ov_ops(path: Path) -> dict:
    """Compute layers of OpenVINO's compiled model, by ``runtimePrecision``: ``{"int": {type: n}, "float": {type: n}}``."""
    counts: dict[str, collections.Counter] = {"int": collections.Counter(), "float": collections.Counter()}
    for op in ov_compile(path, 1, 1).get_runtime_model().get_ordered_ops():
        rt = op.get_rt_info()
        kind = rt["layerType"].astype(str) if "layerType" in rt else op.get_type_name()
        if kind not in OV_COMPUTE:
            continue
        prec = rt["runtimePrecision"].astype(str) if "runtimePrecision" in rt else "unknown"
        counts["int" if prec in ("u8", "i8") else "float"][kind] += 1
    return {k: {t: c[t] for t in OV_COMPUTE if c[t]} for k, c in counts.items()}


def ov_version() -> str:
    import openvino as ov

    return ov.get_version().split("-")[0]


def _ort_runner(path: Path, threads: int):
    s = session(path, threads)
    name = s.get_inputs()[0].name
    return lambda x: s.run(None, {name: x})[0]


def _ov_runner(path: Path, threads: int, batch: int | None):
    req = ov_compile(path, threads, batch).create_infer_request()
    return lambda x: req.infer([x])[0]


def interleaved(paths: dict[str, Path], shape: tuple[int, ...], threads: int, reps: int,
                openvino: dict[str, Path] | None = None) -> dict[str, float]:
    """Median milliseconds per graph; each repetition runs every graph once, one after another.

    ``paths`` run in ONNX Runtime, ``openvino`` (same keys, reported as ``openvino_<key>``) in OpenVINO, in the same loop.
    """
    runners = {k: _ort_runner(p, threads) for k, p in paths.items()}
    runners.update({f"openvino_{k}": _ov_runner(p, threads, shape[0]) for k, p in (openvino or {}).items()})
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    for r in runners.values():
        for _ in range(3):
            r(x)
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(reps):
        for k, r in runners.items():
            t0 = time.perf_counter()
            r(x)
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


def onnx_top1(path: Path, ckpt, folder: Path, batch_size: int, subset: str | None,
              runtime: str = "ort") -> tuple[float, int]:
    """Top-1 (%) of the ONNX graph in ``runtime`` on the evaluation images of ``folder``, preprocessed as ``codeq eval`` does."""
    from codeq_cli.data.folders import eval_folder
    from codeq_cli.data.loader import build_loader

    ds = eval_folder(folder, ckpt.data_config, class_names=ckpt.class_names, subset=subset)
    infer = _ort_runner(path, 2) if runtime == "ort" else _ov_runner(path, 2, None)
    hits = n = 0
    for images, target in build_loader(ds, batch_size, workers=0):
        out = np.asarray(infer(images.numpy()))
        hits += int((out.argmax(1) == target.numpy()).sum())
        n += int(target.numel())
    return 100.0 * hits / max(n, 1), n


def run(opts: CheckOptions, on_event=lambda e: None) -> dict:
    """The check; returns ``{"cpu", "runtimes", "onnxruntime", "ops", "latency", "top1"}`` and, with OpenVINO,
    ``"openvino": {"version", "ops"}``, its ``openvino_*`` timings in each latency row and its top-1 in ``"top1"``
    (see the module docstring). ORT's keys are there only when ``"ort"`` is one of ``opts.runtimes``."""
    from codeq_cli.formats.checkpoint import load

    use_ort, use_ov = "ort" in opts.runtimes, "openvino" in opts.runtimes
    ckpt = load(opts.checkpoint)
    c, h, w = ckpt.data_config.input_size
    out: dict = {"cpu": cpu_name(), "runtimes": list(opts.runtimes), "threads": opts.threads, "reps": opts.reps}
    with tempfile.TemporaryDirectory(prefix="codeq-check-") as t:
        tmp = Path(t)
        fp32 = plain_fp32(ckpt, tmp / "fp32.onnx")
        both = {"codeq": Path(opts.onnx), "fp32": fp32}
        paths: dict[str, Path] = {}
        if use_ort:
            import onnxruntime

            out["onnxruntime"] = onnxruntime.__version__
            on_event({"event": "note", "text": "counting the integer kernels after ONNX Runtime's optimizer"})
            paths = dict(both)
            if opts.ort_static:
                rng = np.random.default_rng(1)
                paths["ort_static"] = ort_static(fp32, tmp / "ort_static.onnx",
                                                 [rng.standard_normal((1, c, h, w), dtype=np.float32) for _ in range(8)])
            out["ops"] = {k: op_summary(optimized_ops(p, tmp)) for k, p in paths.items()}
        if use_ov:
            on_event({"event": "note", "text": "counting the integer layers of OpenVINO's compiled model"})
            out["openvino"] = {"version": ov_version(), "ops": {k: ov_ops(p) for k, p in both.items()}}
        out["latency"] = []
        for b in opts.batches:
            on_event({"event": "note", "text": f"timing batch {b} ({opts.reps} alternating runs)"})
            ms = interleaved(paths, (b, c, h, w), opts.threads, opts.reps, openvino=both if use_ov else None)
            row: dict = {"batch": b, "ms": ms}
            if use_ort:
                row["codeq_vs_fp32"] = ms["fp32"] / ms["codeq"]
                if "ort_static" in ms:
                    row["codeq_vs_ort_static"] = ms["ort_static"] / ms["codeq"]
            if use_ov:
                row["openvino_codeq_vs_fp32"] = ms["openvino_fp32"] / ms["openvino_codeq"]
            out["latency"].append(row)
        folder = opts.data or (Path(ckpt.data_dir) if ckpt.data_dir and Path(ckpt.data_dir).is_dir() else None)
        out["top1"] = None
        if folder is not None:
            from codeq_cli.commands import evaluate

            on_event({"event": "note", "text": f"top-1 on {folder}"})
            top: dict = {}
            for rt, key in (("ort", "onnx_int8"), ("openvino", "openvino")):
                if rt in opts.runtimes:
                    top[key], n = onnx_top1(Path(opts.onnx), ckpt, folder, opts.batch_size, opts.subset, runtime=rt)
            ev = evaluate.run(evaluate.EvalOptions(Path(opts.checkpoint), data=folder, batch_size=opts.batch_size,
                                                   workers=0, subset=opts.subset, device="cpu"))
            out["top1"] = {**top, "codeq_eval": ev["top1"], "images": n, "codeq_eval_images": ev["samples"],
                           "data": str(folder)}
    return out


def render(res: dict) -> str:
    """The check as text: one line of machine, ops per graph, the latency table, top-1."""
    ov = res.get("openvino")
    engines = ([f"ONNX Runtime {res['onnxruntime']}"] if "onnxruntime" in res else []) + \
        ([f"OpenVINO {ov['version']} (CPU, FP32 pinned to f32)"] if ov else [])
    lines = [f"machine: {res['cpu']}, {' and '.join(engines)}, {res['threads']} thread(s), "
             f"median of {res['reps']} alternating runs"]

    def ops_line(label: str, ops: dict) -> str:
        ints = ", ".join(f"{op} {n}" for op, n in ops["int"].items()) or "none"
        floats = ", ".join(f"{op} {n}" for op, n in ops["float"].items()) or "none"
        return f"{label:>10} ops: integer {ints}; float {floats}"

    for k, ops in res.get("ops", {}).items():
        lines.append(ops_line(k, ops))
    for k, ops in (ov["ops"] if ov else {}).items():
        lines.append(ops_line(f"OpenVINO {k}", ops))
    for row in res["latency"]:
        ms = row["ms"]
        parts = []
        if "codeq" in ms:
            parts.append(f"FP32 {ms['fp32']:.2f} ms, codeq int8 {ms['codeq']:.2f} ms ({row['codeq_vs_fp32']:.2f}× FP32)")
        if "ort_static" in ms:
            parts.append(f"ORT quantize_static {ms['ort_static']:.2f} ms (codeq {row['codeq_vs_ort_static']:.2f}× its speed)")
        if "openvino_codeq" in ms:
            parts.append(f"OpenVINO FP32 {ms['openvino_fp32']:.2f} ms, codeq int8 {ms['openvino_codeq']:.2f} ms "
                         f"({row['openvino_codeq_vs_fp32']:.2f}× FP32)")
        lines.append(f"batch {row['batch']}: " + "; ".join(parts))
    top = res.get("top1")
    if top:
        got = ([f"exported graph {top['onnx_int8']:.2f}%"] if "onnx_int8" in top else []) + \
            ([f"in OpenVINO {top['openvino']:.2f}%"] if "openvino" in top else [])
        lines.append(f"top-1: {', '.join(got)} on {top['images']} images, "
                     f"codeq eval {top['codeq_eval']:.2f}% on {top['codeq_eval_images']}")
    else:
        lines.append("top-1: no image folder (pass --data, or keep the one the checkpoint records)")
    return "\n".join(lines)

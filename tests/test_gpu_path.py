"""The CUDA path, checked on CPU: forced paths, CPU autocast and a monkeypatched ``torch.cuda``.

SyncBatchNorm that keeps timm's fused activations, per-rank random
generators in the run state, one arithmetic for ``compress`` and ``eval``,
device and ``--compile`` refusals in one line, the loss agreement after
backward, and the quantizer's backward on channels_last weights without
copies. ``bench/gpu_check.sh`` runs the real thing on a GPU.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from codeq_cli.core import _kernels
from codeq_cli.core.quantizer import DeadZoneQuantizer, flat_alike
from codeq_cli.errors import TrainingError, UsageError
from codeq_cli.formats import runstate
from codeq_cli.train import dist, precision
from codeq_cli.train._compile import check_compile, compile_failure
from codeq_cli.train.launch import check_gpus
from conftest import make_image_folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("gpu") / "data", per_class=4, val_per_class=3, size=36)


@pytest.fixture
def one_gpu(monkeypatch):
    """A machine with one CUDA device of compute capability ``cap`` (7.0 unless changed)."""
    calls = {"set_device": [], "cap": (7, 0)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls["set_device"].append(torch.device(d)))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: calls["cap"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla V100")
    return calls


# -- SyncBatchNorm ---------------------------------------------------------------------
def test_sync_bn_keeps_the_activations_of_timm_fused_norm_layers(monkeypatch):
    import timm
    from timm.layers import BatchNormAct2d, SyncBatchNormAct

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=3).eval()
    fused = sum(isinstance(m, BatchNormAct2d) for m in model.modules())
    assert fused > 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        # What torch's converter did: the activations are gone, the outputs change.
        plain = torch.nn.SyncBatchNorm.convert_sync_batchnorm(timm.create_model("test_efficientnet", num_classes=3))
        plain.load_state_dict(model.state_dict())
        assert not torch.allclose(plain.eval()(x), before)
        # DDP wrapping, on a pretend GPU (DDP itself replaced: no process group here).
        monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", lambda m, device_ids=None: m)
        info = dist.DistInfo(rank=0, world_size=2, device=torch.device("cuda:0"))
        converted = dist.wrap(model, info, sync_bn=True).eval()
        assert sum(isinstance(m, SyncBatchNormAct) for m in converted.modules()) == fused
        assert not any(type(m) is torch.nn.BatchNorm2d for m in converted.modules())
        torch.testing.assert_close(converted(x), before, rtol=0, atol=0)
    assert converted.state_dict().keys() == model.state_dict().keys()


# -- random generators per rank ----------------------------------------------------------
def _gather_worker(rank: int, init: str, out: str) -> None:
    import torch.distributed as td

    td.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        torch.manual_seed(100 + rank)
        torch.rand(rank + 1)  # the ranks' generators advance differently
        saved = runstate.gather_rng_states()
        expected = torch.rand(4)
        torch.manual_seed(7)  # a fresh process, say
        own = runstate.restore_rng_state({"rng": saved[0], "rng_ranks": saved}, rank, 2)
        resumed = torch.rand(4)
        if rank == 0:
            torch.save({"saved": saved, "own": own}, out + ".states")
        torch.save({"expected": expected, "resumed": resumed}, f"{out}.{rank}")
    finally:
        td.destroy_process_group()


def test_every_rank_saves_and_resumes_its_own_generators(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "rng")
    init = f"file://{tempfile.mkdtemp(dir=tmp_path)}/rendezvous"
    mp.start_processes(_gather_worker, args=(init, out), nprocs=2, start_method="spawn")
    states = torch.load(out + ".states", weights_only=True)
    assert states["own"] is True
    a, b = states["saved"]
    assert not torch.equal(a["torch"], b["torch"])  # rank 1's own, not a copy of rank 0's
    for rank in (0, 1):
        r = torch.load(f"{out}.{rank}", weights_only=True)
        torch.testing.assert_close(r["resumed"], r["expected"], rtol=0, atol=0)


def test_resume_on_another_world_size_takes_rank_zero_generators(one_gpu, monkeypatch):
    cuda_set = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d=None: cuda_set.append((s.clone(), torch.device(d))))
    ranks = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        ranks.append({"torch": torch.get_rng_state(), "python": (3, tuple(range(625)), None),
                      "cuda": torch.full((16,), seed, dtype=torch.uint8)})
    state = {"rng": ranks[0], "rng_ranks": ranks}
    gpu1 = torch.device("cuda:1")
    assert runstate.restore_rng_state(state, 1, 2, gpu1) is True
    assert torch.equal(torch.get_rng_state(), ranks[1]["torch"]) and cuda_set[-1][1] == gpu1
    assert int(cuda_set[-1][0][0]) == 2  # rank 1's CUDA generator on rank 1's GPU
    assert runstate.restore_rng_state(state, 2, 3, gpu1) is False  # 2 saved, 3 resume: rank 0's
    assert torch.equal(torch.get_rng_state(), ranks[0]["torch"]) and int(cuda_set[-1][0][0]) == 1
    # A version-1 state: every GPU's generator from rank 0's process; a rank takes its device's.
    old = {"rng": {**ranks[0], "cuda": [torch.full((16,), 5, dtype=torch.uint8), torch.full((16,), 6, dtype=torch.uint8)]}}
    runstate.restore_rng_state(old, 1, 2, gpu1)
    assert int(cuda_set[-1][0][0]) == 6


def test_rng_state_saves_only_this_process_gpu(one_gpu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda d=None: torch.full((16,), torch.device(d).index, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("every GPU's generator saved"))
    s = runstate.rng_state(torch.device("cuda:3"))
    assert int(s["cuda"][0]) == 3
    assert "cuda" not in runstate.rng_state(torch.device("cpu"))


# -- one arithmetic for compress and eval ----------------------------------------------------
def test_arithmetic_on_gpus_with_and_without_native_bf16(one_gpu):
    gpu = torch.device("cuda:0")
    a, note = precision.resolve(True, True, gpu)  # V100: no native bf16
    assert a == precision.Arithmetic("float32", True) and "Tesla V100" in note and "amp=false" in note
    assert precision.resolve(False, False, gpu) == (precision.Arithmetic("float32", False), None)
    one_gpu["cap"] = (9, 0)
    assert precision.resolve(True, False, gpu) == (precision.Arithmetic("bfloat16", False), None)
    assert precision.resolve(True, True, torch.device("cpu")) == (precision.Arithmetic(), None)
    one_gpu["cap"] = (7, 5)
    a, note = precision.for_device(precision.Arithmetic("bfloat16", True), gpu)
    assert a.dtype == "float32" and "float32" in note
    # A checkpoint written before the arithmetic was recorded: its recipe and device say it.
    assert precision.Arithmetic.from_provenance({"device": "cuda"}, {"amp": True, "channels_last": True}) == \
        precision.Arithmetic("bfloat16", True)
    assert precision.Arithmetic.from_provenance({"device": "cpu"}, {"amp": True}) == precision.Arithmetic()


def test_evaluation_runs_in_the_arithmetic_it_is_given():
    from codeq_cli.train.accuracy import measure_accuracy as evaluate

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 3))
    batches = [(torch.randn(4, 3, 12, 12), torch.randint(0, 3, (4,))) for _ in range(2)]
    cpu = torch.device("cpu")
    fp32 = evaluate(model, batches, cpu, arithmetic=precision.Arithmetic())
    bf16 = evaluate(model, batches, cpu, arithmetic=precision.Arithmetic("bfloat16", True))
    assert fp32.samples == bf16.samples == 8
    assert fp32.loss != bf16.loss  # CPU autocast really ran in bfloat16
    assert evaluate(model, batches, cpu, amp=True).loss == fp32.loss  # training's: no autocast on CPU


def test_eval_repeats_the_arithmetic_compress_evaluated_in(data, tmp_path, monkeypatch):
    from codeq_cli.commands import compress, evaluate
    from codeq_cli.formats import checkpoint
    from codeq_cli.train import accuracy

    forced = precision.Arithmetic("bfloat16", True)
    monkeypatch.setattr(precision, "resolve", lambda amp, cl, device: (forced, None))  # a GPU's choice, on CPU
    seen = []
    real = accuracy.measure_accuracy

    def spy(*args, **kwargs):
        res = real(*args, **kwargs)
        seen.append((kwargs.get("arithmetic"), res))
        return res

    monkeypatch.setattr(accuracy, "measure_accuracy", spy)
    out = tmp_path / "m.pt"
    res = compress.run(compress.CompressOptions(
        model="timm:test_resnet", data=data, out=out, pretrained=False, num_classes=3, img_size=32, workers=0,
        max_steps=1, skip_baseline=True, overrides=["batch_size=4"]))
    assert seen[-1][0] == forced and seen[-1][1].top1 == res.metrics["top1"]
    prov = checkpoint.load(out).provenance
    assert (prov["eval_dtype"], prov["eval_channels_last"]) == ("bfloat16", True)
    got = evaluate.run(evaluate.EvalOptions(out, batch_size=4, workers=0, device="cpu"))
    assert seen[-1][0] == forced and got["arithmetic"] == forced.to_provenance()
    assert got["top1"] == res.metrics["top1"] and got["loss"] == seen[-2][1].loss


# -- devices, launch and compile ------------------------------------------------------------------
def test_device_mistakes_are_one_line(one_gpu):
    with pytest.raises(UsageError, match=r"cuda:1: this machine has 1 GPU .*cuda:N with N below 1"):
        dist.resolve_device("cuda:1")
    with pytest.raises(UsageError, match=r"every one would use GPU 0.*--device cuda"):
        dist.resolve_device("cuda:0", local_rank=1, local_world=2)
    with pytest.raises(UsageError, match=r"2 processes on this machine but only 1 GPU.*--nproc 1"):
        dist.resolve_device(None, local_rank=1, local_world=2)
    with pytest.raises(UsageError, match=r"--nproc 3: this machine has 1 GPU.*--nproc 1"):
        check_gpus(3, None)
    check_gpus(3, "cpu")  # CPU processes: no limit
    assert dist.resolve_device("cuda", local_rank=0, local_world=1) == torch.device("cuda:0")
    # One node, one process per node (multi-node): an explicit GPU is fine.
    assert dist.resolve_device("cuda:0", local_rank=0, local_world=1) == torch.device("cuda:0")


def test_mps_is_refused():
    with pytest.raises(UsageError, match=r"mps.*float64.*--device cpu"):
        dist.resolve_device("mps")


def test_one_process_on_a_gpu_makes_it_current(one_gpu, monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    info = dist.init("cuda:0")
    assert not info.distributed and one_gpu["set_device"] == [torch.device("cuda:0")]


def test_compile_under_ddp_needs_a_recent_torch():
    two, one = dist.DistInfo(world_size=2), dist.DistInfo()
    with pytest.raises(UsageError, match=r"--compile with 2 processes needs torch 2\.6.*this is torch 2\.5\.1"):
        check_compile(two, "2.5.1+cu121")
    check_compile(two, "2.6.0")
    check_compile(two, "2.11.0+cu130")
    check_compile(one, "2.2.0")


def _raise_from(filename: str, function: str) -> BaseException:
    namespace: dict = {}
    exec(compile(f"def {function}():\n    raise RuntimeError('ptxas: out of resources')\n", filename, "exec"), namespace)
    try:
        namespace[function]()
    except RuntimeError as exc:
        return exc
    raise AssertionError("unreachable")


def test_lazily_compiled_triton_kernels_count_as_compile_failures():
    import torch._dynamo.exc  # noqa: F401 - compile_failure looks only once something was compiled

    heuristics = "/x/site-packages/torch/_inductor/runtime/triton_heuristics.py"
    assert compile_failure(_raise_from(heuristics, "precompile"))
    assert compile_failure(_raise_from(heuristics, "_precompile_config"))
    assert compile_failure(_raise_from("/x/site-packages/triton/compiler/compiler.py", "compile"))
    assert not compile_failure(_raise_from(heuristics, "run"))  # launching compiled code: its own error
    assert not compile_failure(_raise_from("/x/model.py", "forward"))
    assert issubclass(TrainingError, Exception)


# -- the training step ------------------------------------------------------------------------
def test_ranks_agree_after_backward_and_before_the_step(data, tmp_path, monkeypatch):
    from codeq_cli.commands import compress

    order = []
    backward, host_sum, step = torch.Tensor.backward, dist.host_sum, torch.optim.AdamW.step
    monkeypatch.setattr(torch.Tensor, "backward", lambda self, *a, **k: (order.append("backward"), backward(self, *a, **k))[1])
    monkeypatch.setattr(dist, "host_sum", lambda v: (order.append("agree") if len(v) == 5 else None, host_sum(v))[1])
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: (order.append("step"), step(self, *a, **k))[1])
    compress.run(compress.CompressOptions(
        model="timm:test_resnet", data=data, out=tmp_path / "m.pt", pretrained=False, num_classes=3, img_size=32,
        workers=0, max_steps=2, skip_baseline=True, overrides=["batch_size=4"]))
    assert order == ["backward", "agree", "step"] * 2


# -- channels_last in the quantizer's backward ---------------------------------------------------
def test_channels_last_backward_uses_memory_order_views(monkeypatch):
    w = torch.randn(8, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    a, b = flat_alike(w, w.abs())
    assert a.data_ptr() == w.data_ptr() and a.shape == (w.numel(),)  # a view, not a copy
    torch.testing.assert_close(torch.dot(a, b), (w * w.abs()).sum())
    mixed = flat_alike(w, w.contiguous())  # different layouts: paired by reshape
    torch.testing.assert_close(mixed[0], mixed[1])

    monkeypatch.setattr(_kernels, "usable", lambda t: False)  # the eager path (what CUDA runs)
    grads = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(0)
        qz = DeadZoneQuantizer(bits=None)
        weight = torch.randn(8, 4, 3, 3).contiguous(memory_format=fmt).requires_grad_()
        g = torch.randn(8, 4, 3, 3)
        (qz(weight) * g).sum().backward()
        grads.append((weight.grad.clone(), qz.theta_dz.grad.clone(), qz.theta_bit.grad.clone()))
    for x, y in zip(*grads):
        torch.testing.assert_close(x, y)


# -- on a real GPU (bench/gpu_check.sh runs these) ---------------------------------------------
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda_only
def test_cuda_step_pieces():
    from codeq_cli.train.loop import HostCopy

    dev = torch.device("cuda", torch.cuda.current_device())
    t = torch.arange(3.0, device=dev) * 2
    copy = HostCopy(t)
    assert copy.host.is_pinned() and copy.tolist() == [0.0, 2.0, 4.0]
    state = runstate.rng_state(dev)
    first = torch.rand(4, device=dev)
    runstate.set_rng_state(state, dev)
    assert torch.equal(torch.rand(4, device=dev), first)
    a, note = precision.resolve(True, True, dev)
    assert (a.dtype == "bfloat16") == precision.native_bf16(dev) and (note is None) == precision.native_bf16(dev)


@cuda_only
def test_cuda_channels_last_backward_matches_contiguous():
    grads = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(0)
        qz = DeadZoneQuantizer(bits=None).cuda()
        weight = torch.randn(64, 32, 3, 3, device="cuda").contiguous(memory_format=fmt).requires_grad_()
        g = torch.randn(64, 32, 3, 3, device="cuda")
        (qz(weight) * g).sum().backward()
        grads.append((weight.grad.clone(), qz.theta_dz.grad.clone(), qz.theta_bit.grad.clone()))
    for x, y in zip(*grads):
        torch.testing.assert_close(x, y)


@cuda_only
@pytest.mark.parametrize("bits", [None, 4])
def test_cuda_one_pass_matches_the_per_layer_chain(bits):
    """The one-pass quantizer (every layer at once) against each layer's eager chain, on the device."""
    from codeq_cli.core.insert import encode_all, quantize_, quantized_weights

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3), torch.nn.Conv2d(64, 128, 3), torch.nn.Conv2d(128, 32, 1),
                                torch.nn.Flatten(), torch.nn.LazyLinear(10)).cuda()
    model(torch.randn(1, 3, 12, 12, device="cuda"))
    model = model.to(memory_format=torch.channels_last)
    quantize_(model, bits=bits)
    qws = list(quantized_weights(model))
    g = torch.Generator(device="cuda").manual_seed(1)
    upstream = [torch.randn(qw.original.shape, device="cuda", generator=g) for qw in qws]
    seen = []
    for fn in (lambda qz, w: qz(w), lambda qz, w: qz.forward_per_layer(w)):
        model.zero_grad(set_to_none=True)
        outs = [fn(qw.quantizer, qw.original) for qw in qws]
        sum((y * u).sum() for y, u in zip(outs, upstream)).backward()
        seen.append(([y.detach() for y in outs], [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    for a, b in zip(seen[0][0], seen[1][0]):
        assert torch.equal(a, b)
    for a, b in zip(seen[0][1], seen[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    enc = encode_all(model)
    for qw in qws:
        e = qw.quantizer.encode(qw.original)
        assert torch.equal(enc[qw.name].codes, e.codes) and (enc[qw.name].step, enc[qw.name].shift) == (e.step, e.shift)

"""Training throughput (images/s) of FP32 and of CoDeQ, side by side, on this machine's device.

One step is what ``codeq compress`` does per batch: forward (bf16 autocast
on CUDA), cross-entropy plus the CoDeQ regularizer, backward, one read of the loss (the
step's single host synchronisation), AdamW. Two models are built
from the same random weights: plain FP32 training and CoDeQ (every conv and
linear wrapped; mixed precision by default). Their steps alternate so both
see the same machine state; the medians are compared. On CUDA the models and
inputs are ``channels_last`` and the peak memory of each is reported.

    python bench/throughput.py [--model resnet18] [--size 224] [--batch 64] [--steps 20]
                               [--device cuda] [--fixed] [--no-amp] [--no-channels-last] [--compile]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from contextlib import nullcontext

import torch
import torchvision
from torch import nn

from codeq_cli import quantize_, quantizer_parameters
from codeq_cli.train.loop import penalty


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    dz, bit = quantizer_parameters(model)
    logits = {id(p) for p in dz + bit}
    groups = [{"params": [p for p in model.parameters() if id(p) not in logits], "lr": 1e-4, "weight_decay": 1e-4}]
    if dz:
        groups.append({"params": dz, "lr": 1e-4, "weight_decay": 0.0})
    if bit:
        groups.append({"params": bit, "lr": 1e-4, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=1e-4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18", help="a torchvision classification model name")
    ap.add_argument("--size", type=int, default=224, help="input resolution")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per model")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    ap.add_argument("--device", default=None, help="cpu or cuda[:N] [default: cuda when present]")
    ap.add_argument("--fixed", action="store_true", help="4-bit fixed precision instead of mixed")
    ap.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    ap.add_argument("--no-channels-last", action="store_true", help="keep NCHW on CUDA")
    ap.add_argument("--compile", action="store_true", help="torch.compile both models")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after timing, profile 3 CoDeQ steps and print the N ops with the most device time "
                         "(self), the N with the most host time, and the host-device synchronisations")
    args = ap.parse_args()

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    amp = cuda and not args.no_amp
    channels_last = cuda and not args.no_channels_last
    bits = 4 if args.fixed else None
    lambda_bit = 0.0 if args.fixed else 0.1

    torch.manual_seed(0)
    base = torchvision.models.get_model(args.model, weights=None, num_classes=1000)
    models = {"fp32": copy.deepcopy(base), "codeq": copy.deepcopy(base)}
    wrapped = quantize_(models["codeq"], bits=bits)
    for m in models.values():
        m.to(device).train()
        if channels_last:
            m.to(memory_format=torch.channels_last)
    opts = {k: _optimizer(m) for k, m in models.items()}
    logits = quantizer_parameters(models["codeq"])
    nets = {k: torch.compile(m) if args.compile else m for k, m in models.items()}
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp else nullcontext

    def step(name: str) -> None:
        net, opt = nets[name], opts[name]
        with autocast():
            loss = nn.functional.cross_entropy(net(x).float(), y)
        if name == "codeq":
            loss = loss + penalty(*logits, 0.02, lambda_bit)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        float(loss.detach())  # as in training: the one host synchronisation per step, after backward
        opt.step()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    for name in models:  # warm-up: allocator, caches, compilation
        for _ in range(args.warmup):
            step(name)
    sync()
    times = {name: [] for name in models}
    peak = {name: 0 for name in models}
    for _ in range(args.steps):
        for name in models:
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            sync()
            t0 = time.perf_counter()
            step(name)
            sync()
            times[name].append(time.perf_counter() - t0)
            if cuda:
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated(device))
    med = {k: statistics.median(v) for k, v in times.items()}
    ips = {k: args.batch / t for k, t in med.items()}

    what = f"{device.type}" + (f" ({torch.cuda.get_device_name(device)})" if cuda else f", {torch.get_num_threads()} threads")
    flags = ", ".join(f for f, on in (("bf16 autocast", amp), ("channels_last", channels_last), ("compile", args.compile)) if on)
    print(f"{args.model} {args.size}x{args.size} batch {args.batch} on {what}; {'4-bit' if bits else 'mixed'} CoDeQ, "
          f"{len(wrapped)} layers wrapped; {args.steps} alternating steps{'; ' + flags if flags else ''}")
    for name in models:
        mem = f"   peak memory {peak[name] / 2**30:6.2f} GiB" if cuda else ""
        print(f"  {name:6s} {ips[name]:9.1f} images/s   median step {med[name] * 1000:8.1f} ms{mem}")
    print(f"throughput_ratio={ips['codeq'] / ips['fp32']:.3f}  (CoDeQ images/s over FP32 images/s)")
    if cuda:
        print(f"peak_memory_ratio={peak['codeq'] / max(1, peak['fp32']):.3f}")
    if args.profile:
        profile(lambda: step("codeq"), sync, cuda, args.profile)


def profile(run_step, sync, cuda: bool, top: int) -> None:
    """Where a CoDeQ step's time goes: ops by device and host time, and the synchronisations."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync()
    with torch_profile(activities=activities) as prof:
        for _ in range(3):
            run_step()
        sync()
    events = prof.key_averages()
    device_key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    if cuda:
        print(f"profile: {top} ops by self device time over 3 CoDeQ steps")
        print(events.table(sort_by=device_key, row_limit=top, max_name_column_width=60))
    print(f"profile: {top} ops by self host time over 3 CoDeQ steps")
    print(events.table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=60))
    syncs = {e.key: e.count for e in events
             if any(t in e.key for t in ("Synchronize", "cudaMemcpy", "aten::item", "aten::_local_scalar_dense"))}
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    print("profile_syncs=" + (", ".join(f"{k}:{v // 3}" for k, v in sorted(syncs.items())) or "none") + " (per step)")
    print(f"profile_launches_per_step={launches // 3}")


if __name__ == "__main__":
    main()

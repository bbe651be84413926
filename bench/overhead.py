"""Cost of CoDeQ's quantizers in one training step, side by side with FP32.

One step = forward, backward and AdamW step of torchvision ResNet-18 (random
weights; ``--model`` another torchvision name, or ``timm:NAME``) at 64x64,
batch 64, on CPU. Three models are built from the same
weights: plain FP32, codeq's quantizers (mixed precision, every conv and
linear wrapped), and a literal transcription of the method (exact
``torch.quantile`` and separate straight-through nodes every forward). Steps
alternate between them and the medians are compared.

    python bench/overhead.py [--model resnet18] [--steps 15] [--size 64] [--batch 64] [--fixed]

Issue 22's CPU set: ``--model resnet50 --batch 16``, ``--model timm:vit_small_patch16_224 --batch 4``,
``--model mobilenet_v2 --batch 32`` (64 px), besides ResNet-18.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torchvision
from torch import nn
from torch.nn.utils import parametrize

from codeq_cli import quantize_, quantizer_parameters
from codeq_cli.testing.reference import reference_dequantize


class _Plain(nn.Module):
    """The method transcribed literally, as a parametrization."""

    def __init__(self, bits):
        super().__init__()
        self.bits = bits
        self.theta_dz = nn.Parameter(torch.tensor(3.0))
        self.theta_bit = nn.Parameter(torch.tensor(3.0)) if bits is None else None

    def forward(self, w):
        return reference_dequantize(w, self.theta_dz, self.theta_bit, bits=self.bits)


def _plain_quantize(model, bits):
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            parametrize.register_parametrization(module, "weight", _Plain(bits), unsafe=True)


def _build(name: str, size: int) -> nn.Module:
    if name.startswith("timm:"):
        import timm

        kwargs = {"img_size": size} if "vit" in name or "deit" in name else {}
        return timm.create_model(name[5:], pretrained=False, **kwargs)
    return getattr(torchvision.models, name)()


def _optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=15, help="timed steps per model")
    ap.add_argument("--model", default="resnet18", help="a torchvision classification model, or timm:NAME")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--fixed", action="store_true", help="4-bit fixed precision instead of mixed")
    ap.add_argument("--no-plain", action="store_true", help="skip the literal transcription")
    args = ap.parse_args()
    bits = 4 if args.fixed else None

    torch.manual_seed(0)
    base = _build(args.model, args.size)
    models = {"fp32": copy.deepcopy(base), "codeq": copy.deepcopy(base)}
    wrapped = quantize_(models["codeq"], bits=bits)
    if not args.no_plain:
        models["plain"] = copy.deepcopy(base)
        _plain_quantize(models["plain"], bits)
    opts = {k: _optimizer(m) for k, m in models.items()}
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 1000, (args.batch,))

    def step(name):
        model, opt = models[name], opts[name]
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    for name in models:  # warm-up: allocator, caches, first selections
        for _ in range(3):
            step(name)
    times = {name: [] for name in models}
    for _ in range(args.steps):
        for name in models:
            t0 = time.perf_counter()
            step(name)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    dz, bit = quantizer_parameters(models["codeq"])
    print(f"{args.model} {args.size}x{args.size} batch {args.batch}, {'4-bit' if bits else 'mixed'}, "
          f"{len(wrapped)} layers wrapped, {torch.get_num_threads()} threads, {args.steps} alternating steps")
    for name, t in med.items():
        print(f"  {name:6s} median step {t * 1000:8.1f} ms   ratio to fp32 {t / med['fp32']:.3f}x")
    print(f"overhead_ratio={med['codeq'] / med['fp32']:.3f}")
    if "plain" in med:
        print(f"plain_ratio={med['plain'] / med['fp32']:.3f}")


if __name__ == "__main__":
    main()

"""Peak memory of one training step of a large linear layer: plain vs CoDeQ-wrapped.

The quantizer keeps a few weight-sized tensors for its backward (``|w|``,
the rounding error, the kept mask); this shows what that costs on the
device for one big layer, the worst case (LLM heads, ViT MLPs).

    python bench/linear_memory.py [--features 16384] [--batch 64] [--device cuda]

Prints ``peak_mib_fp32=…  peak_mib_codeq=…  ratio=…`` (on CPU only the step runs: no figures).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from codeq_cli import quantize_


def peak_step(layer: nn.Module, x: torch.Tensor) -> int:
    """Bytes allocated at the peak of forward + backward, above what was there before."""
    cuda = x.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        base = torch.cuda.memory_allocated(x.device)
    layer(x).square().mean().backward()
    if not cuda:
        return 0
    torch.cuda.synchronize(x.device)
    return torch.cuda.max_memory_allocated(x.device) - base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", type=int, default=16384, help="in = out features (16384: a 1 GiB float32 weight)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--device", default=None, help="cpu or cuda[:N] [default: cuda when present]")
    args = ap.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.features, device=device)
    peaks = {}
    for name in ("fp32", "codeq"):
        layer = nn.Sequential(nn.Linear(args.features, args.features, bias=False)).to(device)
        if name == "codeq":
            quantize_(layer, bits=None)
        peak_step(layer, x)  # warm-up: allocator, the quantile cache
        layer.zero_grad(set_to_none=True)
        peaks[name] = peak_step(layer, x)
        del layer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    weight_mib = args.features**2 * 4 / 2**20
    if device.type != "cuda":
        print(f"linear {args.features}x{args.features} ({weight_mib:.0f} MiB weight) on {device}: step ran; no memory figures on CPU")
        return
    mib = {k: v / 2**20 for k, v in peaks.items()}
    print(f"linear {args.features}x{args.features} ({weight_mib:.0f} MiB weight), batch {args.batch}, "
          f"{torch.cuda.get_device_name(device)}")
    print(f"peak_mib_fp32={mib['fp32']:.0f}  peak_mib_codeq={mib['codeq']:.0f}  ratio={mib['codeq'] / max(mib['fp32'], 1e-9):.2f}")


if __name__ == "__main__":
    main()

"""Size of a compressed checkpoint against the entropy bound and the dense fp32 file.

torchvision ResNet-18 (random weights, 1000 classes), every convolution and
linear layer wrapped in mixed precision, then each quantizer set by hand to
values like those training ends with (``docs/method.md``, "The paper's presets and results": mean layer
sparsity about 0.63, about 3.4 bits, deeper layers sparser, 1×1 downsample
convolutions sparsest, first and last layers with more bits and less
sparsity). Prints the compressed file size, the order-0 entropy bound of the
codes ``Σ n·H(codes)``, their ratio, and the size of ``torch.save`` of the
dense fp32 state dict.

    python bench/size.py [--model resnet18] [--sparsity 0.63] [--seed 0]
"""

from __future__ import annotations

import argparse
import io
import math
import tempfile
import time
from pathlib import Path

import torch

from codeq_cli.formats import checkpoint
from codeq_cli.core.bops import bops_totals, measure_macs
from codeq_cli.core.insert import quantize_, quantized_weights
from codeq_cli.models.factory import DataConfig, ModelSpec, create


def set_learned_values(model: torch.nn.Module, mean_sparsity: float) -> None:
    """θ_dz and θ_bit so that each layer has a chosen sparsity and bit-width."""
    qws = list(quantized_weights(model))
    last = len(qws) - 1
    with torch.no_grad():
        for i, qw in enumerate(qws):
            depth = i / last
            if i == 0 or i == last:
                sparsity, bits = mean_sparsity - 0.3, 5
            elif "downsample" in qw.name:
                sparsity, bits = min(0.92, mean_sparsity + 0.25), 3
            else:
                sparsity, bits = mean_sparsity - 0.15 + 0.3 * depth, 4 if depth < 0.5 else 3
            a = qw.original.detach().abs().reshape(-1).float()
            R, cut = torch.quantile(a, torch.tensor([qw.quantizer.quantile, sparsity]))
            # |w| ≤ d/2 = R(1 − tanh|θ_dz|) is pruned
            qw.quantizer.theta_dz.fill_(math.atanh(min(0.9999, max(0.0, 1.0 - float(cut / R)))))
            # b = round(tanh|θ_bit|·(b_max − b_min) + b_min)
            span = qw.quantizer.b_max - qw.quantizer.b_min
            qw.quantizer.theta_bit.fill_(math.atanh((bits - qw.quantizer.b_min) / span))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18", help="a torchvision model name")
    ap.add_argument("--sparsity", type=float, default=0.63, help="target mean layer sparsity")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    spec = ModelSpec("torchvision", args.model, num_classes=1000)
    model = create(spec)
    macs = measure_macs(model, (3, 224, 224))
    quantize_(model, bits=None)
    set_learned_values(model, args.sparsity)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{args.model}.codeq"
        t0 = time.perf_counter()
        info = checkpoint.save(path, model, spec=spec, data_config=DataConfig(), class_names=None, recipe={"name": "bench"},
                               provenance={"seed": args.seed}, metrics={}, macs=macs)
        t_save = time.perf_counter() - t0
        t0 = time.perf_counter()
        ckpt = checkpoint.load(path)
        dense = ckpt.build_model()
        t_load = time.perf_counter() - t0
        layers = list(ckpt.layers.values())
        totals = bops_totals(ckpt.rows)

        buf = io.BytesIO()
        torch.save(dense.state_dict(), buf)
        fp32_file = buf.getbuffer().nbytes

    bound = info.entropy_bound_bytes
    print(f"model              tv:{args.model}, {sum(lay.numel for lay in layers) / 1e6:.2f}M quantized weights in {len(layers)} layers")
    print(f"layer sparsity     mean {sum(lay.sparsity for lay in layers) / len(layers):.3f} "
          f"(parameter-weighted {totals['sparsity']:.3f}); bits mean {sum(lay.bits for lay in layers) / len(layers):.2f}; "
          f"relative BOPs {totals['rel_bops']:.2f}%")
    print(f"entropy bound      {bound:>12,.0f} bytes   Σ n·H(codes) over the quantized layers")
    print(f"coded weights      {info.weight_bytes:>12,} bytes   {info.weight_bytes / bound:.4f}× the bound (codes + frequency tables)")
    print(f"other tensors      {info.tensor_bytes:>12,} bytes   float32 biases, norms, buffers")
    print(f"metadata           {info.meta_bytes:>12,} bytes   JSON (spec, recipe, rows, ...)")
    print(f"compressed file    {info.file_bytes:>12,} bytes   {info.file_bytes / bound:.4f}× the bound")
    print(f"dense fp32 file    {fp32_file:>12,} bytes   torch.save(state_dict): {fp32_file / info.file_bytes:.1f}× the compressed file")
    print(f"time               save {t_save:.2f} s, load + decode + build {t_load:.2f} s")


if __name__ == "__main__":
    main()

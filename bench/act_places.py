"""Activation quantizer places and taps on one model of every timm family (issue 23).

For each family (``bench/zoo.py``'s pick): whether the model traces with torch.fx, how many
activation quantizers ``core/_act_places.find`` places and how many of them are taps
(``core/_taps.py``: a module's forward rewritten), and the largest difference between the model's
logits before and after (no quantizer calibrated: the taps are identities, so only the written-out
attention and SiLU move the floats). Random weights, one input at the model's own size (224 px where
that is over 256), one thread. A model whose forward raises after the rewrite is a bug.

    PYTHONPATH=. .venv/bin/python bench/act_places.py [--only NAME ...]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def main() -> int:
    import timm
    from zoo import timm_sample

    from codeq_cli.core import _act_places
    from codeq_cli.core.insert import plan

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=None, help="timm model names (default: one per family)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    names = [f"timm:{n}" for n in args.only] if args.only else timm_sample()
    print("| model | traces | places | taps | max rel. logit change | seconds |\n|---|---|---|---|---|---|")
    broken = 0
    for name in names:
        t0 = time.monotonic()
        model = timm.create_model(name[5:], pretrained=False, num_classes=10).eval()
        layers = [t.module_name for t in plan(model) if t.quantize]
        try:
            _act_places._trace(copy.deepcopy(model))
            traces = "yes"
        except Exception:
            traces = "no (one quantizer per layer input)"
        rewritten = copy.deepcopy(model)
        places = _act_places.find(rewritten, layers)
        size = (model.pretrained_cfg or {}).get("input_size", (3, 224, 224))
        x = torch.randn(1, *(size if size[1] <= 256 else (3, 224, 224)))  # the model's own size, 256 px at most
        with torch.no_grad():
            a = model(x)
        try:
            with torch.no_grad():
                b = rewritten(x)
            change = f"{float((a - b).abs().max() / (a.abs().max() + 1e-12)):.1e}"
        except Exception as exc:
            change, broken = f"**raised {type(exc).__name__}**", broken + 1
        taps = sum("codeq_tap_" in p.module for p in places)
        print(f"| {name} | {traces} | {len(places)} | {taps} | {change} | {time.monotonic() - t0:.0f} |", flush=True)
    print(f"\n{len(names)} models, {broken} broken", file=sys.stderr)
    return 1 if broken else 0


if __name__ == "__main__":
    raise SystemExit(main())

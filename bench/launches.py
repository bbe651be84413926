"""Kernel launches and host syncs of one training step, FP32 against CoDeQ, counted on CPU.

Issue 22: on a GPU a CoDeQ step is bound by kernel launches, not arithmetic.
This counts, for torchvision ResNet-18 and ResNet-50 (random weights, 64 px,
batch 2), the aten operations of one training step that would launch a kernel
on a GPU, and the host syncs, with the file and line of each sync. The CPU runs
the GPU's sequence of operations under ``CODEQ_KERNELS=torch``
(:func:`codeq_cli.core._kernels.gpu_path`), which this script sets before
importing codeq.

A logging step's reading of the per-layer figures (``core.bops.bops_rows``:
codes, bits and sparsity of every layer) is counted on its own after it.

One step: ``zero_grad(set_to_none=True)``, forward, cross-entropy plus the
CoDeQ penalty ``λ_dz Σθ_dz² + λ_bit Σθ_bit²`` (as ``train/`` writes it: a
square per logit, stacked and summed), backward, ``torch.optim.AdamW(foreach=True)``
step. CoDeQ is ``quantize_(model, **quantizer_kwargs(Recipe()))``, the built-in
``mixed`` recipe. The step is run twice first (warm-up: optimizer state, first
selections); the third is counted.

Counting rule (a ``TorchDispatchMode`` sees every aten operation the
dispatcher reaches below autograd, forward, backward and optimizer alike):

- **launch**: every operation except those that launch nothing on a GPU: views
  and aliases (``OpOverload.is_view``, ``detach``, ``alias``, ``lift_fresh``),
  allocations (``empty*``, ``new_empty*``), metadata queries (``sym_*``,
  ``is_*``, ``size``/``stride``/``numel``) and the device-to-host read
  ``_local_scalar_dense`` (counted as a sync instead). A multi-tensor op
  (``_foreach_*``) counts as one launch: on CUDA ``multi_tensor_apply`` packs
  up to ~20 M elements of up to ~100 tensors in one launch, so a very large
  list may take a few.
- **sync**: ``_local_scalar_dense`` (``.item()``, ``bool()``, ``float()``,
  ``int()`` of a tensor) except on the optimizer's ``step`` counters, which
  torch keeps on the host when ``capturable=False``; the ops whose output size
  depends on the data (``nonzero``, ``masked_select``, ``unique``, ``bincount``,
  ``repeat_interleave`` without ``output_size``, ``equal``, ``is_nonzero``);
  and, caught in Python, ``Tensor.tolist``/``numpy``/``cpu`` on any tensor (on
  a GPU every tensor of the step is on the device).

Ops that a CPU kernel dispatches internally are not seen (as on CUDA, where
they would be inside the same launch); an op whose CUDA kernel launches more
than one kernel (``sort``, ``topk``, ``cumsum`` of large tensors) counts one.

The penalty is counted in the forms ``--penalty`` names: ``package`` (as
``train/`` writes it today), ``stacked`` (one square of the stacked logits) and
``none`` (the quantizer's own launches).

    python bench/launches.py [--models resnet18 resnet50] [--size 64] [--batch 2] [--penalty package stacked none]
"""

from __future__ import annotations

import os

os.environ["CODEQ_KERNELS"] = "torch"  # the GPU path on CPU; before codeq is imported

import argparse  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402
import torchvision  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from codeq_cli import quantize_, quantizer_parameters  # noqa: E402

_NO_LAUNCH = {"detach", "alias", "lift_fresh", "empty", "empty_like", "empty_strided", "new_empty",
              "new_empty_strided", "size", "stride", "numel", "dim", "_local_scalar_dense", "resize_",
              "set_", "_unsafe_view", "unsqueeze_", "squeeze_", "as_strided_", "t_", "transpose_"}
_DATA_DEPENDENT = {"nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive",
                   "bincount", "equal", "is_nonzero", "histc"}
_HERE = os.path.abspath(__file__)


def _where() -> str:
    """File and line of the sync: the innermost frame in codeq or this script, else the innermost outside torch."""
    frames = [f for f in traceback.extract_stack() if "_python_dispatch" not in f.filename
              and not (os.path.abspath(f.filename) == _HERE and f.name in ("_where", "spy", "__torch_dispatch__"))]
    for f in reversed(frames):
        if "codeq_cli" in f.filename or os.path.abspath(f.filename) == _HERE:
            return f"{_short(f.filename)}:{f.lineno} ({f.name})"
    for f in reversed(frames):
        if "/torch/" not in f.filename:
            return f"{_short(f.filename)}:{f.lineno} ({f.name})"
    f = frames[-1]
    return f"{_short(f.filename)}:{f.lineno} ({f.name})"


def _short(path: str) -> str:
    for marker in ("codeq_cli/", "bench/", "torch/"):
        i = path.find(marker)
        if i >= 0:
            return path[i:]
    return path


class Counter(TorchDispatchMode):
    """Counts launching ops (by name) and host syncs (by place) while active."""

    def __init__(self, host_scalars: set[int]):
        super().__init__()
        self.launches: collections.Counter = collections.Counter()
        self.syncs: collections.Counter = collections.Counter()
        self.host_scalars = host_scalars  # ids of tensors that live on the host on a GPU too

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        if name == "_local_scalar_dense":
            if id(args[0]) not in self.host_scalars:
                self.syncs[f"item  {_where()}"] += 1
        elif name in _DATA_DEPENDENT or (name == "repeat_interleave" and kwargs.get("output_size") is None
                                         and len(args) < 3):
            self.syncs[f"{name}  {_where()}"] += 1
            self.launches[name] += 1
        elif not (func.is_view or name in _NO_LAUNCH or name.startswith(("sym_", "is_"))):
            self.launches[name] += 1
        return func(*args, **kwargs)


class _PythonSyncs:
    """``Tensor.tolist``/``numpy``/``cpu`` calls, which never reach the dispatcher on CPU tensors."""

    def __init__(self, counter: Counter):
        self.counter = counter
        self.saved = {}

    def __enter__(self):
        for name in ("tolist", "numpy", "cpu"):
            real = getattr(torch.Tensor, name)
            self.saved[name] = real

            def spy(t, *a, _real=real, _name=name, **k):
                self.counter.syncs[f"{_name}  {_where()}"] += 1
                return _real(t, *a, **k)

            setattr(torch.Tensor, name, spy)
        return self

    def __exit__(self, *exc):
        for name, real in self.saved.items():
            setattr(torch.Tensor, name, real)


def penalty(dz, bit, form: str, lambda_dz=0.02, lambda_bit=0.1, budget=None):
    """The CoDeQ penalty: ``package`` is ``train/``'s own (:func:`codeq_cli.train.objective.penalty`,
    one square of the stacked logits since issue 22), ``stacked`` the same written here, ``budget``
    the controller's (``BudgetRun.penalty``: weights and pressure), ``none`` left out."""
    from codeq_cli.train.objective import penalty as package

    if form == "package":
        return package(dz, bit, lambda_dz, lambda_bit)
    if form == "budget":
        return budget.penalty(dz, bit, lambda_dz, lambda_bit)
    total = torch.zeros(())
    for lam, group in ((lambda_dz, dz), (lambda_bit, bit)):
        if len(group) and form == "stacked":
            group = group if isinstance(group, torch.Tensor) else torch.stack(list(group))
            total = total + lam * group.square().sum()
    return total


def budget_run(model, macs: dict):
    """A ``--target-bops`` controller wired to ``model`` as ``train/`` wires it (measured every 5 steps)."""
    from codeq_cli.train.budget import BOPS
    from codeq_cli.train.controller import BudgetRun, Controller
    from codeq_cli.train.measure import rel_bops

    start = rel_bops(model, macs)
    return BudgetRun(Controller(BOPS, start / 4, start, 100, every=5), macs)


def build(arch: str, codeq: bool):
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)()
    layers = 0
    if codeq:
        from codeq_cli.train.recipe import Recipe, quantizer_kwargs

        layers = len(quantize_(model, **quantizer_kwargs(Recipe())))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, foreach=True)
    return model, opt, layers


def count_step(model, opt, x, y, codeq: bool, form: str = "package") -> dict:
    """Counts of the third step (two warm-up steps first), by phase; with CoDeQ a ``log`` phase
    after it: the per-layer figures a logging step reads (:func:`codeq_cli.core.bops.bops_rows`)."""
    from codeq_cli.core.bops import bops_rows, measure_macs

    from codeq_cli.core.insert import quantized_weights
    from codeq_cli.train.objective import current_logits

    logits = quantizer_parameters(model) if codeq else ([], [])
    qzs = [qw.quantizer for qw in quantized_weights(model)]
    macs = measure_macs(model, tuple(x.shape[1:])) if codeq else {}
    run = budget_run(model, macs) if form == "budget" else None
    if run is not None:
        run.after_step(model, 5, 100)  # a first measurement: the controller's weights are per layer from here

    def phases():
        yield "zero_grad", lambda: opt.zero_grad(set_to_none=True)
        out = {}
        yield "forward", lambda: out.setdefault("logits", model(x))
        yield "loss", lambda: out.setdefault("loss", nn.functional.cross_entropy(out["logits"], y)
                                             + (penalty(*current_logits(qzs, logits), form, budget=run)
                                                if codeq else 0.0))
        yield "backward", lambda: out["loss"].backward()
        if run is not None:  # the controller around the optimizer step, as Fit does at every step
            yield "controller", lambda: out.setdefault("before", run.before_step((*logits, [])))
        yield "optimizer", opt.step
        if run is not None:
            yield "controller ", lambda: run.after_optimizer_step(out["before"], (*logits, []))
        if codeq:
            yield "log", lambda: bops_rows(model, macs)
        if run is not None:
            yield "measure", lambda: run.after_step(model, 10, 100)  # a measuring step (every 5 steps)

    for _ in range(2):
        for phase, fn in phases():
            if phase not in ("log", "measure"):
                fn()
    host = {id(s["step"]) for s in opt.state.values() if "step" in s and not s["step"].is_cuda}
    result = {}
    for phase, fn in phases():
        counter = Counter(host)
        with _PythonSyncs(counter), counter:
            fn()
        result[phase] = counter
    return result


def summarise(counts: dict) -> dict:
    log = counts.pop("log", None)
    measure = counts.pop("measure", None)
    launches = sum(sum(c.launches.values()) for c in counts.values())
    syncs = collections.Counter()
    for c in counts.values():
        syncs.update(c.syncs)
    extra = {}
    if log is not None:
        extra["log"] = {"launches": sum(log.launches.values()), "syncs": sum(log.syncs.values()),
                        "sync_places": dict(log.syncs.most_common())}
    if measure is not None:
        extra["measure"] = {"launches": sum(measure.launches.values()), "syncs": sum(measure.syncs.values()),
                            "sync_places": dict(measure.syncs.most_common())}
    return {"launches": launches, "by_phase": {p: sum(c.launches.values()) for p, c in counts.items()}, **extra,
            "syncs": sum(syncs.values()), "sync_places": dict(syncs.most_common()),
            "top_ops": dict(sum((c.launches for c in counts.values()), collections.Counter()).most_common(12))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--penalty", nargs="+", default=["package", "none"], choices=["package", "stacked", "budget", "none"],
                    help="forms of the penalty to count (the quantizer's own launches: 'none')")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 1000, (args.batch,))
    report = {}
    for arch in args.models:
        model, opt, _ = build(arch, False)
        row = {"fp32": summarise(count_step(model, opt, x, y, False))}
        for form in args.penalty:
            model, opt, row["layers"] = build(arch, True)
            r = row[f"codeq/{form}"] = summarise(count_step(model, opt, x, y, True, form))
            r["extra_launches"] = r["launches"] - row["fp32"]["launches"]
        report[arch] = row
        print(f"{arch} ({row['layers']} quantized layers), {args.size} px, batch {args.batch}, one training step:")
        for name, r in row.items():
            if name == "layers":
                continue
            phases = ", ".join(f"{p} {n}" for p, n in r["by_phase"].items())
            extra = f"; extra {r['extra_launches']} ({r['extra_launches'] / row['layers']:.1f} per layer)" \
                if "extra_launches" in r else ""
            print(f"  {name:15s} launches {r['launches']:5d} ({phases}); host syncs {r['syncs']}{extra}")
            for place, n in r["sync_places"].items():
                print(f"    sync x{n}: {place}")
            if "log" in r:
                print(f"    a logging step's figures (bops_rows): launches {r['log']['launches']}, "
                      f"host syncs {r['log']['syncs']}")
                for place, n in r["log"]["sync_places"].items():
                    print(f"      sync x{n}: {place}")
            if "measure" in r:
                print(f"    the budget's measuring step (every budget_every steps): launches "
                      f"{r['measure']['launches']}, host syncs {r['measure']['syncs']}")
                for place, n in r["measure"]["sync_places"].items():
                    print(f"      sync x{n}: {place}")
        for form in args.penalty:
            print(f"  codeq/{form} most frequent ops: {row[f'codeq/{form}']['top_ops']}")
    if "resnet18" in report and "resnet50" in report:
        for form in args.penalty:
            a, b = (report[m][f"codeq/{form}"]["extra_launches"] for m in ("resnet18", "resnet50"))
            print(f"penalty {form}: extra launches ResNet-18 {a} (goal <= 200), ResNet-50 {b}, "
                  f"ratio {b / max(1, a):.2f}x (goal <= 1.25x)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()

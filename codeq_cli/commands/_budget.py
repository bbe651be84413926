"""The budget and accuracy steps of ``codeq compress`` (``docs/method.md``, "Compressing to a budget").

Kept apart from :mod:`codeq_cli.commands.compress` so that the pipeline there
reads top to bottom with one call per step:

- :func:`prepare`: before anything is printed, a copy of the model with fresh
  quantizers gives the starting figure and the reachable range; an
  unreachable target is refused with one line naming the range. Returns the
  run's :class:`~codeq_cli.train.budget.BudgetRun`.
- :func:`finish`: after training, ``max_drop`` restores the most compressed
  model that met the bound; a target is trimmed to within tolerance
  (:mod:`codeq_cli.train.trim`).
- :func:`check_baseline`: ``max_drop`` from a model at chance is refused.
- :func:`reestimate`: batch-norm statistics of the final quantized model
  (:func:`bn_step`: with top-1 before and after, and kept within ``max_drop``).
- :func:`save_within`: writes the checkpoint; when a ``target_size`` is
  missed by the metadata written last, trims again and rewrites.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch

from codeq_cli.errors import UsageError
from codeq_cli.train import budget as B

_META_MARGIN = 2048  # bytes, before training: metrics and provenance written at the end, not in the probe
_METRICS_ROOM = 384  # bytes, after training: the final metrics (about 15 numbers; measured 154 B compressed)


def total_steps(n_train: int, recipe, max_steps: int | None) -> int:
    """The number of optimizer steps :class:`~codeq_cli.train.loop.Fit` will take."""
    return max_steps if max_steps else recipe.epochs * (n_train // recipe.batch_size)


def _probe_save(model, save_kwargs: dict) -> tuple[int, int]:
    """``(file bytes, coded weight bytes)`` of the checkpoint ``model`` would give now."""
    from codeq_cli.formats import checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        info = checkpoint.save(Path(tmp) / "probe.pt", model, **save_kwargs)
    return info.file_bytes, info.weight_bytes


def prepare(recipe, model: torch.nn.Module, macs: dict[str, int], save_kwargs: dict, steps: int,
            skip_baseline: bool, resume: bool, is_main: bool) -> tuple[B.BudgetRun | None, dict]:
    """The budget of this run, after checking it can be reached (``model`` is the FP model, not yet quantized)."""
    kind = B.budget_kind(recipe)
    if kind is None:
        return None, {}
    if kind == "max_drop" and skip_baseline and not resume:
        raise UsageError("--max-drop needs the FP top-1 measured at the start",
                         hint="run without --skip-baseline")
    if recipe.lambda_dz == 0 and (recipe.lambda_bit == 0 or not recipe.mixed):
        raise UsageError("a budget needs a penalty to steer: lambda_dz is 0",
                         hint="set lambda_dz > 0 (for example --set lambda_dz=0.05)")
    from codeq_cli.core.insert import quantize_
    from codeq_cli.train.recipe import quantizer_kwargs

    probe = copy.deepcopy(model)
    quantize_(probe, **quantizer_kwargs(recipe), include=recipe.include, exclude=recipe.exclude)
    file_bytes, weight_bytes = _probe_save(probe, save_kwargs)
    overhead = file_bytes - weight_bytes + _META_MARGIN
    # Activation quantizers are calibrated later: count them at the widths they start with, and
    # (learned, under a BOPs-counted budget the controller drives them) at the fewest they can reach.
    from codeq_cli.core.act_quant import act_bits, lowest_act_bits

    planned = act_bits(probe, planned=True)
    act_low = lowest_act_bits(probe) if B.drives_activations(kind) else planned
    start_bops = B.rel_bops(probe, macs, planned)
    low_bops, _ = B.reachable("bops", probe, macs, overhead, start_bops, act_bits=planned, act_low=act_low)
    info = {"kind": kind, "start_rel_bops": start_bops, "start_file_bytes": file_bytes,
            "reachable_rel_bops": [low_bops, start_bops]}
    ramp, ratio = recipe.budget_ramp, None
    if kind == "bops":
        target, start = recipe.target_bops, start_bops
        B.check_target(kind, target, low_bops, start)
    elif kind == "size":
        start = float(file_bytes)
        low, _ = B.reachable("size", probe, macs, overhead, start)
        info["reachable_file_bytes"] = [low, start]
        target = float(recipe.target_size)
        B.check_target(kind, target, low, start, size_floor=float(overhead))
    else:  # max_drop: a search in stages, one per evaluation; the evaluations decide how far is allowed
        start = start_bops
        evaluations = max(1, recipe.epochs // recipe.eval_every)
        target, ratio = B.max_drop_stages(start_bops, low_bops, evaluations)
        ramp = 0.5 / evaluations  # the first stage: reached within half of the steps to the first evaluation
    del probe
    ctrl = B.Controller(kind, target, start, steps, rates=recipe.budget_rates, ramp=ramp, every=recipe.budget_every)
    run = B.BudgetRun(ctrl, macs, size_overhead=overhead, max_drop=recipe.max_drop, is_main=is_main,
                      ratio=ratio, eval_every=recipe.eval_every)
    run.save_kwargs = save_kwargs  # type: ignore[attr-defined]  (finish() measures the metadata again)
    return run, info


def check_baseline(recipe, fp_top1: float | None, n_classes: int) -> None:
    """Refuse ``max_drop`` when the FP model's top-1 leaves nothing to keep (its floor is at or below chance)."""
    if recipe.max_drop is None or fp_top1 is None or n_classes < 2:
        return
    chance = 100.0 / n_classes
    if fp_top1 - recipe.max_drop <= chance:
        raise UsageError(f"--max-drop {recipe.max_drop:g}: the FP model's top-1 is {fp_top1:.2f}%, so the bound "
                         f"({fp_top1 - recipe.max_drop:.2f}%) is at or below chance ({chance:.2f}% for {n_classes} "
                         f"classes) and any model would meet it",
                         hint="start from trained weights (drop --no-pretrained, or pass --weights FILE), "
                              "or use --target-bops/--target-size")


def finish(run: B.BudgetRun | None, recipe, model: torch.nn.Module, macs: dict[str, int], info: dict,
           target: float | None = None, history: dict | None = None, remeasure: bool = True) -> dict:
    """After training: restore ``max_drop``'s best model, or trim to the target. Returns the summary's budget entry.

    ``history`` is the training history the checkpoint will hold: a size target
    measures the metadata with it, so the trim aims at the file as written;
    ``remeasure=False`` keeps ``run.size_overhead`` as it is (a retrim after saving).
    """
    if run is None:
        return {}
    from codeq_cli.train.trim import trim

    kind = run.c.kind
    out = {"kind": kind, **info}
    if kind == "max_drop":
        best = run.restore_best(model)
        out.update(max_drop=recipe.max_drop, met=best is not None, best_epoch=None if best is None else best["epoch"],
                   best_step=None if best is None else best["step"], achieved=B.rel_bops(model, macs))
        return out
    target = float(target if target is not None else (recipe.target_bops if kind == "bops" else recipe.target_size))
    if kind == "size" and remeasure and getattr(run, "save_kwargs", None) is not None:
        # Everything but the coded weights, as the trained model writes it (its history too), plus room for
        # the final metrics. Not the margin taken before training: that guessed the history and, kept, left
        # small files up to 2 kB under their target (measured: 57,831 B for 60 kB, 3.6% under).
        file_bytes, weight_bytes = _probe_save(model, {**run.save_kwargs, "history": history})
        run.size_overhead = file_bytes - weight_bytes + _METRICS_ROOM
    figure = (lambda: B.rel_bops(model, macs)) if kind == "bops" else (lambda: float(exact_size(model, run.size_overhead)))
    done = trim(model, macs, "bops" if kind == "bops" else "size", target, figure, tolerance=B.TOLERANCE)
    out.update(target=float(recipe.target_bops if kind == "bops" else recipe.target_size), before_trim=done["before"],
               achieved=done["after"], trim=done)
    return out


@torch.no_grad()
def exact_size(model: torch.nn.Module, overhead: int) -> int:
    """The checkpoint's size: every layer's codes entropy-coded as the writer does, plus the rest."""
    from codeq_cli.core.insert import quantized_weights
    from codeq_cli.formats import entropy

    coded = 0
    for qw in quantized_weights(model):
        coded += len(entropy.encode(qw.quantizer.encode(qw.original).codes.detach().cpu().reshape(-1).numpy()))
    return overhead + coded


def flat_metrics(entry: dict) -> dict:
    """The budget entry as the checkpoint's metrics hold it: plain numbers under ``budget_*`` keys."""
    if not entry:
        return {}
    # A file cannot state its own size stably (its metadata is compressed): a size budget's
    # achieved figure is the file's length, which `codeq report` reads from the file itself.
    out = {} if entry["kind"] == "size" else {"budget_achieved": float(entry["achieved"])}
    if entry["kind"] == "max_drop":
        out["budget_max_drop"] = float(entry["max_drop"])
        out["budget_best_epoch"] = entry["best_epoch"]
        return out
    out["budget_target_bops" if entry["kind"] == "bops" else "budget_target_size"] = float(entry["target"])
    out["budget_before_trim"] = float(entry["before_trim"])
    out["budget_trimmed_weights"] = int(entry["trim"]["weights_changed"])
    return out


def save_within(save, run: B.BudgetRun | None, recipe, model, macs, info: dict, entry: dict, metrics: dict) -> object:
    """``save()`` the checkpoint; for a size target, trim again (at most twice) while the file is too large.

    A retrim after the final evaluation is recorded (``budget_retrimmed``): the
    metadata margin makes it rare.
    """
    saved = save()
    if run is None or run.c.kind != "size":
        return saved
    for _ in range(2):
        excess = saved.file_bytes - recipe.target_size
        if excess <= 0:
            break
        run.size_overhead += excess  # the metadata grew more than the margin allowed
        entry.update(finish(run, recipe, model, macs, info, remeasure=False), retrimmed=True)
        metrics.update(flat_metrics(entry), budget_retrimmed=1)
        saved = save()
    entry["achieved"] = float(saved.file_bytes)  # the summary and --json give it; the file is its own length
    metrics["budget_achieved"] = int(saved.file_bytes)
    return saved


def bn_step(model: torch.nn.Module, recipe, entry: dict, fp_top1: float | None, measure, train_set, seed: int,
            info, workers: int) -> dict:
    """Batch-norm re-estimation of the final model, as the summary reports it (``{}`` when off or no BN).

    ``measure(model)`` gives validation top-1. Under ``max_drop`` the written model
    must stay within the bound it was chosen by: when the re-estimated statistics
    take top-1 below it, the trained ones are put back (``bn_kept: 0``).
    """
    from codeq_cli.train.distill import bn_buffers, has_batchnorm

    if recipe.bn_reestimate <= 0 or not has_batchnorm(model):
        return {}
    before = measure(model)
    trained = bn_buffers(model)
    seen = reestimate(model, recipe, train_set, seed, info, workers, recipe.amp)
    out = {"top1_before_bn": before, "bn_images": seen}
    if entry.get("kind") == "max_drop" and entry.get("met") and fp_top1 is not None:
        floor = fp_top1 - recipe.max_drop
        after = measure(model)
        if after < floor <= before:
            model.load_state_dict(trained, strict=False)
            out["bn_kept"] = 0
    return out


def reestimate(model: torch.nn.Module, recipe, train_set, seed: int, info, workers: int, amp: bool) -> int:
    """Batch-norm statistics of ``model`` from ``recipe.bn_reestimate`` training batches (0: off); images seen."""
    from codeq_cli.data.loader import build_loader
    from codeq_cli.data.sampling import GlobalBatchSampler
    from codeq_cli.train import dist
    from codeq_cli.train.distill import has_batchnorm, reestimate_bn
    from codeq_cli.train.accuracy import autocast_for

    if recipe.bn_reestimate <= 0 or not has_batchnorm(model):
        return 0
    sampler = GlobalBatchSampler(len(train_set), recipe.batch_size, seed, info.rank, info.world_size)
    sampler.set_epoch(recipe.epochs + 1_000_003)  # an epoch training never reaches: its own order
    loader = build_loader(train_set, batch_sampler=sampler, workers=workers, seed=seed)

    def batches():
        for i, batch in enumerate(loader):
            if i >= recipe.bn_reestimate:
                return
            yield batch

    def forward(mod, x):
        with autocast_for(info.device, amp):
            mod(x)

    seen = reestimate_bn(model, batches(), info.device, forward)
    dist.broadcast_buffers(model)
    return seen

"""The budget's stages around training (``docs/method.md``, "Compressing to a budget").

- :func:`plan_budget`: before anything is printed, a copy of the model with fresh
  quantizers gives the starting figure and the reachable range; an
  unreachable target is refused with one line naming the range. Returns the
  run's :class:`~codeq_cli.train.controller.BudgetRun`.
- :func:`check_baseline`: ``max_drop`` from a model at chance is refused.
- :func:`finish_budget`: after training, ``max_drop`` restores the most
  compressed model that met the bound; a target is trimmed to within
  tolerance (:mod:`codeq_cli.train.trim`).
- :func:`save_within`: writes the checkpoint; when a ``target_size`` is
  missed by the metadata written last, trims again and rewrites.
"""

from __future__ import annotations

import copy
import functools
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from codeq_cli.errors import UsageError
from codeq_cli.train.budget import BOPS_FIGURE, SIZE_FIGURE, TOLERANCE, Budget
from codeq_cli.train.controller import BudgetRun, Controller, max_drop_stages
from codeq_cli.train.measure import exact_size, reachable, rel_bops

_META_MARGIN = 2048  # bytes, before training: metrics and provenance written at the end, not in the probe
_METRICS_ROOM = 384  # bytes, after training: the final metrics (about 15 numbers; measured 154 B compressed)


@dataclass
class BudgetPlan:
    """A run's budget with its controller and the figures measured before training (the summary's ``budget``)."""

    budget: Budget
    run: BudgetRun
    start: dict = field(default_factory=dict)  # start_rel_bops, start_file_bytes, reachable_* (summary and --json)
    # the trim's saliency (codeq_cli.train.saliency), measured once when first asked; finish() sets it
    saliency: Callable[[], dict] | None = None


def total_steps(n_train: int, recipe, max_steps: int | None) -> int:
    """The number of optimizer steps :class:`~codeq_cli.train.loop.Fit` will take."""
    return max_steps if max_steps else recipe.epochs * (n_train // recipe.batch_size)


def _probe_save(model, save_kwargs: dict) -> tuple[int, int]:
    """``(file bytes, coded weight bytes)`` of the checkpoint ``model`` would give now."""
    from codeq_cli.formats import checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        info = checkpoint.save(Path(tmp) / "probe.pt", model, **save_kwargs)
    return info.file_bytes, info.weight_bytes


def plan_budget(recipe, model: torch.nn.Module, macs: dict[str, int], *, save_kwargs: dict, steps: int,
                is_main: bool) -> BudgetPlan | None:
    """The budget of this run, after checking it can be reached (``model`` is the FP model, not yet quantized)."""
    budget = recipe.budget
    if budget is None:
        return None
    if recipe.lambda_dz == 0 and (recipe.lambda_bit == 0 or not recipe.mixed):
        raise UsageError("a budget needs a penalty to steer: lambda_dz is 0",
                         hint="set lambda_dz > 0 (for example --set lambda_dz=0.05)")
    from codeq_cli.core.act_quant import act_bits, lowest_act_bits
    from codeq_cli.core.insert import quantize_
    from codeq_cli.train.recipe import quantizer_kwargs

    probe = copy.deepcopy(model)
    quantize_(probe, **quantizer_kwargs(recipe), include=recipe.include, exclude=recipe.exclude)
    file_bytes, weight_bytes = _probe_save(probe, save_kwargs)
    overhead = file_bytes - weight_bytes + _META_MARGIN
    # Activation quantizers are calibrated later: count them at the widths they start with, and
    # (learned, under a BOPs-counted budget the controller drives them) at the fewest they can reach.
    planned = act_bits(probe, planned=True)
    act_low = lowest_act_bits(probe) if budget.kind.figure.counts_activations else planned
    start_bops = rel_bops(probe, macs, planned)
    low_bops, _ = reachable(BOPS_FIGURE, probe, macs, overhead, start_bops, act_bits=planned, act_low=act_low)
    start = {"kind": budget.kind.name, "start_rel_bops": start_bops, "start_file_bytes": file_bytes,
             "reachable_rel_bops": [low_bops, start_bops]}
    ramp, ratio = recipe.budget_ramp, None
    if budget.kind.searches:  # a search in stages, one per evaluation; the evaluations decide how far is allowed
        begin = start_bops
        evaluations = max(1, recipe.epochs // recipe.eval_every)
        target, ratio = max_drop_stages(start_bops, low_bops, evaluations)
        ramp = 0.5 / evaluations  # the first stage: reached within half of the steps to the first evaluation
    elif budget.kind.figure is SIZE_FIGURE:
        begin = float(file_bytes)
        low, _ = reachable(SIZE_FIGURE, probe, macs, overhead, begin)
        start["reachable_file_bytes"] = [low, begin]
        target = budget.value
        budget.check_reachable(low, begin, size_floor=float(overhead))
    else:
        target, begin = budget.value, start_bops
        budget.check_reachable(low_bops, begin)
    del probe
    ctrl = Controller(budget.kind, target, begin, steps, rates=recipe.budget_rates, ramp=ramp, every=recipe.budget_every,
                      schedule="geometric" if budget.kind.searches else recipe.budget_schedule)
    run = BudgetRun(ctrl, macs, size_overhead=overhead, max_drop=recipe.max_drop, is_main=is_main,
                    ratio=ratio, eval_every=recipe.eval_every, save_kwargs=save_kwargs)
    return BudgetPlan(budget, run, start)


def check_baseline(budget: Budget | None, fp_top1: float | None, n_classes: int) -> None:
    """Refuse ``max_drop`` when the FP model's top-1 leaves nothing to keep (its floor is at or below chance)."""
    if budget is None or not budget.kind.searches or fp_top1 is None or n_classes < 2:
        return
    chance = 100.0 / n_classes
    if fp_top1 - budget.value <= chance:
        raise UsageError(f"{budget.kind.shown(budget.value)}: the FP model's top-1 is {fp_top1:.2f}%, so the bound "
                         f"({fp_top1 - budget.value:.2f}%) is at or below chance ({chance:.2f}% for {n_classes} "
                         f"classes) and any model would meet it",
                         hint="start from trained weights (drop --no-pretrained, or pass --weights FILE), "
                              "or use --target-bops/--target-size")


def finish_budget(plan: BudgetPlan | None, model: torch.nn.Module, history: dict | None = None,
                  remeasure: bool = True) -> dict:
    """After training: restore ``max_drop``'s best model, or trim to the target. Returns the summary's budget entry.

    ``history`` is the training history the checkpoint will hold: a size target
    measures the metadata with it, so the trim aims at the file as written;
    ``remeasure=False`` keeps ``run.size_overhead`` as it is (a retrim after saving).
    """
    if plan is None:
        return {}
    from codeq_cli.train.trim import trim

    budget, run, macs = plan.budget, plan.run, plan.run.macs
    out = {"kind": budget.kind.name, **plan.start}
    if budget.kind.searches:
        best = run.restore_best(model)
        out.update(max_drop=budget.value, met=best is not None, best_epoch=None if best is None else best["epoch"],
                   best_step=None if best is None else best["step"], achieved=rel_bops(model, macs))
        return out
    figure_of = budget.kind.figure
    if figure_of is SIZE_FIGURE and remeasure and run.save_kwargs is not None:
        # Everything but the coded weights, as the trained model writes it (its history too), plus room for
        # the final metrics. Not the margin taken before training: that guessed the history and, kept, left
        # small files up to 2 kB under their target (measured: 57,831 B for 60 kB, 3.6% under).
        file_bytes, weight_bytes = _probe_save(model, {**run.save_kwargs, "history": history})
        run.size_overhead = file_bytes - weight_bytes + _METRICS_ROOM
    figure: Callable[[], float] = ((lambda: rel_bops(model, macs)) if figure_of is BOPS_FIGURE
                                   else (lambda: float(exact_size(model, run.size_overhead))))
    done = trim(model, macs, figure_of, budget.value, figure, tolerance=TOLERANCE, saliency=plan.saliency)
    out.update(target=budget.value, before_trim=done["before"], achieved=done["after"], trim=done)
    return out


_RETRIM_SLACK = 64  # bytes


def save_within(save: Callable[[], object], plan: BudgetPlan | None, model, entry: dict, metrics: dict) -> object:
    """``save()`` the checkpoint; for a size target, trim again (at most three times) while the file is too large.

    A retrim after the final evaluation is recorded (``budget_retrimmed``): the
    metadata margin makes it rare.
    """
    saved = save()
    if plan is None or not plan.budget.kind.measures_file:
        return saved
    for _ in range(3):
        excess = saved.file_bytes - plan.budget.value
        if excess <= 0:
            break
        # the metadata grew more than the margin allowed; the slack covers the few bytes by which the
        # trim's estimate and the entropy-coded file differ, and the retrim's own figures in the metadata
        plan.run.size_overhead += excess + _RETRIM_SLACK
        entry.update(finish_budget(plan, model, remeasure=False), retrimmed=True)
        metrics.update(plan.budget.flat_metrics(entry), budget_retrimmed=1)
        saved = save()
    entry["achieved"] = float(saved.file_bytes)  # the summary and --json give it; the file is its own length
    metrics["budget_achieved"] = int(saved.file_bytes)
    return saved


# -- the stages after training: finish to the budget, evaluate what ships, write ---------------------------
@dataclass
class Finished:
    """The model as it will be written, with the figures the summary and the checkpoint hold."""

    model: torch.nn.Module  # plain (not DDP), quantized
    entry: dict  # the summary's budget entry ({} without a budget)
    metrics: dict  # the checkpoint's metrics
    totals: dict  # BOPs totals (codeq_cli.core.bops.bops_totals) at the final evaluation
    history: dict | None  # the thinned training history the checkpoint carries


def decoded_model(model: torch.nn.Module, spec, ctx) -> torch.nn.Module:
    """What ships: a fresh model with the quantized weights baked in and the activation quantizers frozen."""
    from codeq_cli.core import act_quant
    from codeq_cli.core.insert import dequantized_state_dict
    from codeq_cli.models.factory import create

    decoded = create(spec)
    decoded.load_state_dict(dequantized_state_dict(model))
    act_quant.freeze_into(decoded, act_quant.frozen_entries(model))
    decoded.to(ctx.device)
    if ctx.recipe.channels_last and ctx.device.type == "cuda":
        decoded.to(memory_format=torch.channels_last)
    return decoded


def finish(model: torch.nn.Module, ctx, plan: BudgetPlan | None, *, spec, macs: dict[str, int], run_dir: Path,
           fp_top1: float | None, distilled: bool) -> Finished:
    """The budget's last word (max_drop's best model, or the trim), batch-norm statistics, then the decoded model's accuracy."""
    from codeq_cli.core.bops import bops_rows, bops_totals
    from codeq_cli.formats.history import from_log
    from codeq_cli.train.bn import bn_step

    history = from_log(run_dir / "metrics.jsonl")  # complete: only training writes the log
    if plan is not None and plan.saliency is None:
        from codeq_cli.train.saliency import fisher

        plan.saliency = functools.cache(lambda: fisher(model, ctx))  # a retrim of the size reuses it
    entry = finish_budget(plan, model, history=history)
    bn = bn_step(model, ctx, None if plan is None else plan.budget, bool(entry.get("met")), fp_top1)
    totals = bops_totals(bops_rows(model, macs))
    final = ctx.evaluate(decoded_model(model, spec, ctx))
    metrics = {"top1": final.top1, "top5": final.top5, "val_samples": final.samples, "fp_top1": fp_top1}
    if fp_top1 is not None:
        metrics["top1_drop"] = fp_top1 - final.top1
    metrics.update(bn)
    metrics["distill_weight_used"] = ctx.recipe.distill_weight if distilled else 0.0
    if plan is not None:
        metrics.update(plan.budget.flat_metrics(entry))
    return Finished(model, entry, metrics, totals, history)


def write(out: Path, finished: Finished, plan: BudgetPlan | None, save_kwargs: Callable[[], dict]):
    """Write the checkpoint atomically (within a size target, :func:`save_within`); what :func:`checkpoint.save` returned.

    ``save_kwargs()`` gives the checkpoint's description (spec, data config,
    classes, recipe, provenance, MACs, data folder), asked anew at each write.
    """
    from codeq_cli.formats import checkpoint

    def save():
        return checkpoint.save(out, finished.model, **{**save_kwargs(), "metrics": finished.metrics,
                                                       "history": finished.history})

    saved = save_within(save, plan, finished.model, finished.entry, finished.metrics)
    if finished.entry.get("retrimmed"):  # only a retrim moves the codes after finish() counted them
        from codeq_cli.core.bops import bops_rows, bops_totals

        finished.totals = bops_totals(bops_rows(finished.model, save_kwargs()["macs"]))
    return saved

"""``codeq compress``: the whole job, from a model name to a compressed checkpoint.

:func:`run` strings the stages together (``docs/architecture.md``, "The run"),
each owned by the layer where its idea lives:

    resolve the plan → load the model → build the data → plan the budget →
    FP baseline → insert quantizers → fit → finish to the budget → write

Only rank 0 writes files. The CLI builds :class:`CompressOptions` and renders
the events; nothing here touches the terminal.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from codeq_cli.commands._stages import default_run_dir  # noqa: F401  (re-exported: where a run's folder goes)

log = logging.getLogger(__name__)


@dataclass
class CompressOptions:
    model: str
    data: Path
    recipe: str = "mixed"
    overrides: list[str] = field(default_factory=list)
    out: Path = Path("out.pt")
    run_dir: Path | None = None
    weights: Path | None = None
    pretrained: bool = True
    num_classes: int | None = None
    img_size: int | None = None
    batch_size: int | None = None
    workers: int | None = None  # None: default_workers(), the machine's CPUs up to 4
    subset: str | None = None
    epochs: int | None = None
    max_steps: int | None = None
    device: str | None = None
    seed: int = 0
    skip_baseline: bool = False
    resume: bool = False
    overwrite: bool = False
    force: bool = False
    compile: bool = False
    save_every: float = 600.0
    log_every: int = 20
    target_bops: float | None = None  # the budget flags: recipe keys of the same names
    target_size: str | None = None
    max_drop: float | None = None
    keep_state: bool = False  # keep run_dir/state.pt once the checkpoint is written
    advise: bool = True  # warn before an aggressive BOPs target (train.advice); the demo's is measured
    # Preprocessing (None: the recipe's, else the model's data config); they become recipe overrides.
    crop_pct: float | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    interpolation: str | None = None


@dataclass
class CompressResult:
    out: Path
    run_dir: Path
    model: str
    metrics: dict
    totals: dict
    file_bytes: int
    seconds: float
    resumed_from_step: int | None = None
    budget: dict = field(default_factory=dict)  # target, achieved, trim or max_drop's epoch (docs/method.md)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out"], d["run_dir"] = str(self.out), str(self.run_dir)
        return d




def run(opts: CompressOptions, on_event=lambda e: None, should_stop=lambda: False) -> CompressResult:
    """Compress ``opts.model`` as ``opts`` say; returns where the result went and its figures."""
    from codeq_cli.commands import _stages as P
    from codeq_cli.formats import runstate
    from codeq_cli.train import dist, finish as F, loop, precision, prepare
    from codeq_cli.train.advice import budget_warning
    from codeq_cli.train.context import RunContext

    t0 = time.monotonic()
    plan = P.resolve_plan(opts)
    opts, info, recipe = plan.opts, plan.info, plan.recipe
    loaded = P.load(plan)
    data = P.build_data(plan, loaded)
    loaded = P.measured(plan, loaded)  # MACs from a first forward: a bad input size is refused before any wait
    describe = P.checkpoint_description(plan, loaded, data)  # what the checkpoint says of itself, probe and final
    steps = F.total_steps(len(data.train_set), recipe, opts.max_steps)
    budget = F.plan_budget(recipe, loaded.model, loaded.macs, save_kwargs=describe(), steps=steps, is_main=info.is_main)
    teacher = P.teacher(plan, loaded)
    state, fingerprint = P.resume_state(plan, loaded, data)
    arithmetic, amp_note = precision.resolve(recipe.amp, recipe.channels_last, info.device)
    ctx = RunContext(recipe, info, data.train_set, data.val_set, opts.seed, opts.workers, arithmetic)
    _report_setup(on_event, plan, loaded, data, state, amp_note)
    if opts.advise and state is None and (warning := budget_warning(recipe, steps)) is not None:  # docs/method.md, "Aggressive budgets"
        on_event({"event": "note", "text": f"warning: {warning}"})

    progress = runstate.progress_from_state(state) if state is not None else runstate.RunPosition()
    if not opts.skip_baseline and state is None:
        res = ctx.evaluate(loaded.model)  # FP baseline, before any quantizer
        progress.fp_top1 = res.top1
        on_event({"event": "baseline", **res.to_dict()})
    if state is None:
        F.check_baseline(plan.budget, progress.fp_top1, len(data.classes))
    if budget is not None:
        budget.run.fp_top1 = progress.fp_top1

    wrapped = prepare.insert_quantizers(loaded.model, ctx)
    on_event({"event": "quantized", "layers": len(wrapped)})
    if recipe.act_bits is not None and state is None:
        n = prepare.calibrate_activations(loaded.model, ctx)
        on_event({"event": "note", "text": f"activation quantizers initialised from {n} batches"})
    if state is not None:
        P.restore(loaded, state, plan, on_event, progress)
    net = prepare.training_module(loaded.model, ctx, opts.compile)
    setup = P.fit_setup(net, ctx, plan, loaded, fingerprint=fingerprint, budget=budget, teacher=teacher,
                        on_event=on_event, should_stop=should_stop)
    resumed_from = progress.step if state is not None else None
    progress = loop.Fit(setup, progress, state).run()

    done = F.finish(dist.unwrap(net), ctx, budget, spec=loaded.source.spec, macs=loaded.macs, run_dir=plan.run_dir,
                    fp_top1=progress.fp_top1, distilled=teacher is not None)
    _report_finish(on_event, done, data)
    file_bytes = 0
    if info.is_main:
        saved = F.write(opts.out, done, budget, lambda: describe(progress.step, arithmetic))
        file_bytes = saved.file_bytes
        P.write_summary(plan, done, data, _result(plan, loaded, done, saved.file_bytes, t0, resumed_from))
    dist.barrier()
    return _result(plan, loaded, done, file_bytes, t0, resumed_from)


def _result(plan, loaded, done, file_bytes: int, t0: float, resumed_from: int | None) -> CompressResult:
    return CompressResult(plan.opts.out, plan.run_dir, loaded.source.spec.label, done.metrics, done.totals, file_bytes,
                          time.monotonic() - t0, resumed_from, done.entry)


def _report_setup(on_event, plan, loaded, data, state, amp_note) -> None:
    """Everything the user gave is checked: from here on, report progress (a mistake before this
    point is one error line with nothing printed before it)."""
    source = loaded.source
    for note in [*source.notes, *([amp_note] if amp_note else [])]:
        on_event({"event": "note", "text": note})
    on_event({"event": "data", "train": len(data.train_set), "val": len(data.val_set), "classes": len(data.classes),
              "input_size": list(source.data.input_size), "crop_pct": source.data.crop_pct,
              "interpolation": source.data.interpolation})
    # What this run is, for whoever records it (tracking backends): the resolved recipe and where it writes.
    on_event({"event": "plan", "model": source.spec.label, "recipe": plan.recipe.to_dict(), "run_dir": str(plan.run_dir),
              "out": str(plan.opts.out), "seed": plan.opts.seed, "resumed": state is not None})


def _report_finish(on_event, done, data) -> None:
    if done.entry:
        on_event({"event": "budget", **done.entry})
    on_event({"event": "final", **done.metrics, **{k: done.totals[k] for k in ("sparsity", "avg_bits", "rel_bops")}})
    for ds in (data.train_set, data.val_set):
        if ds.stats.skipped or ds.stats.ignored:
            on_event({"event": "note", "text": ds.stats.summary()})

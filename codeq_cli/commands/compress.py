"""``codeq compress``: the whole job, from a model name to a compressed checkpoint.

Reads top to bottom: distributed init → recipe → model → data → FP baseline →
MACs → quantizers → resume → fit → evaluate the decoded model → write the
checkpoint. Only rank 0 writes files. The CLI builds :class:`CompressOptions`
and renders the events; nothing here touches the terminal.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from codeq_cli.formats import runstate
from codeq_cli.train import dist
from codeq_cli._version import __version__
from codeq_cli.errors import UsageError, one_line

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


def default_run_dir(out: Path) -> Path:
    """``out.pt`` → ``out.run/``."""
    return out.with_name(out.stem + ".run") if out.suffix else out.with_name(out.name + ".run")


def resolve_recipe(opts: CompressOptions):
    from codeq_cli.train.recipe import apply_overrides, load_recipe

    recipe = apply_overrides(load_recipe(opts.recipe), opts.overrides)
    if opts.batch_size is not None:
        recipe = apply_overrides(recipe, [f"batch_size={opts.batch_size}"], origin="--batch-size")
    if opts.epochs is not None:
        recipe = apply_overrides(recipe, [f"epochs={opts.epochs}"], origin="--epochs")
    for key in ("target_bops", "target_size", "max_drop"):
        value = getattr(opts, key)
        if value is not None:
            recipe = apply_overrides(recipe, [f"{key}={value}"], origin="--" + key.replace("_", "-"))
    return with_preprocessing_flags(recipe, opts)


def with_preprocessing_flags(recipe, opts):
    """``recipe`` with ``--crop-pct/--mean/--std/--interpolation`` applied, validated as recipe keys."""
    from codeq_cli.train.recipe import apply_overrides

    for key in PREPROCESSING:
        value = getattr(opts, key)
        if value is not None:
            text = f"[{', '.join(repr(float(x)) for x in value)}]" if isinstance(value, (list, tuple)) else repr(value)
            recipe = apply_overrides(recipe, [f"{key}={text}"], origin=f"--{key.replace('_', '-')}")
    return recipe


PREPROCESSING = ("crop_pct", "mean", "std", "interpolation")  # options and recipe keys of the same name


def chosen_preprocessing(data_config, recipe):
    """The model's data config with the preprocessing the recipe (or its flags) chose."""
    return data_config.with_preprocessing(**{k: getattr(recipe, k) for k in PREPROCESSING})


def _check_paths(opts: CompressOptions, run_dir: Path) -> None:
    if opts.out.exists() and opts.out.is_dir():
        raise UsageError(f"--out {str(opts.out)!r} is a folder", hint="give a file path such as out.pt")
    if not opts.out.parent.exists():
        raise UsageError(f"the folder of --out {str(opts.out)!r} does not exist", hint="create it first")
    if not opts.out.parent.is_dir():
        raise UsageError(f"--out {str(opts.out)!r}: {str(opts.out.parent)!r} is a file, not a folder",
                         hint="choose an --out path in a folder")
    # Try it (os.access says yes to root, and on read-only or special file systems):
    # finding out after hours of training that the result cannot be written loses the run.
    try:
        with tempfile.TemporaryFile(dir=opts.out.parent):
            pass
    except OSError as exc:
        raise UsageError(f"--out {str(opts.out)!r}: cannot write to {str(opts.out.parent)!r} ({exc.strerror or exc})",
                         hint="choose an --out path in a folder you can write to") from None
    state = run_dir / runstate.STATE_FILE
    if opts.resume:
        if not state.exists():
            raise UsageError(f"--resume: no run state in {str(run_dir)!r}", hint="start without --resume (or pass --run-dir)")
        return
    if opts.out.exists() and not opts.overwrite:
        raise UsageError(f"{str(opts.out)!r} exists", hint="pass --overwrite to replace it, or choose another --out")
    if state.exists() and not opts.overwrite:
        raise UsageError(
            f"an interrupted run is saved in {str(run_dir)!r}",
            hint="pass --resume to continue it or --overwrite to start over",
        )


def _make_run_dir(run_dir: Path, out: Path) -> None:
    from codeq_cli._io import remove_stale_temps

    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the run folder {str(run_dir)!r} ({exc.strerror or exc})",
                         hint="pass --run-dir in a folder you can write to") from None
    for path in (run_dir / runstate.STATE_FILE, out):  # temporary files of a run killed while saving
        remove_stale_temps(path)


def _first_forward(model: torch.nn.Module, input_size, opts: CompressOptions, spec) -> dict[str, int]:
    """The MACs pass, the model's first forward: an input size it cannot take is a usage error, said once."""
    from codeq_cli.core.bops import measure_macs
    from codeq_cli.models.factory import data_config

    try:
        return measure_macs(model, input_size)
    except (torch.cuda.OutOfMemoryError, MemoryError):
        raise
    except Exception as exc:
        size = "x".join(str(int(d)) for d in input_size[1:])
        why = one_line(str(exc).rstrip().rstrip(".") or type(exc).__name__)
        if opts.img_size is None:
            raise UsageError(f"{spec.label} fails on its own input size {size} ({type(exc).__name__}: {why})",
                             hint="pass --img-size N with a size the model accepts") from exc
        native = "x".join(str(d) for d in data_config(model, spec).input_size[1:])
        raise UsageError(f"--img-size {opts.img_size}: {spec.label} cannot take {size} inputs ({type(exc).__name__}: {why})",
                         hint=f"choose another --img-size (the model's own input size is {native}) or leave it out") from exc


def _load_run_state(model: torch.nn.Module, state: dict, run_dir: Path, label: str) -> None:
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise UsageError(  # load_state_dict's second line names the first key that does not fit
            f"--resume: the run state in {str(run_dir)!r} does not fit {label} as now configured ({one_line(exc, line=1)})",
            hint="--force resumes only changes that keep the layers and quantizers (lr, epochs, λ); "
            "start over with --overwrite",
        ) from None


def _check_classes(model_classes: int | None, data_classes: int, opts: CompressOptions, label: str) -> None:
    if opts.num_classes is not None and opts.num_classes != data_classes:
        raise UsageError(
            f"--num-classes {opts.num_classes} does not match the {data_classes} class folders in {str(opts.data)!r}",
            hint=f"pass --num-classes {data_classes}",
        )
    if opts.num_classes is None and model_classes is not None and model_classes != data_classes:
        raise UsageError(
            f"the data has {data_classes} classes but {label} has {model_classes} outputs",
            hint=f"pass --num-classes {data_classes} to train a new head",
        )


def provenance(info: dist.DistInfo, seed: int, steps: int, weights: str, arithmetic=None) -> dict:
    import timm
    import torchvision

    return {
        "codeq": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "seed": seed,
        "steps": steps,
        "world_size": info.world_size,
        "device": info.device.type,
        "weights": weights,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **(arithmetic.to_provenance() if arithmetic is not None else {}),  # what `codeq eval` repeats
    }


def _fingerprint(opts: CompressOptions, spec, recipe, classes: list[str]) -> dict:
    return {
        "model": spec.to_dict(),
        "recipe": recipe.to_dict(),
        "classes": classes,
        "img_size": opts.img_size,
        "seed": opts.seed,
        "weights": str(opts.weights) if opts.weights else ("pretrained" if opts.pretrained else "random"),
    }


def _differences(old: dict, new: dict) -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{d}" for d in _differences(a, b)]
        elif a != b:
            out.append(f"{key} ({a!r} → {b!r})" if not isinstance(a, (list, dict)) else key)
    return out


CALIBRATION_BATCHES = 4


def _calibrate_activations(model, train_set, recipe, opts: CompressOptions, info, on_event) -> None:
    """Initialise the activation quantizers once, before training, from the first global batches.

    Every rank reads the same whole global batches (epoch 0's order, its
    augmentations), so all compute the same steps; DDP then starts from rank 0's.
    """
    from codeq_cli.core.act_quant import calibrate_
    from codeq_cli.data.loader import build_loader
    from codeq_cli.data.sampling import GlobalBatchSampler

    sampler = GlobalBatchSampler(len(train_set), recipe.batch_size, opts.seed)
    loader = build_loader(train_set, batch_sampler=sampler, workers=0, seed=opts.seed)

    def batches():
        for i, (images, _) in enumerate(loader):
            if i >= CALIBRATION_BATCHES:
                return
            if images.numel():
                yield images.to(info.device)

    n = calibrate_(model, batches())
    on_event({"event": "note", "text": f"activation quantizers initialised from {n} batches"})


def run(opts: CompressOptions, on_event=lambda e: None, should_stop=lambda: False) -> CompressResult:
    """Compress ``opts.model`` as ``opts`` say; returns where the result went and its figures."""
    from codeq_cli.formats import checkpoint
    from codeq_cli.train import accuracy, loop, precision
    from codeq_cli.train._compile import check_compile
    from codeq_cli._io import write_json, write_text
    from codeq_cli.core.bops import bops_rows, bops_totals
    from codeq_cli.data.folders import build_datasets, check_root, class_folders, parse_subset
    from codeq_cli.data.loader import default_workers
    from codeq_cli.core import act_quant
    from codeq_cli.core.insert import dequantized_state_dict, quantize_
    from codeq_cli.models.factory import create, load_model, num_outputs
    from codeq_cli.train.recipe import quantizer_kwargs, recipe_to_yaml
    from codeq_cli.train.distill import make_teacher
    from codeq_cli.commands import _budget

    t0 = time.monotonic()
    info = dist.init(opts.device)
    torch.manual_seed(opts.seed)
    run_dir = opts.run_dir or default_run_dir(opts.out)
    recipe = resolve_recipe(opts)
    if recipe.batch_size % info.world_size:
        raise UsageError(
            f"batch_size {recipe.batch_size} does not split over {info.world_size} processes",
            hint=f"use a multiple of {info.world_size} (the recipe's batch size is global)",
        )
    dist.check_sync_bn(info, recipe.sync_bn)
    if opts.compile:
        check_compile(info)
    refusal = None
    if info.is_main:
        try:
            _check_paths(opts, run_dir)
            _make_run_dir(run_dir, opts.out)
        except UsageError as exc:
            refusal = exc
    # Every rank stops on rank 0's refusal (the others would wait for it forever).
    refusal = dist.broadcast_object(None if refusal is None else (refusal.message, refusal.hint))
    if refusal is not None:
        raise UsageError(refusal[0], hint=refusal[1])

    # --data and --subset are cheap to check: a typo should not wait for a model download.
    root = check_root(opts.data)
    if opts.workers is None:
        opts = replace(opts, workers=default_workers())
    parse_subset(opts.subset)

    # Model and data: the data config follows the model.
    loaded = load_model(
        opts.model, weights=opts.weights, pretrained=opts.pretrained, num_classes=opts.num_classes, img_size=opts.img_size,
        data_classes=len(class_folders(root)),
    )
    model, spec = loaded.model, loaded.spec
    loaded.data = chosen_preprocessing(loaded.data, recipe)  # used for training and evaluation, stored in the checkpoint
    train_set, val_set, classes = build_datasets(
        opts.data, loaded.data, subset=opts.subset, seed=opts.seed, crop_scale=recipe.crop_scale, hflip=recipe.hflip
    )
    _check_classes(num_outputs(model), len(classes), opts, spec.label)
    if len(train_set) < recipe.batch_size:
        raise UsageError(
            f"batch_size {recipe.batch_size} is larger than the {len(train_set)} training images",
            hint=f"pass --batch-size {max(1, len(train_set))} or fewer",
        )
    model.to(info.device)
    macs = _first_forward(model, loaded.data.input_size, opts, spec)  # before the baseline: no time lost on a bad size
    # A budget that cannot be reached is refused here, before anything is printed.
    save_kwargs = dict(spec=spec, data_config=loaded.data, class_names=classes, recipe=recipe.to_dict(),
                       provenance=provenance(info, opts.seed, 0, loaded.weights), metrics={}, macs=macs,
                       data_dir=str(Path(opts.data).resolve()))
    budget, budget_info = _budget.prepare(recipe, model, macs, save_kwargs,
                                          _budget.total_steps(len(train_set), recipe, opts.max_steps),
                                          opts.skip_baseline, opts.resume, info.is_main)
    from_weights = opts.weights is not None or opts.pretrained
    teacher = make_teacher(model) if recipe.distill_weight > 0 and from_weights else None
    state = None
    if opts.resume:
        state = runstate.load_state(run_dir / runstate.STATE_FILE)
    fingerprint = _fingerprint(opts, spec, recipe, classes)
    if state is not None:
        old = json.loads(state["fingerprint"])
        diff = _differences(old, fingerprint)
        if diff and not opts.force:
            raise UsageError(
                f"--resume: the saved run differs in {', '.join(diff[:4])}",
                hint="resume with the same model, recipe and data, or pass --force",
            )
    # Everything the user gave is checked: from here on, report progress (a
    # mistake above is one error line with nothing printed before it).
    arithmetic, amp_note = precision.resolve(recipe.amp, recipe.channels_last, info.device)
    for note in [*loaded.notes, *([amp_note] if amp_note else [])]:
        on_event({"event": "note", "text": note})
    on_event({"event": "data", "train": len(train_set), "val": len(val_set), "classes": len(classes),
              "input_size": list(loaded.data.input_size), "crop_pct": loaded.data.crop_pct,
              "interpolation": loaded.data.interpolation})
    # What this run is, for whoever records it (tracking backends): the resolved recipe and where it writes.
    on_event({"event": "plan", "model": spec.label, "recipe": recipe.to_dict(), "run_dir": str(run_dir),
              "out": str(opts.out), "seed": opts.seed, "resumed": state is not None})

    # FP baseline, before any quantizer.
    progress = runstate.progress_from_state(state) if state is not None else runstate.RunPosition()
    if not opts.skip_baseline and state is None:
        loader = accuracy.eval_loader(val_set, recipe.batch_size, info, opts.workers, info.device)
        res = accuracy.measure_accuracy(model, loader, info.device, amp=recipe.amp)
        progress.fp_top1 = res.top1
        on_event({"event": "baseline", **res.to_dict()})
    if state is None:
        _budget.check_baseline(recipe, progress.fp_top1, len(classes))
    if budget is not None:
        budget.fp_top1 = progress.fp_top1

    wrapped = quantize_(model, **quantizer_kwargs(recipe), include=recipe.include, exclude=recipe.exclude)
    if not wrapped:
        raise UsageError("no layer was quantized", hint="check the recipe's include/exclude patterns")
    model.to(info.device)
    on_event({"event": "quantized", "layers": len(wrapped)})

    if recipe.act_bits is not None and state is None:
        _calibrate_activations(model, train_set, recipe, opts, info, on_event)
    if state is not None:
        _load_run_state(model, state, run_dir, spec.label)
        if not runstate.restore_rng_state(state, info.rank, info.world_size, info.device):
            on_event({"event": "note", "text": f"the run state was saved by {state.get('world_size', 1)} processes: "
                      "every process resumes with rank 0's random generators (dropout masks differ from an "
                      "uninterrupted run)"})
        on_event({"event": "resumed", "step": progress.step, "epoch": progress.epoch})
    if recipe.channels_last and info.device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    net = dist.wrap(model, info, sync_bn=recipe.sync_bn)
    if opts.compile:
        try:
            net = torch.compile(net)
        except Exception as exc:  # e.g. no dynamo on this Python; failures while compiling come at the first step
            raise UsageError(f"--compile: torch.compile is not available here ({one_line(exc)})",
                             hint="run without --compile") from exc

    setup = loop.FitSetup(
        model=net, recipe=recipe, train_set=train_set, val_set=val_set, device=info.device,
        info=info, run_dir=run_dir, macs=macs, seed=opts.seed, workers=opts.workers, max_steps=opts.max_steps,
        log_every=opts.log_every, save_every_s=opts.save_every, fingerprint=fingerprint,
        on_event=on_event, should_stop=should_stop,
        debug_stop_after=int(os.environ.get("CODEQ_DEBUG_STOP_AFTER", "0") or 0),
        debug_dump_dir=Path(os.environ["CODEQ_DEBUG_DUMP_DIR"]) if os.environ.get("CODEQ_DEBUG_DUMP_DIR") else None,
        budget=budget, teacher=teacher,
    )
    if info.is_main and state is None:
        write_text(run_dir / "recipe.yaml", recipe_to_yaml(recipe))
    fit = loop.Fit(setup, progress, state)
    resumed_from = progress.step if state is not None else None
    progress = fit.run()

    # The budget's last word (max_drop's best model, or the trim), then batch-norm statistics for it.
    plain = dist.unwrap(net)
    teacher = None
    from codeq_cli.formats.history import from_log

    history = from_log(run_dir / "metrics.jsonl")  # complete: only training writes the log
    budget_entry = _budget.finish(budget, recipe, plain, macs, budget_info, history=history)
    for ev in ([{"event": "budget", **budget_entry}] if budget_entry else []):
        on_event(ev)

    def val_top1(mod) -> float:
        loader = accuracy.eval_loader(val_set, recipe.batch_size, info, opts.workers, info.device)
        return accuracy.measure_accuracy(mod, loader, info.device, amp=recipe.amp, channels_last=recipe.channels_last).top1

    bn_entry = _budget.bn_step(plain, recipe, budget_entry, progress.fp_top1, val_top1, train_set, opts.seed, info,
                               opts.workers)

    # Evaluate what ships: the decoded model (quantized weights baked in).
    rows = bops_rows(plain, macs)
    totals = bops_totals(rows)
    decoded = create(spec)
    decoded.load_state_dict(dequantized_state_dict(plain))
    act_quant.freeze_into(decoded, act_quant.frozen_entries(plain))  # activation quantizers, as shipped
    decoded.to(info.device)
    if recipe.channels_last and info.device.type == "cuda":
        decoded.to(memory_format=torch.channels_last)
    loader = accuracy.eval_loader(val_set, recipe.batch_size, info, opts.workers, info.device)
    final = accuracy.measure_accuracy(decoded, loader, info.device, arithmetic=arithmetic)
    metrics = {"top1": final.top1, "top5": final.top5, "val_samples": final.samples, "fp_top1": progress.fp_top1}
    if progress.fp_top1 is not None:
        metrics["top1_drop"] = progress.fp_top1 - final.top1
    metrics.update(bn_entry)
    metrics["distill_weight_used"] = recipe.distill_weight if setup.teacher is not None else 0.0
    metrics.update(_budget.flat_metrics(budget_entry))
    on_event({"event": "final", **metrics, **{k: totals[k] for k in ("sparsity", "avg_bits", "rel_bops")}})
    for ds in (train_set, val_set):
        if ds.stats.skipped or ds.stats.ignored:
            on_event({"event": "note", "text": ds.stats.summary()})

    file_bytes = 0
    if info.is_main:

        def save():
            return checkpoint.save(
                opts.out, plain, spec=spec, data_config=loaded.data, class_names=classes, recipe=recipe.to_dict(),
                provenance=provenance(info, opts.seed, progress.step, loaded.weights, arithmetic), metrics=metrics,
                macs=macs, data_dir=str(Path(opts.data).resolve()), history=history,
            )

        saved = _budget.save_within(save, budget, recipe, plain, macs, budget_info, budget_entry, metrics)
        totals = bops_totals(bops_rows(plain, macs))
        file_bytes = saved.file_bytes
        result = CompressResult(opts.out, run_dir, spec.label, metrics, totals, file_bytes,
                                time.monotonic() - t0, resumed_from, budget_entry)
        write_json(run_dir / "summary.json", {**result.to_dict(), "data": {
            "train": train_set.stats.to_dict(), "val": val_set.stats.to_dict()}})
        if not opts.keep_state:  # the checkpoint is written: the resumable state has no further use
            runstate.discard_state(run_dir)
    dist.barrier()
    return CompressResult(opts.out, run_dir, spec.label, metrics, totals, file_bytes, time.monotonic() - t0, resumed_from,
                          budget_entry)

"""The stages of ``codeq compress`` that are about the user's options, and the glue between the others.

The user's options become a plan, a model and data; each of these stages
checks what the user gave before anything is printed, so a mistake is one
error line (``docs/cli.md``). Only rank 0 touches the output paths; every rank
stops on its refusal. The stages that are about the method live in
``train/`` (:mod:`~codeq_cli.train.prepare`, :mod:`~codeq_cli.train.loop`,
:mod:`~codeq_cli.train.finish`); ``docs/architecture.md``, "The run", draws them all.

- :func:`resolve_plan`: options → :class:`Plan` (the recipe with the flags applied, the run folder, the budget);
- :func:`load`: the model, its data config and MACs (:class:`Loaded`); an input size it cannot take is refused;
- :func:`build_data`: the image folders (:class:`Data`), checked against the model's outputs and the batch size;
- :func:`resume_state`: the saved run state, when resuming, checked against this run's fingerprint;
  :func:`restore` puts it in place once the quantizers are;
- :func:`checkpoint_description`, :func:`teacher`, :func:`fit_setup`: what the later stages are handed;
- :func:`write_summary`: ``summary.json`` beside the checkpoint.
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from codeq_cli._version import __version__
from codeq_cli.errors import UsageError, one_line
from codeq_cli.formats import runstate
from codeq_cli.train import dist
from codeq_cli.train.budget import MAX_DROP, RECIPE_KEYS, Budget

if TYPE_CHECKING:
    from codeq_cli.commands.compress import CompressOptions
    from codeq_cli.models.factory import LoadedModel
    from codeq_cli.train.recipe import Recipe


def default_run_dir(out: Path) -> Path:
    """``out.pt`` → ``out.run/``."""
    return out.with_name(out.stem + ".run") if out.suffix else out.with_name(out.name + ".run")


@dataclass(frozen=True)
class Plan:
    """What the user asked for, resolved and checked: the first stage's output."""

    opts: CompressOptions  # with workers filled in
    info: dist.DistInfo
    recipe: Recipe
    run_dir: Path
    budget: Budget | None


@dataclass(frozen=True)
class Loaded:
    """The model to compress (on the device), what it was built from, and its MACs per layer."""

    model: torch.nn.Module
    source: LoadedModel  # spec, data config (with the chosen preprocessing), weights, notes
    macs: dict[str, int]


@dataclass(frozen=True)
class Data:
    train_set: Any
    val_set: Any
    classes: list[str]


def resolve_plan(opts: CompressOptions) -> Plan:
    """Options → plan: processes, recipe, paths and the cheap data checks (a typo should not wait for a model)."""
    from codeq_cli.data.folders import check_root, parse_subset
    from codeq_cli.data.loader import default_workers
    from codeq_cli.train._compile import check_compile

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
    check_root(opts.data)
    if opts.workers is None:
        opts = replace(opts, workers=default_workers())
    parse_subset(opts.subset)
    budget = recipe.budget
    if budget is not None and budget.kind.searches and opts.skip_baseline and not opts.resume:
        raise UsageError(f"{MAX_DROP.flag} needs the FP top-1 measured at the start", hint="run without --skip-baseline")
    return Plan(opts, info, recipe, run_dir, budget)


def load(plan: Plan) -> Loaded:
    """The model with the data config the recipe chose, on the device; its MACs from a first forward."""
    from codeq_cli.data.folders import check_root, class_folders
    from codeq_cli.models.factory import load_model

    opts = plan.opts
    source = load_model(
        opts.model, weights=opts.weights, pretrained=opts.pretrained, num_classes=opts.num_classes, img_size=opts.img_size,
        data_classes=len(class_folders(check_root(opts.data))),
    )
    source.data = chosen_preprocessing(source.data, plan.recipe)  # used for training and evaluation, stored in the checkpoint
    return Loaded(source.model, source, {})


def build_data(plan: Plan, loaded: Loaded) -> Data:
    """The training and validation folders, transformed as the model's data config says."""
    from codeq_cli.data.folders import build_datasets
    from codeq_cli.models.factory import num_outputs

    opts, recipe, spec = plan.opts, plan.recipe, loaded.source.spec
    train_set, val_set, classes = build_datasets(
        opts.data, loaded.source.data, subset=opts.subset, seed=opts.seed, crop_scale=recipe.crop_scale, hflip=recipe.hflip
    )
    _check_classes(num_outputs(loaded.model), len(classes), opts, spec.label)
    if len(train_set) < recipe.batch_size:
        raise UsageError(
            f"batch_size {recipe.batch_size} is larger than the {len(train_set)} training images",
            hint=f"pass --batch-size {max(1, len(train_set))} or fewer",
        )
    return Data(train_set, val_set, classes)


def measured(plan: Plan, loaded: Loaded) -> Loaded:
    """``loaded`` on the device with its MACs, from the model's first forward (before the baseline: no time lost on a bad size)."""
    loaded.model.to(plan.info.device)
    macs = first_forward(loaded.model, loaded.source.data.input_size, plan.opts, loaded.source.spec)
    return replace(loaded, macs=macs)


def resume_state(plan: Plan, loaded: Loaded, data: Data) -> tuple[dict | None, dict]:
    """``(saved run state or None, this run's fingerprint)``; a resumed run must match the saved one (or ``--force``)."""
    opts = plan.opts
    state = runstate.load_state(plan.run_dir / runstate.STATE_FILE) if opts.resume else None
    prints = fingerprint(opts, loaded.source.spec, plan.recipe, data.classes)
    if state is not None:
        diff = _differences(json.loads(state["fingerprint"]), prints)
        if diff and not opts.force:
            raise UsageError(
                f"--resume: the saved run differs in {', '.join(diff[:4])}",
                hint="resume with the same model, recipe and data, or pass --force",
            )
    return state, prints


def resolve_recipe(opts: CompressOptions) -> Recipe:
    from codeq_cli.train.recipe import apply_overrides, load_recipe

    recipe = apply_overrides(load_recipe(opts.recipe), opts.overrides)
    if opts.batch_size is not None:
        recipe = apply_overrides(recipe, [f"batch_size={opts.batch_size}"], origin="--batch-size")
    if opts.epochs is not None:
        recipe = apply_overrides(recipe, [f"epochs={opts.epochs}"], origin="--epochs")
    for key in RECIPE_KEYS:  # the budget flags are recipe keys of the same names
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



def first_forward(model: torch.nn.Module, input_size, opts: CompressOptions, spec) -> dict[str, int]:
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



def load_run_state(model: torch.nn.Module, state: dict, run_dir: Path, label: str) -> None:
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



def fingerprint(opts: CompressOptions, spec, recipe, classes: list[str]) -> dict:
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


def checkpoint_description(plan: Plan, loaded: Loaded, data: Data):
    """``describe(steps=0, arithmetic=None)``: what a checkpoint of this run says of itself (the budget's probe and the final file)."""
    spec, source, opts = loaded.source.spec, loaded.source, plan.opts

    def describe(steps: int = 0, arithmetic=None) -> dict:
        return dict(spec=spec, data_config=source.data, class_names=data.classes, recipe=plan.recipe.to_dict(),
                    provenance=provenance(plan.info, opts.seed, steps, source.weights, arithmetic), metrics={},
                    macs=loaded.macs, data_dir=str(Path(opts.data).resolve()))

    return describe


def teacher(plan: Plan, loaded: Loaded) -> torch.nn.Module | None:
    """The frozen FP model for distillation (before any quantizer), when the recipe asks and the weights are trained."""
    from codeq_cli.train.distill import make_teacher

    opts = plan.opts
    from_weights = opts.weights is not None or opts.pretrained
    return make_teacher(loaded.model) if plan.recipe.distill_weight > 0 and from_weights else None


def restore(loaded: Loaded, state: dict, plan: Plan, on_event, progress) -> None:
    """A resumed run: the saved weights and quantizers, and every rank's random generators."""
    info = plan.info
    load_run_state(loaded.model, state, plan.run_dir, loaded.source.spec.label)
    if not runstate.restore_rng_state(state, info.rank, info.world_size, info.device):
        on_event({"event": "note", "text": f"the run state was saved by {state.get('world_size', 1)} processes: "
                  "every process resumes with rank 0's random generators (dropout masks differ from an "
                  "uninterrupted run)"})
    on_event({"event": "resumed", "step": progress.step, "epoch": progress.epoch})


def fit_setup(net, ctx, plan: Plan, loaded: Loaded, *, fingerprint: dict, budget, teacher, on_event, should_stop):
    """:class:`~codeq_cli.train.loop.FitSetup` from the plan; rank 0 writes the resolved recipe beside the run."""
    import os

    from codeq_cli._io import write_text
    from codeq_cli.train import loop
    from codeq_cli.train.recipe import recipe_to_yaml

    opts = plan.opts
    if ctx.info.is_main and not opts.resume:
        write_text(plan.run_dir / "recipe.yaml", recipe_to_yaml(plan.recipe))
    return loop.FitSetup(
        model=net, recipe=ctx.recipe, train_set=ctx.train_set, val_set=ctx.val_set, device=ctx.device,
        info=ctx.info, run_dir=plan.run_dir, macs=loaded.macs, seed=opts.seed, workers=opts.workers,
        max_steps=opts.max_steps, log_every=opts.log_every, save_every_s=opts.save_every, fingerprint=fingerprint,
        on_event=on_event, should_stop=should_stop,
        debug_stop_after=int(os.environ.get("CODEQ_DEBUG_STOP_AFTER", "0") or 0),
        debug_dump_dir=Path(os.environ["CODEQ_DEBUG_DUMP_DIR"]) if os.environ.get("CODEQ_DEBUG_DUMP_DIR") else None,
        budget=None if budget is None else budget.run, teacher=teacher,
    )


def write_summary(plan: Plan, done, data: Data, result) -> None:
    """Rank 0, after the checkpoint: ``summary.json``; the resumable state has no further use (unless kept)."""
    from codeq_cli._io import write_json

    write_json(plan.run_dir / "summary.json", {**result.to_dict(), "data": {
        "train": data.train_set.stats.to_dict(), "val": data.val_set.stats.to_dict()}})
    if not plan.opts.keep_state:
        runstate.discard_state(plan.run_dir)


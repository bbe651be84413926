"""The ``codeq`` command: parses arguments and calls the library, nothing more.

Only this module (and the report renderer) knows about the terminal. Every
failure the user can act on is a :class:`codeq_cli.errors.CodeqError`, printed
as one line on stderr with exit code 2 (usage) or 1 (runtime); ``--debug``
shows the traceback. Heavy imports (torch) happen inside the commands, so
``codeq --help`` answers at once.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from codeq_cli._version import __version__
from codeq_cli.errors import CodeqError

app = typer.Typer(
    name="codeq",
    help="Compress image classifiers with CoDeQ: joint pruning and quantization in one fine-tuning run.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"codeq {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
) -> None:
    _state["debug"] = debug


JsonOpt = Annotated[bool, typer.Option("--json", help="Print exactly one JSON document on stdout (logs go to stderr).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print only the result.")]


def _output(json_mode: bool, quiet: bool):
    from codeq_cli.console import Output

    return Output(json_mode=json_mode, quiet=quiet)


def _resume_command() -> str:
    args = [a for a in sys.argv[1:] if a != "--overwrite"]
    if "--resume" not in args:
        args.append("--resume")
    return "codeq " + " ".join(_quote(a) for a in args)


def _quote(a: str) -> str:
    import shlex

    return shlex.quote(a)


class _StopOnSignal:
    """First Ctrl-C (or SIGTERM): finish the step, save, stop. Second Ctrl-C: stop at once."""

    def __init__(self, output) -> None:
        self.output = output
        self.requested = False
        self._old = {}

    def __enter__(self):
        import signal

        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        import signal

        if self.requested:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = True
        self.output.err.print("stopping after this step and saving the run state (Ctrl-C again to stop at once)", markup=False)

    def __exit__(self, *exc) -> None:
        import signal

        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def __call__(self) -> bool:
        return self.requested


@app.command()
def compress(
    model: Annotated[str, typer.Argument(help="timm:NAME, tv:NAME or a bare name (torchvision first, then timm).")],
    data: Annotated[Path, typer.Option("--data", help="Folder with train/ and val/ class folders (ImageNet layout).")],
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="Built-in recipe name (see `codeq recipes`) or a YAML path.")] = "mixed",
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe key: --set lambda_dz=0.05 (repeatable).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Compressed checkpoint to write.")] = Path("out.pt"),
    run_dir: Annotated[Optional[Path], typer.Option("--run-dir", help="Folder for the run state and logs [default: OUT without suffix + .run].")] = None,
    weights: Annotated[Optional[Path], typer.Option("--weights", help="Local state dict (.pt/.pth/.safetensors) instead of the pretrained weights.")] = None,
    no_pretrained: Annotated[bool, typer.Option("--no-pretrained", help="Start from random weights.")] = False,
    num_classes: Annotated[Optional[int], typer.Option("--num-classes", min=1, help="Replace the head with N outputs (must match the class folders).")] = None,
    img_size: Annotated[Optional[int], typer.Option("--img-size", min=8, help="Input resolution instead of the model's own.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Global batch size (overrides the recipe).")] = None,
    workers: Annotated[int, typer.Option("--workers", "-j", min=0, help="Data-loading processes per GPU/process.")] = 4,
    subset: Annotated[Optional[str], typer.Option("--subset", help="Use part of the data: a fraction (0.1) or images per class (50).")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="Epochs (overrides the recipe).")] = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", min=1, help="Stop after this many optimizer steps.")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="cpu, cuda or cuda:N [default: cuda when present].")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Random seed (CPU runs are reproducible).")] = 0,
    skip_baseline: Annotated[bool, typer.Option("--skip-baseline", help="Do not evaluate the FP model first.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted run saved in the run folder.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output and run state.")] = False,
    force: Annotated[bool, typer.Option("--force", help="With --resume: continue even if the model or recipe changed.")] = False,
    compile_: Annotated[bool, typer.Option("--compile", help="torch.compile the model (GPU).")] = False,
    nproc: Annotated[Optional[int], typer.Option("--nproc", min=1, help="Launch N processes on this machine (torch elastic launcher).")] = None,
    save_every: Annotated[float, typer.Option("--save-every", min=0.0, help="Save the run state at least every N seconds.")] = 600.0,
    log_every: Annotated[int, typer.Option("--log-every", min=1, help="Log compression figures every N steps.")] = 20,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fine-tune MODEL with CoDeQ on --data and write the compressed checkpoint."""
    if nproc is not None and nproc > 1:
        from codeq_cli.launch import launch

        raise typer.Exit(launch(nproc, sys.argv[1:]))
    from codeq_cli.compress import CompressOptions, run
    from codeq_cli.console import TrainingProgress

    output = _output(json_, quiet)
    opts = CompressOptions(
        model=model, data=data, recipe=recipe, overrides=list(set_ or []), out=out, run_dir=run_dir, weights=weights,
        pretrained=not no_pretrained, num_classes=num_classes, img_size=img_size, batch_size=batch_size,
        workers=workers, subset=subset, epochs=epochs, max_steps=max_steps, device=device, seed=seed,
        skip_baseline=skip_baseline, resume=resume, overwrite=overwrite, force=force, compile=compile_,
        save_every=save_every, log_every=log_every,
    )
    from codeq_cli import dist
    from codeq_cli.train import Interrupted

    is_main = dist.DistInfo(rank=int(os.environ.get("RANK", "0"))).is_main
    if not is_main:
        output.quiet = True
    progress = TrainingProgress(output)

    def on_event(e: dict) -> None:
        kind = e.get("event")
        if kind == "note":
            output.info(e["text"])
        elif kind == "data":
            output.info(f"data: {e['train']} training and {e['val']} validation images, {e['classes']} classes, "
                        f"input {'x'.join(str(x) for x in e['input_size'][1:])}")
        elif kind == "baseline":
            output.info(f"FP baseline: top-1 {e['top1']:.2f}%  top-5 {e['top5']:.2f}% ({e['samples']} images)")
        elif kind == "quantized":
            output.info(f"quantizers inserted into {e['layers']} layers")
        elif kind == "resumed":
            output.info(f"resumed at step {e['step']} (epoch {e['epoch'] + 1})")
        elif kind == "final":
            output.info(f"compressed model: top-1 {e['top1']:.2f}%  sparsity {e['sparsity']:.3f}  "
                        f"bits {e['avg_bits']:.2f}  rel BOPs {e['rel_bops']:.2f}%")
        else:
            progress(e)

    try:
        with _StopOnSignal(output) as stop, progress:
            result = run(opts, on_event=on_event, should_stop=stop)
    except Interrupted as exc:
        raise CodeqError(f"interrupted after step {exc.step}; the run state is saved",
                         hint=f"resume with: {_resume_command()}") from None
    finally:
        dist.shutdown()
    if not is_main:
        return
    m = result.metrics
    human = (
        f"wrote {result.out} ({result.file_bytes / 1e6:.2f} MB) in {result.seconds:.0f} s\n"
        f"  {result.model}: top-1 {m['top1']:.2f}%"
        + (f" (FP {m['fp_top1']:.2f}%)" if m.get("fp_top1") is not None else "")
        + f", rel BOPs {result.totals['rel_bops']:.2f}%, sparsity {result.totals['sparsity']:.3f}, "
        f"bits {result.totals['avg_bits']:.2f}\n"
        f"  next: codeq report {result.out}    codeq eval {result.out}"
    )
    output.result(result.to_dict(), human)


recipes_app = typer.Typer(help="List and show the built-in recipes.", no_args_is_help=False, invoke_without_command=True)
app.add_typer(recipes_app, name="recipes")


@recipes_app.callback()
def _recipes(ctx: typer.Context, json_: JsonOpt = False) -> None:
    """List the built-in recipes with a one-line summary."""
    if ctx.invoked_subcommand is not None:
        return
    from codeq_cli.recipe import list_recipes

    items = list_recipes()
    width = max(len(n) for n, _ in items)
    human = "\n".join(f"{n:<{width}}  {summary}" for n, summary in items)
    _output(json_, False).result({"recipes": [{"name": n, "summary": s} for n, s in items]}, human)


@recipes_app.command("show")
def _recipes_show(
    name: Annotated[str, typer.Argument(help="A built-in recipe name or a YAML path.")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Apply overrides before showing.")] = None,
    json_: JsonOpt = False,
) -> None:
    """Print one recipe (resolved and validated) as YAML."""
    from codeq_cli.recipe import apply_overrides, load_recipe, recipe_to_yaml

    recipe = apply_overrides(load_recipe(name), list(set_ or []))
    _output(json_, False).result(recipe.to_dict(), recipe_to_yaml(recipe).rstrip())


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``codeq`` console script and ``python -m codeq_cli``."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        app(args=args, prog_name="codeq", standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except typer.TyperException as exc:  # the parser's usage errors (typer's vendored click)
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
            print(ctx.get_help())
            sys.exit(0)
        if debug:
            raise
        path = ctx.command_path.split(" ", 1)[1] if ctx is not None and " " in ctx.command_path else ""
        where = f"codeq {path}".strip()
        print(f"error: {' '.join(exc.format_message().split())} (see '{where} --help')", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 2) or 2)
    except CodeqError as exc:
        if debug or _state["debug"]:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)

"""The ``codeq`` command: parses arguments and calls the library, nothing more.

Only this module (and the report renderer) knows about the terminal. Every
failure the user can act on is a :class:`codeq_cli.errors.CodeqError`, printed
as one line on stderr with exit code 2 (usage) or 1 (runtime); ``--debug``
shows the traceback. Heavy imports (torch) happen inside the commands, so
``codeq --help`` answers at once.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from codeq_cli._version import __version__
from codeq_cli.cli import console
from codeq_cli.cli._options import (
    CropPctOpt, InterpOpt, JsonOpt, LogDirOpt, LogToOpt, MeanOpt, QuietOpt, StdOpt, numbers as _numbers,
)
from codeq_cli.cli.runctl import StopOnSignal, rank, resume_command
from codeq_cli.errors import CodeqError, InterruptedRun, TrainingError, UsageError, one_line

app = typer.Typer(
    name="codeq",
    help="Compress image classifiers with CoDeQ: joint pruning and quantization in one fine-tuning run.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_state: dict = {"debug": False, "argv": None}


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


def _output(json_mode: bool, quiet: bool):
    return console.Output(json_mode=json_mode, quiet=quiet)


def _argv() -> list[str]:
    """The arguments this invocation was given (``main(argv)`` or the command line)."""
    return list(_state["argv"]) if _state.get("argv") is not None else sys.argv[1:]


def _tracker(log_to: str | None, log_dir: Path | None, opts):
    """The tracker of a compress run (one that does nothing without --log-to, or off rank 0)."""
    import shlex

    from codeq_cli.commands.compress import default_run_dir
    from codeq_cli.commands.tracking import open_tracker, parse_log_to

    return open_tracker(parse_log_to(log_to), run_dir=opts.run_dir or default_run_dir(opts.out), log_dir=log_dir,
                        log_every=opts.log_every, command="codeq " + shlex.join(_argv()))


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
    workers: Annotated[Optional[int], typer.Option("--workers", "-j", min=0, help="Data-loading processes per GPU/process [default: the CPUs, at most 4].")] = None,
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
    target_bops: Annotated[Optional[float], typer.Option("--target-bops", help="Compress to this relative BOPs, in percent of the dense FP32 BOPs (as `codeq report` shows).")] = None,
    target_size: Annotated[Optional[str], typer.Option("--target-size", help="Compress until the checkpoint fits this size: 2MB, 1.5MiB, 800kB or bytes.")] = None,
    max_drop: Annotated[Optional[float], typer.Option("--max-drop", help="Compress as far as possible while top-1 stays within this many points of the FP model.")] = None,
    keep_state: Annotated[bool, typer.Option("--keep-state", help="Keep the run state (state.pt) once the checkpoint is written.")] = False,
    log_to: LogToOpt = None,
    log_dir: LogDirOpt = None,
    crop_pct: CropPctOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    interpolation: InterpOpt = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fine-tune MODEL with CoDeQ on --data and write the compressed checkpoint."""
    if nproc is not None and nproc > 1:
        from codeq_cli.train.launch import launch

        raise typer.Exit(launch(nproc, _argv(), device))
    from codeq_cli.commands.compress import CompressOptions, run

    output = _output(json_, quiet)
    opts = CompressOptions(
        model=model, data=data, recipe=recipe, overrides=list(set_ or []), out=out, run_dir=run_dir, weights=weights,
        pretrained=not no_pretrained, num_classes=num_classes, img_size=img_size, batch_size=batch_size,
        workers=workers, subset=subset, epochs=epochs, max_steps=max_steps, device=device, seed=seed,
        skip_baseline=skip_baseline, resume=resume, overwrite=overwrite, force=force, compile=compile_,
        save_every=save_every, log_every=log_every, target_bops=target_bops, target_size=target_size, max_drop=max_drop,
        keep_state=keep_state, crop_pct=crop_pct,
        mean=_numbers("--mean", mean), std=_numbers("--std", std), interpolation=interpolation,
    )
    from codeq_cli.train import dist

    is_main = rank() == 0
    if not is_main:
        output.quiet = True
    on_event = console.compress_events(output)
    tracker = _tracker(log_to, log_dir, opts)
    try:
        with StopOnSignal(output, _state) as stop:
            result = run(opts, on_event=tracker.wrap(on_event), should_stop=stop)
        tracker.finish(result)
    except InterruptedRun as exc:
        tracker.close("KILLED")
        raise InterruptedRun(f"interrupted after step {exc.step}; the run state is saved",
                             hint=f"resume with: {resume_command(_argv())}") from None
    finally:
        tracker.close("FAILED")  # a no-op after finish() or close()
        on_event.close()
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
        + console.budget_lines(result.budget, m)
        + f"  next: codeq report {result.out}    codeq eval {result.out}"
    )
    output.result(result.to_dict(), human)


from codeq_cli.cli._recipes import recipes_app  # noqa: E402  (its own module: the `recipes` subcommands)

app.add_typer(recipes_app, name="recipes")


@app.command()
def report(
    files: Annotated[list[Path], typer.Argument(help="Compressed checkpoints written by `codeq compress` (one or more).")],
    json_: JsonOpt = False,
    csv_: Annotated[bool, typer.Option("--csv", help="Print the per-layer rows as CSV (one file).")] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print the report as a Markdown table.")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Also write the JSON/CSV/Markdown to this file.")] = None,
    html: Annotated[Optional[Path], typer.Option("--html", help="Also write a self-contained HTML page: plots and tables; with several files, top-1 against BOPs.")] = None,
) -> None:
    """Per-layer sparsity, bits and BOPs of checkpoints (no data, no model build); --html draws them."""
    if sum((json_, csv_, markdown)) > 1:
        raise typer.BadParameter("choose one of --json, --csv and --markdown")
    if csv_ and len(files) > 1:
        raise UsageError(f"--csv takes one checkpoint, not {len(files)}",
                         hint="run `codeq report FILE --csv` for each file, or use --json or --html")
    from codeq_cli.formats.checkpoint import load
    from codeq_cli.commands.report import render_table, report_data, to_csv, to_markdown

    datas = [report_data(load(f)) for f in files]
    output = _output(json_, False)
    if len(datas) == 1:
        data = datas[0]
    else:
        from codeq_cli.commands.report_html import comparison

        data = {"reports": datas, "comparison": comparison(datas)["rows"]}
    if html is not None:
        from codeq_cli.commands.report_html import write_page

        data = {**data, "html": str(write_page(html, datas))}
        output.info(f"wrote {html} ({html.stat().st_size / 1e3:.0f} kB): open it in a browser")
    text = None
    if json_:
        import json

        text = json.dumps(data, indent=2) + "\n"
        output.result(data)
    elif csv_:
        text = to_csv(datas[0])
        sys.stdout.write(text)
    elif markdown:
        text = "\n".join(to_markdown(d) for d in datas)
        sys.stdout.write(text)
    else:
        for d in datas:
            render_table(d, output.out)
    if out is not None:
        from codeq_cli._io import write_text

        if text is None:
            import json

            text = json.dumps(data, indent=2) + "\n"
        write_text(out, text)


@app.command("eval")
def eval_(
    file: Annotated[Path, typer.Argument(help="A compressed checkpoint written by `codeq compress`.")],
    data: Annotated[Optional[Path], typer.Option("--data", help="DIR with val/ class folders, or a folder of class folders [default: the one recorded at compress time].")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per batch.")] = 128,
    workers: Annotated[Optional[int], typer.Option("--workers", "-j", min=0, help="Data-loading processes [default: the CPUs, at most 4].")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="cpu, cuda or cuda:N [default: cuda when present].")] = None,
    compare_fp: Annotated[bool, typer.Option("--compare-fp", help="Also evaluate the original FP model and print the drop.")] = False,
    weights: Annotated[Optional[Path], typer.Option("--weights", help="With --compare-fp: the FP state dict [default: pretrained].")] = None,
    min_top1: Annotated[Optional[float], typer.Option("--min-top1", help="Exit 1 when top-1 (percent) is below this (CI gate).")] = None,
    subset: Annotated[Optional[str], typer.Option("--subset", help="Evaluate on part of the data: a fraction or images per class.")] = None,
    crop_pct: CropPctOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    interpolation: InterpOpt = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Top-1/top-5 of the decoded compressed model."""
    from codeq_cli.commands.evaluate import EvalOptions, run

    output = _output(json_, quiet)
    opts = EvalOptions(file, data, batch_size, workers, device, compare_fp, weights, subset, crop_pct=crop_pct,
                       mean=_numbers("--mean", mean), std=_numbers("--std", std), interpolation=interpolation)
    progress = console.EvalProgress(output)

    def on_event(e: dict) -> None:
        if e.get("event") == "data":
            how = "recorded at compress time" if e["recorded"] else "from --data"
            output.info(f"evaluating on {e['folder']} ({how})")
        elif e.get("event") == "note":
            output.info(e["text"])

    with progress:
        res = run(opts, on_batch=progress, on_event=on_event)
    lines = [f"{res['model']}: top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%  ({res['samples']} images)"]
    if "fp_top1" in res:
        lines.append(f"FP model ({res['fp_weights']}): top-1 {res['fp_top1']:.2f}%  drop {res['fp_top1'] - res['top1']:.2f} points")
        res["drop"] = res["fp_top1"] - res["top1"]
    if min_top1 is not None:
        res["min_top1"] = min_top1
        res["passed"] = res["top1"] >= min_top1
        lines.append(f"gate --min-top1 {min_top1}: {'passed' if res['passed'] else 'FAILED'}")
    output.result(res, "\n".join(lines))
    if min_top1 is not None and not res["passed"]:
        raise typer.Exit(1)


@app.command()
def export(
    file: Annotated[Path, typer.Argument(help="A compressed checkpoint written by `codeq compress`.")],
    to: Annotated[Path, typer.Option("--to", help="Output: .safetensors or .pt (dense state dict) or .onnx.")],
    format_: Annotated[Optional[str], typer.Option("--format", help="safetensors, pt, onnx or onnx-int8 (QDQ graph on integer kernels; needs act_bits) [default: from the suffix of --to].")] = None,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset.")] = 18,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file.")] = False,
    reduce_range: Annotated[bool, typer.Option("--reduce-range/--full-range", help="onnx-int8: 7-bit weight codes, safe on CPUs without VNNI (docs/deploy.md), or the full 8 bits.")] = True,
    check: Annotated[bool, typer.Option("--check", help="onnx-int8: then count integer vs float ops after ONNX Runtime's optimizer, time it against FP32 and ORT's quantize_static here, and compare top-1 with codeq eval.")] = False,
    data: Annotated[Optional[Path], typer.Option("--data", help="--check: image folder for top-1 [default: the one recorded in the checkpoint].")] = None,
    subset: Annotated[Optional[str], typer.Option("--subset", help="--check: images per class (or a fraction) for top-1, as codeq eval.")] = None,
    reps: Annotated[int, typer.Option("--reps", min=1, help="--check: timed runs per graph and batch.")] = 20,
    runtime: Annotated[Optional[str], typer.Option("--runtime", help="--check: ort, openvino or ort,openvino (OpenVINO is an extra: pip install 'codeq[openvino]') [default: ort].")] = None,
    json_: JsonOpt = False,
) -> None:
    """Dense dequantized weights for deployment (loads with strict=True), or ONNX."""
    from codeq_cli.formats.checkpoint import load
    from codeq_cli.errors import UsageError
    from codeq_cli.formats.export import export_onnx, export_state_dict

    fmt = (format_ or to.suffix.lstrip(".")).lower()
    suffixes = {"safetensors": ".safetensors", "pt": ".pt", "pth": ".pth", "onnx": ".onnx", "onnx-int8": ".onnx"}
    if fmt not in suffixes:
        raise UsageError(f"--format {fmt!r} is not supported", hint="use safetensors, pt, onnx or onnx-int8")
    if check and fmt != "onnx-int8":
        raise UsageError(f"--check measures the integer graph, not --format {fmt}", hint="add --format onnx-int8, or drop --check")
    if runtime is not None and not check:
        raise UsageError(f"--runtime {runtime} picks the runtimes of --check", hint="add --check, or drop --runtime")
    if check:
        from codeq_cli.commands import int8_check

        runtimes = int8_check.parse_runtimes(runtime)
        int8_check.check_installed(runtimes)
    if to.suffix.lower() != suffixes[fmt] and not (fmt == "pt" and to.suffix.lower() == ".pth"):
        to = to.with_name(to.name + suffixes[fmt])
    if to.exists() and not overwrite:
        raise UsageError(f"{str(to)!r} exists", hint="pass --overwrite to replace it")
    ckpt = load(file)
    if fmt == "onnx-int8":
        from codeq_cli.formats.onnx_int8 import export_onnx_int8

        info = export_onnx_int8(ckpt, to, opset=opset, reduce_range=reduce_range)
        answer = {"path": str(info.path), "format": fmt, "bytes": info.bytes, "model": ckpt.spec.label,
                  **{k: v for k, v in info.to_dict().items() if k not in ("path", "bytes", "weight_errors")}}
        text = (f"wrote {info.path} ({info.bytes / 1e6:.2f} MB, int8 QDQ ONNX: {info.int8_layers} integer layers, "
                f"{info.activation_quantizers} activation quantizers, largest int8 weight rounding {info.max_weight_error:.3g})")
        if reduce_range and info.wide_layers:
            _output(json_, False).warn(
                f"{info.wide_layers} of {info.int8_layers} layers have weights of more than 6 bits, which 7-bit codes "
                f"(--reduce-range) round, so the exported top-1 may differ from codeq eval; train with --recipe int8 "
                f"(or --set b_max=6), or export with --full-range for VNNI/ARM CPUs (docs/deploy.md)")
        if check:
            res = int8_check.run(int8_check.CheckOptions(info.path, Path(file), data=data, subset=subset, reps=reps,
                                                         runtimes=runtimes))
            answer["check"] = res
            text += "\n" + int8_check.render(res)
        _output(json_, False).result(answer, text)
        return
    path = export_onnx(ckpt, to, opset=opset) if fmt == "onnx" else export_state_dict(ckpt, to)
    size = Path(path).stat().st_size
    _output(json_, False).result(
        {"path": str(path), "format": fmt, "bytes": size, "model": ckpt.spec.label},
        f"wrote {path} ({size / 1e6:.2f} MB, {fmt}); load it into {ckpt.spec.label} with strict=True"
        if fmt != "onnx" else f"wrote {path} ({size / 1e6:.2f} MB, ONNX opset {opset})",
    )


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option("--out-dir", help="Folder for everything the demo writes.")] = Path("codeq-demo"),
    model: Annotated[str, typer.Option("--model", help="Model to train and compress.")] = "timm:resnet10t",
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="CoDeQ fine-tuning epochs.")] = 4,
    fp_epochs: Annotated[int, typer.Option("--fp-epochs", min=1, help="Epochs of the FP32 starting point.")] = 3,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Batch size.")] = 64,
    img_size: Annotated[int, typer.Option("--img-size", min=8, help="Input resolution.")] = 32,
    seed: Annotated[int, typer.Option("--seed", help="Random seed (the demo is deterministic).")] = 0,
    subset: Annotated[Optional[str], typer.Option("--subset", help="Images per class (or a fraction) for a quicker run.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a key of the mixed recipe (repeatable).")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="cpu, cuda or cuda:N [default: cuda when present].")] = None,
    target_bops: Annotated[float, typer.Option("--target-bops", help="The budget: relative BOPs in percent (0: no budget, the recipe's λ).")] = 3.0,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a small model on bundled Fashion-MNIST, compress it with CoDeQ, report and evaluate it."""
    from codeq_cli.commands.demo import DemoOptions, run

    output = _output(json_, quiet)
    opts = DemoOptions(out_dir=out_dir, model=model, img_size=img_size, fp_epochs=fp_epochs, epochs=epochs,
                       batch_size=batch_size, seed=seed, subset=subset, overrides=list(set_ or []), device=device,
                       target_bops=None if target_bops <= 0 else target_bops)
    on_event = console.compress_events(output)
    try:
        with StopOnSignal(output, _state) as stop:
            res = run(opts, on_event=on_event, should_stop=stop)
    except InterruptedRun as exc:
        raise InterruptedRun(f"interrupted after step {exc.step}", hint="run `codeq demo` again to start over") from None
    finally:
        on_event.close()
    if not json_ and not quiet:
        from codeq_cli.formats.checkpoint import load
        from codeq_cli.commands.report import render_table, report_data

        render_table(report_data(load(res.checkpoint)), output.err)
    ratio = res.fp32_bytes / res.file_bytes if res.file_bytes else float("nan")
    human = "\n".join([
        "",
        f"codeq demo: {res.model} on Fashion-MNIST ({res.seconds:.0f} s, everything in {res.out_dir}/)",
        f"  FP32 top-1        {res.fp_top1:6.2f}%",
        f"  compressed top-1  {res.top1:6.2f}%   (drop {res.fp_top1 - res.top1:+.2f} points)",
        f"  relative BOPs     {res.rel_bops:6.2f}%   (of FP32"
        + (f"; target {res.target_bops:g}%)" if res.target_bops is not None else ")"),
        f"  sparsity          {res.sparsity:6.3f}    mean bits {res.avg_bits:.2f} (per layer {res.min_layer_bits}-{res.max_layer_bits})",
        f"  file size         {res.file_bytes / 1e6:6.2f} MB vs {res.fp32_bytes / 1e6:.2f} MB fp32 ({ratio:.1f}x smaller)",
        f"  report            {res.report_html}   (plots and tables; open it in a browser)",
        "",
        "the same on your own data (ImageNet-style folder with train/ and val/):",
        *(f"  {c}" for c in res.commands),
    ])
    output.result(res.to_dict(), human)


@app.command()
def batch(
    jobs_file: Annotated[Path, typer.Argument(help="YAML file with jobs and/or a models x recipes matrix (docs/batch.md).")],
    resume: Annotated[bool, typer.Option("--resume", help="Skip jobs whose outputs are complete; resume interrupted ones.")] = False,
    summary_dir: Annotated[Optional[Path], typer.Option("--summary-dir", help="Where to write <jobs>.summary.json/.csv [default: beside the jobs file].")] = None,
    log_to: LogToOpt = None,
    log_dir: LogDirOpt = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run many compressions in a row, each isolated; summary table, JSON and CSV; exit 1 if any job failed a gate."""
    from codeq_cli.commands.batch import load_jobs, run_batch, summary, write_summary, write_summary_html

    output = _output(json_, quiet)
    jobs = load_jobs(jobs_file)

    def on_job(i: int, job: dict) -> None:
        output.info(f"[{i + 1}/{len(jobs)}] {job['name']}: codeq compress {job['model']} --recipe {job['recipe']}")

    def on_row(row: dict) -> None:
        msg = row["status"] + (f" ({row['error']})" if row.get("error") else "")
        output.info(f"    {row['name']}: {msg}")

    from codeq_cli.commands.tracking import batch_tracking, parse_log_to

    folder = summary_dir or jobs_file.parent  # every job's run, grouped under the jobs file's name
    tracking = batch_tracking(parse_log_to(log_to), log_dir, jobs_file.stem, folder / f"{jobs_file.stem}.tensorboard")
    rows = run_batch(jobs, resume=resume, on_job=on_job, on_row=on_row,
                     stderr=subprocess_devnull() if quiet or json_ else None, tracking=tracking)
    data = summary(rows)
    json_path, csv_path = write_summary(data, summary_dir or jobs_file.parent, jobs_file.stem)
    html_path = write_summary_html(data, summary_dir or jobs_file.parent, jobs_file.stem)
    data["summary_files"] = [str(json_path), str(csv_path), str(html_path)]
    if json_:
        output.result(data)
    else:
        console.batch_table(rows, output)
        output.info(f"summary: {json_path}, {csv_path}, {html_path}")
    if not data["passed"]:
        raise typer.Exit(1)


def subprocess_devnull():
    import subprocess

    return subprocess.DEVNULL


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``codeq`` console script and ``python -m codeq_cli``."""
    args = list(sys.argv[1:] if argv is None else argv)
    _state["argv"] = args
    debug = "--debug" in args
    try:
        rc = app(args=args, prog_name="codeq", standalone_mode=False)
        if rc == 130:  # typer turns a KeyboardInterrupt into exit code 130, silently
            print(f"error: {_state.get('interrupted', 'interrupted')}", file=sys.stderr)
        if isinstance(rc, int) and rc:  # typer.Exit(code) comes back as a return value here
            sys.exit(rc)
    except typer.Exit as exc:
        sys.exit(exc.args[0] if exc.args else 0)
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
        print(f"error: {one_line(exc.format_message(), 1000)} (see '{where} --help')", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 2) or 2)
    except CodeqError as exc:
        if debug or _state["debug"]:
            raise
        this_rank = rank()
        if this_rank == 0:
            print(f"error: {exc}", file=sys.stderr)
        elif not isinstance(exc, (UsageError, TrainingError)):  # those are raised on every rank together
            print(f"error: (rank {this_rank}) {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except (OSError, MemoryError) as exc:  # last resort: still one line
        if debug or _state["debug"]:
            raise
        what = "out of memory" if isinstance(exc, MemoryError) else (exc.strerror or str(exc))
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"error: {what}{where}; rerun with --debug for details", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)

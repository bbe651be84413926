"""``codeq batch JOBS.yaml``: many compressions in a row, each isolated, with gates.

A jobs file lists jobs, or a matrix (models × recipes), or both::

    defaults:                    # optional: applied to every job
      data: /imagenet
      set: [epochs=1]
    jobs:
      - model: resnet18
        recipe: mixed
        out: results/r18-mixed.pt
        min_top1: 69.0           # gate: compressed top-1 (%) at least this
        max_rel_bops: 5.0        # gate: relative BOPs (%) at most this
    matrix:
      models: [resnet18, resnet50]
      recipes: [fixed4, mixed]
      out_dir: results

Every job runs ``codeq compress … --json`` in its own process, so one job's
failure (even a crash) is recorded and the next one runs. The summary (model,
recipe, FP top-1, compressed top-1, drop, relative BOPs, size, time, status)
is returned as rows and written as JSON and CSV. See ``docs/batch.md``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from codeq_cli.errors import UsageError

# Options of `codeq compress` a job may set (name in the file → flag).
_FLAGS = {
    "weights": "--weights", "num_classes": "--num-classes", "img_size": "--img-size", "batch_size": "--batch-size",
    "workers": "--workers", "subset": "--subset", "epochs": "--epochs", "max_steps": "--max-steps",
    "device": "--device", "seed": "--seed", "run_dir": "--run-dir", "save_every": "--save-every",
    "log_every": "--log-every", "nproc": "--nproc",
}
_SWITCHES = {"no_pretrained": "--no-pretrained", "skip_baseline": "--skip-baseline", "compile": "--compile"}


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)

    data: str | None = None
    recipe: str | None = None
    set: list[str] = Field(default_factory=list)
    weights: str | None = None
    num_classes: int | None = Field(None, ge=1)
    img_size: int | None = Field(None, ge=8)
    batch_size: int | None = Field(None, ge=1)
    workers: int | None = Field(None, ge=0)
    subset: str | float | int | None = None
    epochs: int | None = Field(None, ge=1)
    max_steps: int | None = Field(None, ge=1)
    device: str | None = None
    seed: int | None = None
    save_every: float | None = Field(None, ge=0)
    log_every: int | None = Field(None, ge=1)
    nproc: int | None = Field(None, ge=1)
    no_pretrained: bool | None = None
    skip_baseline: bool | None = None
    compile: bool | None = None
    min_top1: float | None = None
    max_rel_bops: float | None = Field(None, ge=0)


class JobSpec(_Common):
    name: str | None = None
    model: str
    out: str | None = None
    run_dir: str | None = None


class MatrixSpec(_Common):
    models: list[str] = Field(min_length=1)
    recipes: list[str] = Field(min_length=1)
    out_dir: str = "codeq-batch"


class JobsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    defaults: _Common = Field(default_factory=_Common)
    jobs: list[JobSpec] = Field(default_factory=list)
    matrix: MatrixSpec | None = None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "job"


def _one_line(exc: ValidationError, where: str) -> UsageError:
    # An unknown key usually explains the rest (a misspelt required key is also "missing").
    errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
    err = errors[0]
    loc = ".".join(str(x) for x in err["loc"])
    msg = err["msg"].rstrip(".")
    if err["type"] == "extra_forbidden":
        import difflib

        key = str(err["loc"][-1])
        known = set(JobSpec.model_fields) | set(MatrixSpec.model_fields) | set(JobsFile.model_fields)
        near = difflib.get_close_matches(key, sorted(known), n=1)
        hint = f"did you mean {near[0]!r}?" if near else "see docs/batch.md for the keys a jobs file takes"
        return UsageError(f"{where}: unknown key {key!r} (at {loc})", hint=hint)
    return UsageError(f"{where}: {loc}: {msg}", hint="see docs/batch.md")


def load_jobs(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The jobs of a file, each a dict of resolved settings (``name``, ``model``, ``out``, …)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"jobs file {str(p)!r} does not exist", hint="pass a YAML file (see docs/batch.md)")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        raise UsageError(f"{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{p}: expected a mapping with 'jobs' and/or 'matrix'", hint="see docs/batch.md")
    try:
        spec = JobsFile.model_validate(raw)
    except ValidationError as exc:
        raise _one_line(exc, str(p)) from None
    defaults = spec.defaults.model_dump(exclude_none=True)
    jobs: list[dict[str, Any]] = []
    for job in spec.jobs:
        d = {**defaults, **job.model_dump(exclude_none=True)}
        d["set"] = [*defaults.get("set", []), *job.set]
        d.setdefault("recipe", "mixed")
        d.setdefault("name", f"{_slug(d['model'])}-{_slug(Path(d['recipe']).stem)}")
        jobs.append(d)
    if spec.matrix is not None:
        m = spec.matrix.model_dump(exclude_none=True)
        models, recipes, out_dir = m.pop("models"), m.pop("recipes"), m.pop("out_dir")
        for model in models:
            for recipe in recipes:
                d = {**defaults, **m, "model": model, "recipe": recipe}
                d["set"] = [*defaults.get("set", []), *m.get("set", [])]
                d["name"] = f"{_slug(model)}-{_slug(Path(recipe).stem)}"
                d["out"] = str(Path(out_dir) / f"{d['name']}.pt")
                jobs.append(d)
    if not jobs:
        raise UsageError(f"{p} lists no jobs", hint="add a 'jobs' list or a 'matrix' (see docs/batch.md)")
    base = p.parent
    names = set()
    for d in jobs:
        if d["name"] in names:
            d["name"] = f"{d['name']}-{len(names)}"
        names.add(d["name"])
        d.setdefault("out", f"{d['name']}.pt")
        for key in ("out", "data", "weights", "run_dir"):
            if d.get(key) and not Path(d[key]).is_absolute():
                d[key] = str(base / d[key])
        # A recipe file beside the jobs file wins, as a file wins over a built-in name (docs/recipes.md).
        if not Path(d["recipe"]).is_absolute() and (base / d["recipe"]).is_file():
            d["recipe_file"] = str(base / d["recipe"])
        if not d.get("data"):
            raise UsageError(f"{p}: job {d['name']!r} has no data folder", hint="set 'data' in the job or in 'defaults'")
    return jobs


def compress_args(job: dict[str, Any], resume: bool) -> list[str]:
    recipe = job.get("recipe_file") or job["recipe"]
    args = ["compress", job["model"], "--data", job["data"], "--recipe", recipe, "--out", job["out"], "--json"]
    for pair in job.get("set", []):
        args += ["--set", pair]
    for key, flag in _FLAGS.items():
        if job.get(key) is not None:
            args += [flag, str(job[key])]
    for key, flag in _SWITCHES.items():
        if job.get(key):
            args.append(flag)
    args.append("--resume" if resume else "--overwrite")
    return args


def _complete(out: Path) -> bool:
    if not out.is_file():
        return False
    try:
        from codeq_cli.formats.checkpoint import load

        load(out)
        return True
    except Exception:
        return False


def _run_dir(job: dict[str, Any]) -> Path:
    from codeq_cli.commands._stages import default_run_dir

    return Path(job["run_dir"]) if job.get("run_dir") else default_run_dir(Path(job["out"]))


def run_job(job: dict[str, Any], *, resume: bool, stderr=None, tracking: dict | None = None) -> dict[str, Any]:
    """One job in its own process; its summary row. ``tracking``: ``tracking.batch_tracking``'s settings."""
    from codeq_cli.commands.report import budget_of
    out = Path(job["out"])
    row: dict[str, Any] = {"name": job["name"], "model": job["model"], "recipe": job["recipe"], "out": str(out),
                           "budget": None, "fp_top1": None, "top1": None, "drop": None, "rel_bops": None,
                           "bytes": None, "seconds": 0.0, "status": "failed", "error": None, "gates": {}}
    t0 = time.monotonic()
    if resume and _complete(out):
        from codeq_cli.formats.checkpoint import load

        ck = load(out)
        m = ck.metrics or {}
        from codeq_cli.core.bops import bops_totals

        row.update(fp_top1=m.get("fp_top1"), top1=m.get("top1"), rel_bops=bops_totals(ck.rows)["rel_bops"],
                   bytes=ck.file_bytes, budget=budget_of(m), status="skipped")
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        state_exists = (_run_dir(job) / "state.pt").exists()
        from codeq_cli.commands.tracking import job_tracking

        track_args, track_env = job_tracking(tracking, job["name"])  # its own tracked run, in the batch's group
        cmd = [sys.executable, "-m", "codeq_cli", *compress_args(job, resume and state_exists), *track_args]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, env={**os.environ, **track_env})
        if proc.returncode == 0:
            try:
                res = json.loads(proc.stdout)
            except json.JSONDecodeError:
                res = None
            if res is None:
                row["error"] = "compress printed no result"
            else:
                m, t = res["metrics"], res["totals"]
                row.update(fp_top1=m.get("fp_top1"), top1=m.get("top1"), rel_bops=t.get("rel_bops"),
                           bytes=res.get("file_bytes"), budget=budget_of(m), status="ok")
        else:
            row["error"] = f"codeq compress exited with {proc.returncode}"
    if row["top1"] is not None and row["fp_top1"] is not None:
        row["drop"] = row["fp_top1"] - row["top1"]
    row["seconds"] = time.monotonic() - t0 if row["status"] != "skipped" else 0.0
    _gates(job, row)
    return row


def budget_label(budget: dict[str, Any] | None) -> str:
    """``4% BOPs``, ``60000 B`` or ``drop 1``: a budget in a table cell ("" without one)."""
    from codeq_cli.train.budget import Budget

    b = Budget.from_dict(budget)
    return b.label() if b is not None else ""


def _gates(job: dict[str, Any], row: dict[str, Any]) -> None:
    if row["status"] not in ("ok", "skipped"):
        return
    failed = []
    if job.get("min_top1") is not None:
        ok = row["top1"] is not None and row["top1"] >= job["min_top1"]
        row["gates"]["min_top1"] = {"limit": job["min_top1"], "passed": ok}
        if not ok:
            failed.append(f"top-1 {row['top1']:.2f}% < {job['min_top1']}%")
    if job.get("max_rel_bops") is not None:
        ok = row["rel_bops"] is not None and row["rel_bops"] <= job["max_rel_bops"]
        row["gates"]["max_rel_bops"] = {"limit": job["max_rel_bops"], "passed": ok}
        if not ok:
            failed.append(f"relative BOPs {row['rel_bops']:.2f}% > {job['max_rel_bops']}%")
    if failed:
        row["status"] = "gate failed"
        row["error"] = "; ".join(failed)


def run_batch(jobs: list[dict[str, Any]], *, resume: bool = False, on_job: Callable[[int, dict], None] = lambda i, j: None,
              on_row: Callable[[dict], None] = lambda r: None, stderr=None,
              tracking: dict | None = None) -> list[dict[str, Any]]:
    rows = []
    for i, job in enumerate(jobs):
        on_job(i, job)
        row = run_job(job, resume=resume, stderr=stderr, tracking=tracking)
        rows.append(row)
        on_row(row)
    return rows


CSV_KEYS = ("name", "model", "recipe", "budget", "fp_top1", "top1", "drop", "rel_bops", "bytes", "seconds", "status", "error", "out")


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "jobs": rows,
        "total": len(rows),
        "ok": sum(r["status"] in ("ok", "skipped") for r in rows),
        "failed": sum(r["status"] == "failed" for r in rows),
        "gate_failed": sum(r["status"] == "gate failed" for r in rows),
        "passed": all(r["status"] in ("ok", "skipped") for r in rows),
    }


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_KEYS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: budget_label(r.get(k)) if k == "budget" else r.get(k) for k in CSV_KEYS})
    return buf.getvalue()


def write_summary(data: dict[str, Any], folder: Path, stem: str) -> tuple[Path, Path]:
    from codeq_cli._io import write_json, write_text

    folder.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = folder / f"{stem}.summary.json", folder / f"{stem}.summary.csv"
    write_json(json_path, data)
    write_text(csv_path, to_csv(data["jobs"]))
    return json_path, csv_path


def write_summary_html(data: dict[str, Any], folder: Path, stem: str) -> Path:
    """``<stem>.summary.html``: every job's status, and the checkpoints written compared (top-1 against BOPs)."""
    from codeq_cli.commands.report import report_data
    from codeq_cli.commands.report_html import write_page
    from codeq_cli.errors import CodeqError
    from codeq_cli.formats.checkpoint import load

    reports = []
    for row in data["jobs"]:
        if row["status"] in ("ok", "skipped", "gate failed"):  # a failed gate still wrote its checkpoint
            try:
                reports.append(report_data(load(row["out"])))
            except CodeqError:  # gone or damaged since: its row says what happened to the job
                continue
    folder.mkdir(parents=True, exist_ok=True)
    return write_page(folder / f"{stem}.summary.html", reports, title=f"codeq batch: {stem}", jobs=data["jobs"])

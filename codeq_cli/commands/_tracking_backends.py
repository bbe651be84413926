"""The tracking backends behind :class:`codeq_cli.commands.tracking.Tracker`: TensorBoard, MLflow, W&B.

One small interface, called from the tracker's worker thread only, in order:

- ``open(info, previous) -> dict``: start (or, with ``previous``, the state
  that ``open`` returned in an interrupted attempt, continue) the tracked run;
  the dict returned is saved in ``RUN_DIR/tracking.json``;
- ``params(params)`` once, at a fresh start (the recipe, the command, the data);
- ``metrics(values, step)``: ``{name: float}`` at a training step;
- ``layers(rows, step)``: per-layer ``{"name", "bits", "sparsity"}`` rows;
- ``finish(summary, files, step)``: the final figures and the files to attach
  (``summary.json``, the report page);
- ``close(status)``: ``FINISHED``, ``FAILED`` or ``KILLED``; ``abandon()``
  releases what is local after a failure, without talking to a server.

Any exception switches the backend off (the tracker says so in one line).
Each package is imported here, inside the backend that needs it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

PARAM_CHARS = 500  # MLflow's historic limit for a parameter's value; long values are cut to it


def _markdown_table(mapping: dict) -> str:
    rows = "\n".join(f"| {k} | {_text(v)} |" for k, v in mapping.items())
    return "| key | value |\n|---|---|\n" + rows


def _text(v) -> str:
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


class TensorBoard:
    """Event files in ``--log-dir`` (default ``RUN_DIR/tensorboard``), through ``torch.utils.tensorboard``."""

    name = "tensorboard"

    def open(self, info, previous: dict) -> dict:
        from torch.utils.tensorboard import SummaryWriter

        log_dir = Path(info.log_dir or previous.get("log_dir") or Path(info.run_dir) / "tensorboard")
        # A resumed run drops what an earlier attempt logged after the saved step (it logs those steps again).
        purge = info.start_step + 1 if info.resumed and previous else None
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge, flush_secs=30)
        if not (info.resumed and previous):
            self.params(info.params)
        return {"log_dir": os.path.abspath(log_dir)}

    def params(self, params: dict) -> None:
        if params.get("command"):
            self.writer.add_text("run/command", f"`{params['command']}`", 0)
        self.writer.add_text("run/parameters", _markdown_table(params), 0)

    def metrics(self, values: dict, step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def layers(self, rows: list[dict], step: int) -> None:
        import numpy as np

        for key in ("bits", "sparsity"):
            figures = np.array([float(r[key]) for r in rows])
            if figures.size:
                self.writer.add_histogram(f"layers/{key}", figures, step)
            for r in rows:
                self.writer.add_scalar(f"layer_{key}/{r['name']}", float(r[key]), step)

    def finish(self, summary: dict, files: list, step: int) -> None:
        self.writer.add_text("run/summary", _markdown_table(summary), step)
        if files:
            self.writer.add_text("run/files", "\n\n".join(f"`{f}`" for f in files), step)

    def close(self, status: str) -> None:
        self.writer.close()

    def abandon(self) -> None:
        if hasattr(self, "writer"):
            self.writer.close()


class MLflow:
    """A run in ``MLFLOW_TRACKING_URI`` (or MLflow's own default store), through ``MlflowClient``.

    The experiment is ``MLFLOW_EXPERIMENT_NAME``, else the batch's name
    (``CODEQ_TRACKING_GROUP``), else ``codeq``. Requests retry at most twice:
    a server that is gone costs seconds of the worker thread, once.
    """

    name = "mlflow"

    def open(self, info, previous: dict) -> dict:
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"  # stdout is codeq's result (--json)
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # no INFO lines about creating its tables
        logging.getLogger("alembic").setLevel(logging.WARNING)
        import mlflow
        from mlflow.tracking import MlflowClient

        uri = mlflow.get_tracking_uri()
        self.client = MlflowClient(uri)
        if info.resumed and previous.get("run_id") and previous.get("tracking_uri") == uri:
            self.run_id = previous["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            self.client.set_tag(self.run_id, "codeq.resumed_at_step", str(info.start_step))
            return previous
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or info.group or "codeq"
        found = self.client.get_experiment_by_name(experiment)
        # MLflow 3's UI opens an experiment of this kind on its runs (model training), not on GenAI traces.
        exp_id = found.experiment_id if found is not None else self.client.create_experiment(
            experiment, tags={"mlflow.experimentKind": "custom_model_development"})
        tags = {"codeq.run_dir": str(info.run_dir)}
        if info.group:
            tags["codeq.group"] = info.group
        name = info.name or Path(str(info.params.get("out") or info.run_dir)).stem
        run = self.client.create_run(exp_id, run_name=name, tags=tags)
        self.run_id = run.info.run_id
        self.params(info.params)
        return {"tracking_uri": uri, "experiment_id": exp_id, "run_id": self.run_id}

    def params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, _text(v)[:PARAM_CHARS]) for k, v in params.items() if v is not None]
        for i in range(0, len(items), 100):  # log_batch takes at most 100 parameters
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def metrics(self, values: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def layers(self, rows: list[dict], step: int) -> None:
        self.metrics({f"layer_{key}/{r['name']}": float(r[key]) for r in rows for key in ("bits", "sparsity")}, step)

    def finish(self, summary: dict, files: list, step: int) -> None:
        numbers = {f"summary/{k}": float(v) for k, v in summary.items() if isinstance(v, (int, float))}
        self.metrics(numbers, step)
        for f in files:
            self.client.log_artifact(self.run_id, str(f))

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)

    def abandon(self) -> None:
        pass


class WandB:
    """A W&B run (``WANDB_PROJECT``, default ``codeq``; ``WANDB_MODE=offline`` needs no network).

    Its local files go to ``RUN_DIR/wandb/``; ``train/step`` is every metric's
    x axis (so a resumed run may log a step again).
    """

    name = "wandb"

    def open(self, info, previous: dict) -> dict:
        import wandb

        run_id = previous.get("id") if info.resumed else None
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "codeq", group=info.group,
            name=info.name or Path(str(info.params.get("out") or info.run_dir)).stem,
            id=run_id or None, resume="allow", dir=str(info.run_dir), config=None if run_id else info.params,
            settings=wandb.Settings(silent=True, console="off"), reinit="create_new",
        )
        self.run.define_metric("*", step_metric="train/step")
        return {"id": self.run.id, "project": self.run.project}

    def params(self, params: dict) -> None:
        self.run.config.update(params, allow_val_change=True)

    def metrics(self, values: dict, step: int) -> None:
        self.run.log({"train/step": step, **values})

    def layers(self, rows: list[dict], step: int) -> None:
        import wandb

        table = wandb.Table(columns=["layer", "bits", "sparsity"], data=[[r["name"], r["bits"], r["sparsity"]] for r in rows])
        self.run.log({"train/step": step, "layers": table,
                      **{f"layer_{key}/{r['name']}": float(r[key]) for r in rows for key in ("bits", "sparsity")}})

    def finish(self, summary: dict, files: list, step: int) -> None:
        self.run.summary.update(summary)
        for f in files:  # files in the run's folder travel with it (synced later when offline)
            shutil.copy2(f, Path(self.run.dir) / Path(f).name)

    def close(self, status: str) -> None:
        self.run.finish(exit_code={"FINISHED": 0, "KILLED": 130}.get(status, 1))

    def abandon(self) -> None:
        if hasattr(self, "run"):
            self.run.finish(exit_code=1)


BACKENDS = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB}

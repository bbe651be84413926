"""``--log-to tensorboard,mlflow,wandb`` with the real packages: what each backend holds, read back with its own reader.

TensorBoard's event files are read with TensorBoard's ``EventAccumulator``; MLflow
runs go to a real tracking server on 127.0.0.1 (SQLite store, started once for the
module) and are read back with ``MlflowClient``; W&B runs offline and its local
``.wandb`` log is read with W&B's own protobuf records. One short end-to-end
``codeq compress``; the rest feeds the tracker the events compress sends.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")
pytest.importorskip("wandb")

from conftest import TINY, make_image_folder, run_cli  # noqa: E402

from codeq_cli.commands import tracking  # noqa: E402
from codeq_cli.errors import UsageError  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def _server(tmp_path_factory):
    """A real MLflow tracking server (SQLite store, served artifacts), started before the first test of the module."""
    folder = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    log = open(folder / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder / 'db.sqlite'}",
         "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, cwd=folder, start_new_session=True,  # its workers in its group
    )
    server = {"uri": f"http://127.0.0.1:{port}", "proc": proc, "log": folder / "server.log", "up": False}
    yield server
    for sig, wait in ((signal.SIGTERM, 1), (signal.SIGKILL, 5)):  # the server and the workers it started
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
            break
        except ProcessLookupError:
            break
        except subprocess.TimeoutExpired:
            continue
    log.close()


@pytest.fixture
def mlflow_uri(_server, monkeypatch) -> str:
    """The server's URI once it answers (bounded wait), set as MLFLOW_TRACKING_URI."""
    deadline = time.monotonic() + 90
    while not _server["up"]:
        if _server["proc"].poll() is not None:
            pytest.fail("the MLflow server exited: " + _server["log"].read_text()[-2000:])
        try:
            with urllib.request.urlopen(_server["uri"] + "/health", timeout=2) as r:
                _server["up"] = r.status == 200
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail("the MLflow server did not answer within 90 s")
            time.sleep(0.3)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _server["uri"])
    return _server["uri"]


@pytest.fixture(autouse=True)
def _wandb_offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv(tracking.GROUP_ENV, raising=False)
    monkeypatch.delenv(tracking.NAME_ENV, raising=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("trk") / "data", per_class=8, val_per_class=3, size=36)


# -- readers: each tool's own ---------------------------------------------------------------------
def tb_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(folder), size_guidance={ea.SCALARS: 0, ea.HISTOGRAMS: 0, ea.TENSORS: 0})
    acc.Reload()
    return {tag: [(s.step, s.value) for s in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tb_tags(folder: Path) -> dict:
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(folder), size_guidance={ea.HISTOGRAMS: 0, ea.TENSORS: 0})
    acc.Reload()
    return acc.Tags()


def wandb_records(run_file: Path) -> list:
    """The records of a ``run-ID.wandb`` file: W&B's block log (32 KiB blocks, 7-byte headers) of protobuf records."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = run_file.read_bytes()
    assert raw[:4] == b":W&B"
    pos, payloads, part = 7, [], b""
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        payload, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:  # full
            payloads.append(payload)
        elif kind == 2:  # first
            part = payload
        elif kind == 3:  # middle
            part += payload
        elif kind == 4:  # last
            payloads.append(part + payload)
    records = []
    for p in payloads:
        r = pb.Record()
        r.ParseFromString(p)
        records.append(r)
    return records


def wandb_attempts(run_dir: Path, run_id: str) -> list[Path]:
    """The offline run folders of ``run_id``, one per attempt, oldest first. W&B names one
    ``offline-run-TIME-ID`` and, when a second attempt starts within the same second, ``…-ID-1``."""
    pattern = re.compile(rf"offline-run-\d{{8}}_\d{{6}}-{re.escape(run_id)}(-\d+)?")
    return sorted(d for d in (run_dir / "wandb").iterdir() if pattern.fullmatch(d.name))


def wandb_history(run_dir: Path, run_id: str) -> tuple[list[dict], list]:
    """Every history row of the offline runs with ``run_id`` under ``run_dir/wandb`` (all attempts), and the records."""
    rows, records = [], []
    for f in (d / f"run-{run_id}.wandb" for d in wandb_attempts(run_dir, run_id)):
        deadline = time.monotonic() + 15  # W&B's service process may still be writing the run's last records
        recs = wandb_records(f)
        while not any(r.WhichOneof("record_type") == "exit" for r in recs):
            if time.monotonic() > deadline:
                pytest.fail(f"{f} has no exit record 15 s after the run finished")
            time.sleep(0.2)
            recs = wandb_records(f)
        records += recs
        for r in recs:
            if r.WhichOneof("record_type") == "history":
                rows.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item})
    return rows, records


# -- parsing and the missing package ---------------------------------------------------------------
def test_parse_log_to():
    assert tracking.parse_log_to("tensorboard, mlflow") == ["tensorboard", "mlflow"]
    assert tracking.parse_log_to("wandb,wandb") == ["wandb"]
    assert tracking.parse_log_to("all") == list(tracking.KINDS)
    assert tracking.parse_log_to(None) == []
    with pytest.raises(UsageError, match="'tensorbord' is not a tracking backend") as info:
        tracking.parse_log_to("tensorbord")
    assert "did you mean 'tensorboard'" in info.value.hint


def test_missing_package_is_one_line_naming_the_extra(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now fails as if it were not installed
    out = tmp_path / "m.pt"
    code, stdout, err = run_cli(["compress", *TINY, "--data", str(data), "--out", str(out), "--max-steps", "2",
                                 "--log-to", "wandb,tensorboard"], capsys)
    assert code == 2 and stdout == ""
    assert err.count("\n") == 1 and "--log-to wandb" in err and "pip install 'codeq[wandb]'" in err, err
    assert not (tmp_path / "m.run").exists()  # refused before any work


def test_log_dir_needs_tensorboard(tmp_path):
    with pytest.raises(UsageError, match="--log-dir"):
        tracking.open_tracker(["wandb"], run_dir=tmp_path, log_dir=tmp_path / "tb")


def test_batch_jobs_get_their_own_runs_in_the_batch_group(tmp_path, monkeypatch):
    settings = tracking.batch_tracking(["tensorboard", "mlflow"], None, "sweep", tmp_path / "sweep.tensorboard")
    args, env = tracking.job_tracking(settings, "r18-mixed")
    assert args == ["--log-to", "tensorboard,mlflow", "--log-dir", str(tmp_path / "sweep.tensorboard" / "r18-mixed")]
    assert env == {tracking.GROUP_ENV: "sweep", tracking.NAME_ENV: "r18-mixed"}
    assert tracking.job_tracking(tracking.batch_tracking([], None, "sweep", tmp_path), "a") == ([], {})
    with pytest.raises(UsageError, match="--log-dir"):
        tracking.batch_tracking([], tmp_path / "tb", "sweep", tmp_path)
    # a job's tracker takes its name and group from that environment
    t = tracking.open_tracker(["wandb"], run_dir=tmp_path)
    assert (t.info.name, t.info.group) == (None, None)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    t = tracking.open_tracker(["wandb"], run_dir=tmp_path)
    assert (t.info.name, t.info.group) == ("r18-mixed", "sweep")


# -- the events compress sends, fed by hand --------------------------------------------------------
def _events(run_dir: Path, steps: range, total: int, resumed: bool = False, extra=lambda s: {}) -> list[dict]:
    evs = [{"event": "data", "train": 24, "val": 9, "classes": 3, "input_size": [3, 32, 32]},
           {"event": "plan", "model": "timm:test_resnet", "recipe": {"lr": 0.001, "mode": "mixed"},
            "run_dir": str(run_dir), "out": str(run_dir.with_suffix(".pt")), "seed": 0, "resumed": resumed}]
    if resumed:
        evs.append({"event": "resumed", "step": steps.start - 1, "epoch": 0})
    else:
        evs.append({"event": "baseline", "top1": 50.0, "top5": 90.0, "samples": 9})
    evs.append({"event": "start", "total_steps": total, "steps_per_epoch": total, "epoch": 0, "step": steps.start - 1,
                "world_size": 1, "quantized_layers": 3})
    for s in steps:
        evs.append({"event": "step", "epoch": 0, "step": s, "total_steps": total, "loss": 2.0 * s + 1,
                    "task_loss": 2.0 * s, "reg_loss": 1.0, "lr": 0.1 / s, **extra(s)})
    return evs


def _feed(tracker, events) -> list[dict]:
    seen = []
    on_event = tracker.wrap(seen.append)
    for e in events:
        on_event(e)
    return seen


def test_step_figures_are_means_over_the_interval_and_instant_values(tmp_path):
    run_dir = tmp_path / "a.run"
    run_dir.mkdir()

    def extra(s):  # the figures only logging steps carry, and the throughput fields
        if s % 2:
            return {}
        return {"rel_bops": 10.0 / s, "sparsity": 0.1 * s, "avg_bits": 8.0 - s, "budget": "bops", "target": 3.0,
                "planned": 5.0, "measured": 4.0 + s, "images_per_s": 100.0 * s, "data_wait": 0.05}

    t = tracking.open_tracker(["tensorboard"], run_dir=run_dir, log_every=2)
    seen = _feed(t, _events(run_dir, range(1, 6), total=5, extra=extra))
    t.finish(None)
    assert [e["event"] for e in seen if e["event"] == "note"] == []
    sc = tb_scalars(run_dir / "tensorboard")
    # task loss: the mean of steps 1-2 (2, 4), 3-4 (6, 8) and the last step alone (10)
    assert sc["train/task_loss"] == [(2, 3.0), (4, 7.0), (5, 10.0)]
    assert sc["train/loss"] == [(2, 4.0), (4, 8.0), (5, 11.0)]
    assert sc["train/penalty"] == [(2, 1.0), (4, 1.0), (5, 1.0)]
    assert sc["train/lr"] == [(2, pytest.approx(0.05)), (4, pytest.approx(0.025)), (5, pytest.approx(0.02))]
    assert sc["compression/rel_bops"] == [(2, 5.0), (4, 2.5)]
    assert sc["budget/achieved"] == [(2, 6.0), (4, 8.0)] and sc["budget/target"] == [(2, 3.0), (4, 3.0)]
    assert sc["perf/images_per_s"] == [(2, 200.0), (4, 400.0)]
    assert sc["perf/data_wait"] == [(2, pytest.approx(0.05)), (4, pytest.approx(0.05))]
    assert sc["baseline/top1"] == [(0, 50.0)]
    assert json.loads((run_dir / "tracking.json").read_text())["tensorboard"]["log_dir"] == str(
        (run_dir / "tensorboard").resolve())


class _FullDisk:
    """A backend whose second write fails as a full disk does (the tracker's guard, not a package, is tested)."""

    name = "fulldisk"

    def __init__(self):
        self.calls = 0

    def open(self, info, previous):
        return {}

    def metrics(self, values, step):
        self.calls += 1
        if self.calls >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")

    def params(self, params):
        pass

    def layers(self, rows, step):
        pass

    def finish(self, summary, files, step):
        pass

    def close(self, status):
        pass

    def abandon(self):
        pass


def test_failing_backends_warn_once_each_and_the_others_go_on(tmp_path, monkeypatch):
    run_dir = tmp_path / "f.run"
    run_dir.mkdir()
    (tmp_path / "blocked").write_text("a file where TensorBoard's folder should be")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port()}")  # a server that is gone
    t = tracking.open_tracker(["tensorboard", "mlflow", "wandb"], run_dir=run_dir, log_dir=tmp_path / "blocked" / "tb",
                              log_every=1)
    full = _FullDisk()
    t.backends.append(full)
    t0 = time.monotonic()
    seen = _feed(t, _events(run_dir, range(1, 5), total=4))
    feeding = time.monotonic() - t0
    t.finish(None)
    notes = [e["text"] for e in seen if e["event"] == "note"]
    assert len(notes) == 3, notes  # one line per failed backend, however many events followed
    assert all(n.startswith("warning: ") and "\n" not in n and "the run goes on" in n for n in notes)
    assert {n.split()[1] for n in notes} == {"tensorboard", "mlflow", "fulldisk"}
    assert "No space left on device" in next(n for n in notes if "fulldisk" in n)
    assert full.calls == 2  # off after its failure
    assert feeding < 2.0  # the events never waited for the dead server (the worker thread did)
    run_id = json.loads((run_dir / "tracking.json").read_text())["wandb"]["id"]
    rows, _ = wandb_history(run_dir, run_id)  # W&B logged every step regardless
    assert [r["train/step"] for r in rows if "train/task_loss" in r] == [1, 2, 3, 4]


def test_resume_continues_the_same_runs(tmp_path, mlflow_uri):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "r.run"
    run_dir.mkdir()
    kinds = ["tensorboard", "mlflow", "wandb"]
    first = tracking.open_tracker(kinds, run_dir=run_dir, log_every=1)
    _feed(first, _events(run_dir, range(1, 5), total=6))  # steps 1-4 logged, the state saved at step 3
    first.close("KILLED")
    ids = json.loads((run_dir / "tracking.json").read_text())
    client = MlflowClient(mlflow_uri)
    assert client.get_run(ids["mlflow"]["run_id"]).info.status == "KILLED"

    second = tracking.open_tracker(kinds, run_dir=run_dir, log_every=1)
    _feed(second, _events(run_dir, range(4, 7), total=6, resumed=True))  # resumes after step 3
    second.finish(None)
    assert json.loads((run_dir / "tracking.json").read_text()) == ids  # the same runs
    run = client.get_run(ids["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["codeq.resumed_at_step"] == "3"
    assert len(client.search_runs([ids["mlflow"]["experiment_id"]])) == 1
    history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/task_loss")]
    assert sorted(set(history)) == [(s, 2.0 * s) for s in range(1, 7)]
    # TensorBoard drops the first attempt's step 4 (purge_step): each step once
    assert tb_scalars(run_dir / "tensorboard")["train/task_loss"] == [(s, 2.0 * s) for s in range(1, 7)]
    rows, records = wandb_history(run_dir, ids["wandb"]["id"])
    assert len(wandb_attempts(run_dir, ids["wandb"]["id"])) == 2  # two attempts, one id
    assert sorted({r["train/step"] for r in rows if "train/task_loss" in r}) == list(range(1, 7))


# -- end to end ---------------------------------------------------------------------------------------
def test_compress_logs_to_all_three(data, tmp_path, capsys, mlflow_uri, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "codeq-test-e2e")
    out = tmp_path / "m.pt"
    code, stdout, err = run_cli(["compress", *TINY, "--data", str(data), "--out", str(out), "--max-steps", "4",
                                 "--batch-size", "8", "--log-every", "1", "--log-to", "tensorboard,mlflow,wandb",
                                 "--json"], capsys)
    assert code == 0, err
    json.loads(stdout)  # still exactly one JSON document on stdout
    assert "warning" not in err and "wandb:" not in err, err
    run_dir = tmp_path / "m.run"
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = {e["step"]: e for e in events if e["event"] == "step"}
    evals = {e["step"]: e for e in events if e["event"] == "eval"}
    assert sorted(steps) == [1, 2, 3, 4] and evals

    sc = tb_scalars(run_dir / "tensorboard")  # --log-every 1: every figure is that step's own
    assert sc["train/task_loss"] == [(s, pytest.approx(e["task_loss"], rel=1e-6)) for s, e in steps.items()]
    assert sc["compression/rel_bops"] == [(s, pytest.approx(e["rel_bops"], rel=1e-6)) for s, e in steps.items()]
    assert sc["eval/top1"] == [(s, pytest.approx(e["top1"], rel=1e-6)) for s, e in evals.items()]
    paced = {s: e for s, e in steps.items() if "images_per_s" in e}  # throughput, when the loop reports it
    assert sc.get("perf/images_per_s", []) == [(s, pytest.approx(e["images_per_s"], rel=1e-6)) for s, e in paced.items()]
    assert sc.get("perf/data_wait", []) == [(s, pytest.approx(e["data_wait"], rel=1e-6, abs=1e-9)) for s, e in paced.items()]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert sc["final/top1"] == [(4, pytest.approx(summary["metrics"]["top1"], rel=1e-6))]
    assert "layers/bits" in tb_tags(run_dir / "tensorboard")["histograms"]

    ids = json.loads((run_dir / "tracking.json").read_text())
    client = MlflowClient(mlflow_uri)
    run = client.get_run(ids["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "m"
    assert client.get_experiment(ids["mlflow"]["experiment_id"]).name == "codeq-test-e2e"
    import yaml

    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert run.data.params["recipe.lambda_dz"] == str(recipe["lambda_dz"]) and run.data.params["recipe.lr"] == str(recipe["lr"])
    assert run.data.params["model"] == "timm:test_resnet" and run.data.params["command"].startswith("codeq compress ")
    history = client.get_metric_history(run.info.run_id, "train/task_loss")
    assert [(m.step, m.value) for m in history] == [(s, pytest.approx(e["task_loss"], rel=1e-6)) for s, e in steps.items()]
    assert run.data.metrics["summary/file_bytes"] == out.stat().st_size
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"summary.json", "report.html"}
    layer_keys = [k for k in run.data.metrics if k.startswith("layer_bits/")]
    assert layer_keys and all(run.data.metrics[k] in (2, 3, 4, 5, 6, 7, 8) for k in layer_keys)

    rows, records = wandb_history(run_dir, ids["wandb"]["id"])
    assert [(r["train/step"], r["train/task_loss"]) for r in rows if "train/task_loss" in r] == [
        (s, pytest.approx(e["task_loss"], rel=1e-6)) for s, e in steps.items()]
    config = {u.key: json.loads(u.value_json) for r in records if r.WhichOneof("record_type") == "run"
              for u in r.run.config.update}
    assert config["model"] == "timm:test_resnet" and config["recipe.lr"] == recipe["lr"]
    files = next((run_dir / "wandb").glob("offline-run-*")) / "files"
    assert {"summary.json", "report.html"} <= {p.name for p in files.iterdir()}

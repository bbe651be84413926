"""DDP on CPU (gloo): identical ranks, rank-0-only files, the whole val set, resume across world sizes.

The multi-process tests launch ``python -m torch.distributed.run`` (torchrun)
as a subprocess with two processes of one thread each, on the tiny
``timm:test_resnet`` at 32 px: a few seconds per launch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from codeq_cli.formats import checkpoint

from codeq_cli.train import dist
from codeq_cli.commands.compress import CompressOptions, run
from codeq_cli.errors import TrainingError, UsageError
from codeq_cli.train.launch import strip_nproc, threads_per_process
from codeq_cli.data.sampling import GlobalBatchSampler, ShardSampler
from codeq_cli.errors import InterruptedRun as Interrupted
from conftest import make_image_folder

TINY = ["timm:test_resnet", "--no-pretrained", "--img-size", "32", "--workers", "0", "--num-classes", "3"]
# 24 training images, global batch 8: 3 steps per epoch, so 5 steps cross an epoch (and its evaluation).
RUN = ["--max-steps", "5", "--batch-size", "8", "--seed", "3", "--log-every", "2", "--set", "lr_dz=0.05"]
OPTS = dict(model="timm:test_resnet", pretrained=False, num_classes=3, img_size=32, workers=0, max_steps=5, seed=3,
            log_every=2, overrides=["batch_size=8", "lr_dz=0.05"])
VAL_IMAGES = 9


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("ddp") / "data", per_class=8, val_per_class=3, size=36)


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CODEQ_DEBUG_")}
    env.update(OMP_NUM_THREADS="1", NO_COLOR="1", **extra)
    return env


def torchrun(args: list[str], nproc: int = 2, **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "codeq_cli", "compress", *args]
    return subprocess.run(cmd, env=_env(**env), capture_output=True, text=True, timeout=240)


def _codes(path: Path) -> dict[str, torch.Tensor]:
    return {name: layer.codes for name, layer in checkpoint.load(path).layers.items()}


@pytest.fixture(scope="module")
def two_ranks(data, tmp_path_factory) -> dict:
    """One uninterrupted 2-process run that dumps every rank's quantizers."""
    root = tmp_path_factory.mktemp("two")
    out, dump = root / "a.pt", root / "dump"
    proc = torchrun([*TINY, "--data", str(data), "--out", str(out), *RUN], CODEQ_DEBUG_DUMP_DIR=str(dump))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"out": out, "run_dir": root / "a.run", "dump": dump, "proc": proc}


# -- the data split over ranks ------------------------------------------------------
@pytest.mark.parametrize("world", [2, 4])
def test_global_batches_split_over_ranks_equal_the_single_process_batches(world):
    single = list(GlobalBatchSampler(26, 8, seed=5))
    ranks = [GlobalBatchSampler(26, 8, seed=5, rank=r, world=world) for r in range(world)]
    split = [sum(parts, []) for parts in zip(*(list(r) for r in ranks))]
    assert split == single and len(single) == 3  # 26 // 8 global batches, the remainder dropped
    for r in ranks:
        r.set_epoch(1, start_batch=2)
    later = [sum(parts, []) for parts in zip(*(list(r) for r in ranks))]
    one = GlobalBatchSampler(26, 8, seed=5)
    one.set_epoch(1, start_batch=2)
    assert later == list(one) and len(later) == 1


def test_evaluation_shards_cover_the_val_set_once():
    shards = [list(ShardSampler(VAL_IMAGES, r, 2)) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(VAL_IMAGES))


# -- one 2-process run ---------------------------------------------------------------
def test_ranks_hold_identical_quantizers_and_weights(two_ranks):
    a = torch.load(two_ranks["dump"] / "rank0.pt", weights_only=True)
    b = torch.load(two_ranks["dump"] / "rank1.pt", weights_only=True)
    assert (a["rank"], b["rank"], a["world_size"], a["step"]) == (0, 1, 2, 5)
    assert a["layers"].keys() == b["layers"].keys() and len(a["layers"]) == 16
    moved = 0
    for name, la in a["layers"].items():
        lb = b["layers"][name]
        assert torch.equal(la["theta_dz"], lb["theta_dz"]), name
        assert torch.equal(la["theta_bit"], lb["theta_bit"]), name  # the default recipe is mixed
        assert torch.equal(la["codes"], lb["codes"]), name
        moved += float(la["theta_dz"]) != 3.0
    assert moved == 16  # the logits trained
    for key, value in a["state_dict"].items():  # weights and BN statistics too
        assert torch.equal(value, b["state_dict"][key]), key
    # The checkpoint is rank 0's model.
    ck = checkpoint.load(two_ranks["out"])
    for name, layer in ck.layers.items():
        assert torch.equal(layer.codes, a["layers"][name]["codes"]), name


def test_rank_zero_alone_reports_and_writes(two_ranks):
    proc, run_dir = two_ranks["proc"], two_ranks["run_dir"]
    assert proc.stderr.count("training: 5 steps") == 1 and proc.stderr.count("quantizers inserted") == 1
    assert "2 process" in proc.stderr
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events].count("start") == 1
    assert [e["step"] for e in events if e["event"] == "step"] == [2, 4, 5]
    (ev,) = [e for e in events if e["event"] == "eval"]
    assert ev["samples"] == VAL_IMAGES  # the whole val set, no padded duplicates
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl", "recipe.yaml", "summary.json"]  # state.pt goes once the checkpoint is written
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["metrics"]["val_samples"] == VAL_IMAGES
    ck = checkpoint.load(two_ranks["out"])
    assert ck.meta["provenance"]["world_size"] == 2 and ck.meta["provenance"]["steps"] == 5
    model = ck.build_model()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_every_rank_applies_the_same_budget_pressure(data, tmp_path):
    """Under a budget rank 0 measures and every rank applies its figure: the controllers' states, the
    logits they scale and the codes are identical on both ranks, and the target is met."""
    out, dump = tmp_path / "t.pt", tmp_path / "dump"
    proc = torchrun([*TINY, "--data", str(data), "--out", str(out), *RUN, "--target-bops", "8", "--set", "lr_dz=0.3",
                     "--set", "lr_bit=0.3", "--set", "budget_every=1", "--json"], CODEQ_DEBUG_DUMP_DIR=str(dump))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = torch.load(dump / "rank0.pt", weights_only=True)
    b = torch.load(dump / "rank1.pt", weights_only=True)
    ca, cb = json.loads(a["extra"]["budget"])["controller"], json.loads(b["extra"]["budget"])["controller"]
    assert ca == cb and ca["updates"] == 5  # a measurement at every step, the same on both ranks
    for name, la in a["layers"].items():
        lb = b["layers"][name]
        assert torch.equal(la["theta_dz"], lb["theta_dz"]) and torch.equal(la["theta_bit"], lb["theta_bit"]), name
        assert torch.equal(la["codes"], lb["codes"]), name
    result = json.loads(proc.stdout)
    assert 8 * 0.97 <= result["budget"]["achieved"] <= 8.0


# -- resume on the same and on another number of processes ----------------------------
def test_two_rank_state_resumes_on_two_exactly_and_on_one(data, tmp_path, two_ranks):
    out = tmp_path / "b.pt"
    # The last rank asks to stop after step 2 (as SIGTERM would); the vote stops both after that step.
    proc = torchrun([*TINY, "--data", str(data), "--out", str(out), *RUN], CODEQ_DEBUG_STOP_AFTER="2")
    assert proc.returncode != 0 and "interrupted after step 2" in proc.stderr, proc.stderr[-3000:]
    state = torch.load(tmp_path / "b.run" / "state.pt", weights_only=True)
    assert state["progress"]["step"] == 2 and state["world_size"] == 2 and not out.exists()
    assert len(state["rng_ranks"]) == 2  # every rank's generators, restored by rank on 2 processes
    shutil.copytree(tmp_path / "b.run", tmp_path / "c.run")

    proc = torchrun([*TINY, "--data", str(data), "--out", str(out), *RUN, "--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _codes(two_ranks["out"]), _codes(out)
    assert a.keys() == b.keys()
    for name in a:  # 2 -> 2: the codes of the uninterrupted run
        assert torch.equal(a[name], b[name]), name

    res = run(CompressOptions(data=data, out=tmp_path / "c.pt", resume=True, **OPTS))  # 2 -> 1
    assert res.resumed_from_step == 2 and res.metrics["val_samples"] == VAL_IMAGES
    ck = checkpoint.load(tmp_path / "c.pt")
    assert ck.meta["provenance"]["steps"] == 5 and ck.meta["provenance"]["world_size"] == 1
    assert ck.layers.keys() == a.keys()


def test_nproc_launches_two_processes_that_resume_a_one_process_run(data, tmp_path):
    out = tmp_path / "m.pt"
    calls = {"n": 0}

    def stop_after_two() -> bool:
        calls["n"] += 1
        return calls["n"] >= 2

    with pytest.raises(Interrupted) as info:
        run(CompressOptions(data=data, out=out, **OPTS), should_stop=stop_after_two)
    assert info.value.step == 2
    cmd = [sys.executable, "-m", "codeq_cli", "compress", *TINY, "--data", str(data), "--out", str(out), *RUN,
           "--resume", "--json", "--nproc", "2"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)  # one JSON document: rank 0's
    assert result["resumed_from_step"] == 2 and result["metrics"]["val_samples"] == VAL_IMAGES
    ck = checkpoint.load(out)
    assert ck.meta["provenance"]["world_size"] == 2 and ck.meta["provenance"]["steps"] == 5


# -- pieces that need no second process ------------------------------------------------
def test_sync_bn_is_refused_on_cpu_and_plain_bn_is_the_default():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    two = dist.DistInfo(rank=0, world_size=2)
    with pytest.raises(UsageError, match="sync_bn=false"):
        dist.wrap(model, two, sync_bn=True)
    assert dist.wrap(model, dist.DistInfo(), sync_bn=True) is model  # one process: nothing to wrap
    dist.check_sync_bn(two, False)


def test_launcher_arguments():
    assert strip_nproc(["compress", "m", "--nproc", "2", "--data", "d", "--nproc=4"]) == ["compress", "m", "--data", "d"]
    assert threads_per_process(10_000) == 1 and threads_per_process(1) >= 1


def test_compile_failure_is_one_clear_error(data, tmp_path, monkeypatch):
    from torch._dynamo.exc import TorchDynamoException

    class Broken(torch.nn.Module):
        def __init__(self, mod):
            super().__init__()
            self._orig_mod = mod

        def forward(self, x):
            raise TorchDynamoException("inductor could not compile a kernel")

    monkeypatch.setattr(torch, "compile", lambda m, **kw: Broken(m))
    opts = {**OPTS, "max_steps": 1}
    with pytest.raises(TrainingError, match="torch.compile failed.*without --compile"):
        run(CompressOptions(data=data, out=tmp_path / "x.pt", compile=True, skip_baseline=True, **opts))

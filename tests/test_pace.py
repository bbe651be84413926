"""Throughput and data wait: measured per logging interval, shown when the loader sets the pace (issue 22, point 4)."""

from __future__ import annotations

import time

from codeq_cli.train.loop import Pace


def test_pace_by_hand(monkeypatch):
    clock = iter([100.0, 102.0, 106.0])  # the interval starts at 100; read at 102, then at 106
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    pace = Pace()
    pace.waited(0.5)
    pace.stepped(64)
    pace.stepped(64)
    assert pace.read() == {"images_per_s": 64.0, "data_wait": 0.25}  # 128 images in 2 s, 0.5 s of it waiting
    pace.stepped(32)
    assert pace.read() == {"images_per_s": 8.0, "data_wait": 0.0}  # a new interval: 32 images in 4 s


def test_the_progress_line_says_when_the_run_waits_for_data():
    from codeq_cli.cli.console import Output, TrainingDisplay

    shown = []
    out = Output()
    out.info = shown.append  # type: ignore[method-assign]
    display = TrainingDisplay(out, plain_interval_s=0.0)
    display.progress = None
    step = {"event": "step", "epoch": 0, "step": 1, "total_steps": 2, "loss": 1.0, "task_loss": 1.0,
            "reg_loss": 0.0, "lr": 0.1}
    display({**step, "data_wait": 0.1, "images_per_s": 900.0})
    assert "waiting for data" not in shown[-1]
    display({**step, "step": 2, "data_wait": 0.45, "images_per_s": 300.0})
    assert "waiting for data 45%" in shown[-1]

"""The learning-rate schedules: the run's (``lr_factor``) and the weights' under a budget's recovery phase.

``docs/method.md``, "Aggressive budgets in short runs" (codeq's extension, not
the paper's). The budget's plan compresses until ``ramp_end`` and then holds
the target while the weights recover; under the run's cosine schedule the
hold phase gets what is left of it (in a 3-epoch run the weights' rate is
below a third of its peak when the target is reached). With a recovery LR
the weights keep ``budget_ramp_lr`` (``lr`` where it is null; after any
warmup) while the figure falls, then
restart at ``budget_recover_lr`` and follow the run's own schedule shape
(cosine to ``min_lr``, constant, or tenfold steps) over the hold. Only the
weights' group: the logits keep the run's schedule (the controller's steps
are shares of theirs). Plain Python, no torch.
"""

from __future__ import annotations

import math


def ramp_end(ramp: float, total_steps: int) -> int:
    """The step at which the budget's plan reaches the target (:class:`codeq_cli.train.controller.Controller`'s too)."""
    return max(1, int(round(ramp * total_steps)))


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_factor: float = 0.0) -> float:
    """Multiplier of every group's learning rate at ``step`` (0-based): linear warmup, then ``schedule``.

    ``cosine`` falls from 1 to ``min_factor``; ``constant`` stays at 1;
    ``step`` divides by 10 at one and two thirds of the steps after warmup.
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    if schedule == "step":  # divide by 10 at 1/3 and 2/3 of training
        return 0.1 ** int(progress * 3 - 1e-9) if progress < 1 else 0.01
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def recover_factor(step: int, total: int, end: int, warmup: int, restart: float, min_factor: float = 0.0,
                   schedule: str = "cosine", ramp: float = 1.0) -> float:
    """Multiplier of the weights' ``lr`` at ``step`` (0-based) under a recovery phase.

    Warmup as the run's (to ``ramp``); ``ramp`` until ``end`` (``budget_ramp_lr / lr``,
    1 without it); then ``restart`` times the run's ``schedule`` over the steps
    from ``end`` to ``total`` (cosine: from ``restart`` to ``min_factor``).
    """
    if warmup > 0 and step < warmup:
        return ramp * (step + 1) / warmup
    if step < end:
        return ramp
    return restart * lr_factor(step - end, total - end, 0, schedule, min_factor / restart)

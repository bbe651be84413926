"""The weights' learning rate under a budget with a recovery phase (``budget_recover_lr``).

``docs/method.md``, "Aggressive budgets in short runs" (codeq's extension, not
the paper's). The budget's plan compresses until ``ramp_end`` and then holds
the target while the weights recover; under the run's cosine schedule the
hold phase gets what is left of it (in a 3-epoch run the weights' rate is
below a third of its peak when the target is reached). With a recovery LR
the weights keep ``lr`` (after any warmup) while the figure falls, then
restart at ``budget_recover_lr`` and follow a cosine to ``min_lr`` over the
hold. Only the weights' group: the logits keep the run's schedule (the
controller's steps are shares of theirs).
"""

from __future__ import annotations

import math


def ramp_end(ramp: float, total_steps: int) -> int:
    """The step at which the budget's plan reaches the target (:class:`codeq_cli.train.controller.Controller`'s too)."""
    return max(1, int(round(ramp * total_steps)))


def recover_factor(step: int, total: int, end: int, warmup: int, restart: float, min_factor: float = 0.0) -> float:
    """Multiplier of the weights' ``lr`` at ``step`` (0-based): warmup, 1 until ``end``, then ``restart`` → ``min_factor`` by cosine."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if step < end:
        return 1.0
    progress = min(1.0, (step - end) / max(1, total - end))
    return min_factor + (restart - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))

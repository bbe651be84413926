"""Accuracy at the budget: distillation from the FP model (batch-norm re-estimation: :mod:`codeq_cli.train.bn`).

``docs/method.md``, "Accuracy at the budget" (codeq's extensions, not the
paper's).

Distillation (Hinton et al., 2015): the FP model codeq started from, frozen
and in eval mode, sees the same batch; the task loss becomes ::

    (1 − α) · CE(student, y) + α · T² · KL(softmax(teacher/T) ‖ softmax(student/T))

with ``α = distill_weight`` and ``T = distill_temperature`` (``T²`` keeps the
gradient's scale independent of ``T``).

"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T² · KL(p_teacher ‖ p_student)`` at temperature ``T``, averaged over the batch."""
    t = temperature
    log_p = F.log_softmax(student.float() / t, dim=1)
    log_q = F.log_softmax(teacher.float() / t, dim=1)
    return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * (t * t)


def task_loss(student: torch.Tensor, target: torch.Tensor, teacher: torch.Tensor | None, weight: float,
              temperature: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy, mixed with :func:`kd_loss` when there is a teacher and ``weight > 0``."""
    ce = F.cross_entropy(student.float(), target, label_smoothing=label_smoothing)
    if teacher is None or weight <= 0:
        return ce
    return (1.0 - weight) * ce + weight * kd_loss(student, teacher, temperature)


def make_teacher(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` in eval mode (call before any quantizer is inserted)."""
    teacher = copy.deepcopy(model)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher

"""Accuracy at the budget: distillation from the FP model, and batch-norm re-estimation.

``docs/method.md``, "Accuracy at the budget" (codeq's extensions, not the
paper's).

Distillation (Hinton et al., 2015): the FP model codeq started from, frozen
and in eval mode, sees the same batch; the task loss becomes ::

    (1 − α) · CE(student, y) + α · T² · KL(softmax(teacher/T) ‖ softmax(student/T))

with ``α = distill_weight`` and ``T = distill_temperature`` (``T²`` keeps the
gradient's scale independent of ``T``).

Batch-norm re-estimation: the running statistics of every batch-norm layer
are recomputed on training batches with the final quantized weights (a
cumulative average, in train mode, without gradients), because the statistics
collected while the weights and dead zones moved describe none of the models
along the way. Nothing but the batch-norm buffers changes.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

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


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every batch-norm layer's buffers (running statistics, batch count), by state-dict key.

    ``model.load_state_dict(saved, strict=False)`` puts them back.
    """
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for key, buf in m.named_buffers(recurse=False):
                if buf is not None:
                    out[f"{name}.{key}" if name else key] = buf.detach().clone()
    return out


@torch.no_grad()
def reestimate_bn(model: nn.Module, batches: Iterable, device: torch.device, forward=None) -> int:
    """Recompute every batch-norm layer's running statistics on ``batches``; returns the images seen.

    Models without batch norm are left alone (0). ``forward(model, images)``
    runs the model (default: ``model(images)``), e.g. under autocast.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    model.train()
    seen = 0
    try:
        for batch in batches:
            images = batch[0].to(device, non_blocking=True)
            if images.numel() == 0:
                continue
            (forward or (lambda mod, x: mod(x)))(model, images)
            seen += int(images.shape[0])
    finally:
        for m, mom in zip(norms, momenta):
            m.momentum = mom
        model.train(was_training)
    return seen

"""Batch-norm re-estimation of the final quantized model: codeq's one home for it.

``docs/method.md``, "Accuracy at the budget" (codeq's extension, not the
paper's). The running statistics of every batch-norm layer are recomputed on
training batches with the final quantized weights (a cumulative average, in
train mode, without gradients), because the statistics collected while the
weights and dead zones moved describe none of the models along the way.
Nothing but the batch-norm buffers changes. Under ``max_drop`` the result is
kept only when top-1 stays within the bound (:func:`bn_step`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from codeq_cli.train.budget import Budget
    from codeq_cli.train.context import RunContext


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


def bn_step(model: nn.Module, ctx: RunContext, searched: Budget | None, met: bool, fp_top1: float | None,
            measure: Callable[[nn.Module], float] | None = None) -> dict:
    """Batch-norm re-estimation of the final model, as the summary reports it (``{}`` when off or no BN).

    ``measure(model)`` gives validation top-1 (default: :meth:`RunContext.top1`).
    ``searched`` is a ``max_drop`` budget: the written model must stay within
    the bound it was chosen by (``met``), so when the re-estimated statistics
    take top-1 below it, the trained ones are put back (``bn_kept: 0``).
    """
    recipe = ctx.recipe
    if recipe.bn_reestimate <= 0 or not has_batchnorm(model):
        return {}
    measure = measure or ctx.top1
    before = measure(model)
    trained = bn_buffers(model)
    seen = reestimate(model, ctx)
    out = {"top1_before_bn": before, "bn_images": seen}
    if searched is not None and searched.kind.searches and met and fp_top1 is not None:
        floor = fp_top1 - searched.value
        after = measure(model)
        if after < floor <= before:
            model.load_state_dict(trained, strict=False)
            out["bn_kept"] = 0
    return out


def reestimate(model: nn.Module, ctx: RunContext) -> int:
    """Batch-norm statistics of ``model`` from ``recipe.bn_reestimate`` training batches (0: off); images seen."""
    from codeq_cli.data.loader import build_loader
    from codeq_cli.data.sampling import GlobalBatchSampler
    from codeq_cli.train import dist
    from codeq_cli.train.accuracy import autocast_for

    recipe, info = ctx.recipe, ctx.info
    if recipe.bn_reestimate <= 0 or not has_batchnorm(model):
        return 0
    sampler = GlobalBatchSampler(len(ctx.train_set), recipe.batch_size, ctx.seed, info.rank, info.world_size)
    sampler.set_epoch(recipe.epochs + 1_000_003)  # an epoch training never reaches: its own order
    loader = build_loader(ctx.train_set, batch_sampler=sampler, workers=ctx.workers, seed=ctx.seed)

    def batches():
        for i, batch in enumerate(loader):
            if i >= recipe.bn_reestimate:
                return
            yield batch

    def forward(mod, x):
        with autocast_for(info.device, recipe.amp):
            mod(x)

    seen = reestimate_bn(model, batches(), info.device, forward)
    dist.broadcast_buffers(model)
    return seen

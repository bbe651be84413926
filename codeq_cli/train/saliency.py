"""What zeroing each weight would cost the task: the final trim's saliency.

``docs/method.md``, "The final trim" (codeq's extension, not the paper's).
Optimal Brain Damage (LeCun, Denker, Solla 1990) estimates the rise of the loss
when a weight is set to zero as ``½·H_ii·w_i²``; with the empirical Fisher
information in place of the Hessian's diagonal, ``H_ii ≈ F_i = Σ_b g_{b,i}²``,
the squared gradients of the task loss over small batches ``b`` of training
images (as Theis et al. 2018 prune with it). :func:`fisher` measures ``F`` for
every quantized weight: the model in eval mode (batch-norm statistics fixed,
no dropout), the task's cross-entropy on the labels, gradients straight
through the quantizers (``∂ŵ/∂w = 1``), :data:`IMAGES` training images in
batches of :data:`MICRO` on every process, summed over the processes so that
every rank trims alike.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

IMAGES = 256  # training images the saliency is measured on (all processes together)
MICRO = 8  # images per gradient: F sums the squares of the gradients of batches this small


def fisher(model: nn.Module, ctx, images: int = IMAGES, micro: int = MICRO) -> dict[str, torch.Tensor]:
    """``{layer name: F}``, ``F`` shaped like the layer's weight: ``Σ_b (∂L_b/∂w)²`` over batches of ``micro`` images."""
    from codeq_cli.core.insert import quantized_weights
    from codeq_cli.data.loader import build_loader
    from codeq_cli.data.sampling import GlobalBatchSampler
    from codeq_cli.train import dist
    from codeq_cli.train.accuracy import autocast_for, logits_of

    info = ctx.info
    qws = list(quantized_weights(model))
    if not qws:
        return {}
    weights = [qw.original for qw in qws]
    sums = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    per_step = micro * info.world_size
    sampler = GlobalBatchSampler(len(ctx.train_set), per_step, ctx.seed, info.rank, info.world_size)
    sampler.set_epoch(ctx.recipe.epochs + 2_000_003)  # an order of its own (batch-norm re-estimation takes +1,000,003)
    loader = build_loader(ctx.train_set, batch_sampler=sampler, workers=ctx.workers, seed=ctx.seed)
    was_training, wanted = model.training, [w.requires_grad for w in weights]
    model.eval()
    for w in weights:
        w.requires_grad_(True)
    try:
        for i, batch in enumerate(loader):
            if i >= math.ceil(images / per_step):
                break
            x, y = batch[0].to(info.device, non_blocking=True), batch[1].to(info.device, non_blocking=True)
            with torch.enable_grad(), autocast_for(info.device, ctx.recipe.amp):
                loss = F.cross_entropy(logits_of(model(x)).float(), y)
            for s, g in zip(sums, torch.autograd.grad(loss, weights, allow_unused=True)):
                if g is not None:
                    s.add_(g.float().square())
    finally:
        model.train(was_training)
        for w, r in zip(weights, wanted):
            w.requires_grad_(r)
    dist.all_reduce_(sums)
    return {qw.name: s for qw, s in zip(qws, sums)}

"""The model made ready to train: quantizers inserted, activations calibrated, then wrapped for the processes.

``docs/method.md``, "Which layers" and "Activation quantizers". The stage of
``codeq compress`` between the FP baseline and :class:`~codeq_cli.train.loop.Fit`.
"""

from __future__ import annotations

import torch
from torch import nn

from codeq_cli.errors import UsageError, one_line
from codeq_cli.train import dist
from codeq_cli.train.context import RunContext

CALIBRATION_BATCHES = 4


def insert_quantizers(model: nn.Module, ctx: RunContext) -> list[str]:
    """Wrap the recipe's layers in dead-zone quantizers (and input quantizers when it says so); their names."""
    from codeq_cli.core.insert import quantize_
    from codeq_cli.train.recipe import quantizer_kwargs

    recipe = ctx.recipe
    wrapped = quantize_(model, **quantizer_kwargs(recipe), include=recipe.include, exclude=recipe.exclude)
    if not wrapped:
        raise UsageError("no layer was quantized", hint="check the recipe's include/exclude patterns")
    if recipe.init_sparsity is not None:
        init_dead_zones(model, recipe.init_sparsity)
    model.to(ctx.device)
    return wrapped


@torch.no_grad()
def init_dead_zones(model: nn.Module, sparsity: float) -> None:
    """Each layer's dead zone set to prune ``sparsity`` of its weights, from its own weight distribution.

    ``docs/method.md``, "Aggressive budgets in short runs" (codeq's extension):
    the dead zone's half-width ``d/2 = R(1 − tanh|θ_dz|)`` is put at the
    ``sparsity`` quantile ``t`` of ``|w|``, so ``θ_dz = atanh(1 − t/R)`` (the
    final trim's formula). A layer whose quantile reaches ``R`` keeps ``θ_dz``
    just above 0 (the widest dead zone).
    """
    from codeq_cli.core._select import exact_quantile
    from codeq_cli.core.insert import quantized_weights

    for qw in quantized_weights(model):
        qz, w = qw.quantizer, qw.original.detach()
        R = float(qz.absmax(w))
        if R <= 0:
            continue
        qz.set_threshold(float(exact_quantile(w.abs().float(), sparsity)), R, floor=1e-7)


def calibrate_activations(model: nn.Module, ctx: RunContext) -> int:
    """Initialise the activation quantizers once, before training, from the first global batches; how many.

    Every rank reads the same whole global batches (epoch 0's order, its
    augmentations), so all compute the same steps; DDP then starts from rank 0's.
    """
    from codeq_cli.core.act_quant import calibrate_
    from codeq_cli.data.loader import build_loader
    from codeq_cli.data.sampling import GlobalBatchSampler

    sampler = GlobalBatchSampler(len(ctx.train_set), ctx.recipe.batch_size, ctx.seed)
    loader = build_loader(ctx.train_set, batch_sampler=sampler, workers=0, seed=ctx.seed)

    def batches():
        for i, (images, _) in enumerate(loader):
            if i >= CALIBRATION_BATCHES:
                return
            if images.numel():
                yield images.to(ctx.device)

    return calibrate_(model, batches())


def training_module(model: nn.Module, ctx: RunContext, compile: bool = False) -> nn.Module:
    """What the loop calls: the model in training's memory format, DDP-wrapped over the processes, compiled when asked."""
    if ctx.recipe.channels_last and ctx.device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    net = dist.wrap(model, ctx.info, sync_bn=ctx.recipe.sync_bn)
    if compile:
        try:
            net = torch.compile(net)
        except Exception as exc:  # e.g. no dynamo on this Python; failures while compiling come at the first step
            raise UsageError(f"--compile: torch.compile is not available here ({one_line(exc)})",
                             hint="run without --compile") from exc
    return net

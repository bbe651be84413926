"""Evaluation: top-1/top-5 and loss of a model over a loader, summed across ranks.

Used during and after training (:mod:`codeq_cli.train.loop`), by ``codeq eval``
and by the budget's measurements; every caller computes in the same
arithmetic (:mod:`codeq_cli.train.precision`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from codeq_cli.data.loader import build_loader
from codeq_cli.data.sampling import ShardSampler
from codeq_cli.errors import TrainingError
from codeq_cli.train import dist, precision


@dataclass
class EvalResult:
    top1: float
    top5: float
    loss: float
    samples: int

    def to_dict(self) -> dict:
        return {"top1": self.top1, "top5": self.top5, "loss": self.loss, "samples": self.samples}


def logits_of(output) -> torch.Tensor:
    """The logits in a model's output: a tensor, an output object's ``logits``, or a tuple's first entry."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)):
        return output[0]
    raise TrainingError(f"the model returned {type(output).__name__}, not logits")


def autocast_for(device: torch.device, enabled: bool):
    """Training's autocast: bfloat16 on a CUDA device that has it (:func:`precision.resolve`)."""
    return precision.resolve(enabled, False, device)[0].autocast(device)


@torch.inference_mode()
def measure_accuracy(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    *,
    amp: bool = False,
    channels_last: bool = False,
    arithmetic: precision.Arithmetic | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """Top-1/top-5 (percent) and mean loss over the loader, summed across ranks.

    ``arithmetic`` (autocast dtype, memory format) is what ``codeq eval``
    reads from a checkpoint; without it, training's for ``amp`` and
    ``channels_last`` on ``device`` (:func:`precision.resolve`), so
    evaluations during and after training and ``codeq eval`` compute alike.
    ``model`` must be a plain module, not DDP: the ranks' shares of the
    validation set differ by up to one image, so they run different numbers
    of batches and DDP's per-forward buffer broadcast would not pair up.
    The sums stay on the device until the end (one synchronisation).
    """
    arith = arithmetic or precision.resolve(amp, channels_last, device)[0]
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # correct@1, correct@5, loss
    count = 0
    total = len(loader)
    for i, batch in enumerate(loader):
        images, target = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        if images.numel() == 0:
            continue
        images = arith.inputs(images)
        with arith.autocast(device):
            logits = logits_of(model(images)).float()
        k = min(5, logits.shape[1])
        hit = logits.topk(k, dim=1).indices.eq(target[:, None])
        loss = F.cross_entropy(logits, target, reduction="sum")
        sums += torch.stack([hit[:, 0].sum().double(), hit.any(dim=1).sum().double(), loss.double()])
        count += int(target.numel())
        if on_batch is not None:
            on_batch(i + 1, total)
    model.train(was_training)
    correct1, correct5, loss_sum = sums.tolist()
    c1, c5, ls, n = dist.all_reduce_sum([correct1, correct5, loss_sum, float(count)], device)
    n = int(n)
    if n == 0:
        return EvalResult(0.0, 0.0, float("nan"), 0)
    return EvalResult(100.0 * c1 / n, 100.0 * c5 / n, ls / n, n)


def eval_loader(dataset: Dataset, global_batch: int, info: dist.DistInfo, workers: int, device: torch.device):
    """This rank's share of ``dataset`` for evaluation (no padding), broken images counted."""
    return build_loader(
        dataset,
        batch_size=max(1, global_batch // info.world_size),
        sampler=ShardSampler(len(dataset), info.rank, info.world_size),
        workers=workers,
        pin_memory=device.type == "cuda",
    )

"""What the stages of a run share once the model and the data are loaded (``docs/architecture.md``, "The run").

:class:`RunContext` names it once, instead of the eight or nine positional
parameters each helper took: the recipe, the processes, the data, the seed and
the arithmetic. Its :meth:`~RunContext.evaluate` is the one accuracy
measurement of a run: the FP baseline, the epochs' evaluations, the budget's
checks and the decoded model all go through it, in the same arithmetic
(autocast dtype and memory format, :mod:`codeq_cli.train.precision`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from codeq_cli.train import accuracy, dist, precision
from codeq_cli.train.accuracy import EvalResult


@dataclass(frozen=True)
class RunContext:
    recipe: Any  # codeq_cli.train.recipe.Recipe
    info: dist.DistInfo
    train_set: Any  # the datasets of codeq_cli.data.folders
    val_set: Any
    seed: int
    workers: int
    arithmetic: precision.Arithmetic

    @property
    def device(self) -> torch.device:
        return self.info.device

    def evaluate(self, model: nn.Module) -> EvalResult:
        """Top-1/top-5 of ``model`` (plain, not DDP) on the validation set, summed over the ranks."""
        loader = accuracy.eval_loader(self.val_set, self.recipe.batch_size, self.info, self.workers, self.device)
        return accuracy.measure_accuracy(model, loader, self.device, arithmetic=self.arithmetic)

    def top1(self, model: nn.Module) -> float:
        return self.evaluate(model).top1

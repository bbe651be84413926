"""The CoDeQ penalty, the one regularizer of the loss (``docs/method.md``, "The objective").

::

    L = task + p · (λ_dz Σ w_ℓ θ_dz,ℓ² + λ_bit Σ w_ℓ θ_bit,ℓ² + λ_act_bit Σ w_a θ_act,a²)

With λ as given (the paper's way) every ``w = 1`` and there is no pressure
``p``: the plain sums. Under a budget the controller
(:class:`codeq_cli.train.controller.Controller`) supplies the per-layer
weights and the pressure. Both go through :func:`penalty`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from codeq_cli.core.insert import logit_vectors


Logits = Sequence[torch.Tensor] | torch.Tensor  # the parameters, or a vector already stacked (one entry each)


def current_logits(quantizers: Sequence, params: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]
                   ) -> tuple[Logits, Logits]:
    """``(dz, bit)`` for :func:`penalty` after a forward pass: the vectors the one-pass quantizer
    stacked (:func:`codeq_cli.core.insert.logit_vectors`) where it ran, else ``params``
    (:func:`~codeq_cli.core.insert.quantizer_parameters` of the same model).

    On the vectors each logit receives one gradient, the quantizer's and the
    penalty's already summed, instead of two that autograd then adds one logit
    at a time (issue 22; the values are the same).
    """
    stacked = logit_vectors(quantizers)
    if stacked is None:
        return params[0], params[1]
    return stacked[0], (() if stacked[1] is None else stacked[1])


def penalty(dz: Logits, bit: Logits, lambda_dz: float, lambda_bit: float,
            device=None, *, act: Sequence[torch.Tensor] = (), lambda_act: float = 0.0,
            weights: Sequence[float] | None = None, act_weights: Sequence[float] | None = None,
            pressure: float | None = None) -> torch.Tensor:
    """``p · Σ_groups λ Σ w θ²`` over the dead-zone, bit and activation-bit logits.

    Each group is a sequence of logits or one vector of them (the one-pass
    quantizer's, :func:`codeq_cli.core.insert.logit_vectors`).
    ``weights`` (one per quantized layer, for ``dz`` and ``bit``) and
    ``act_weights`` (one per learned activation width; lists or tensors on the
    logits' device) default to 1, and
    ``pressure`` to none; a group with no logits or λ = 0 adds nothing.
    """
    total = torch.zeros((), device=dz[0].device if len(dz) else device)
    for lam, group, w in ((lambda_dz, dz, weights), (lambda_bit, bit, weights), (lambda_act, act, act_weights)):
        if not len(group) or not lam:
            continue
        # one stack (or none), one square: launches independent of the layer count
        squares = (group if isinstance(group, torch.Tensor) else torch.stack(list(group))).square()
        if w is not None:
            if not isinstance(w, torch.Tensor):
                w = torch.tensor(list(w), dtype=group[0].dtype, device=group[0].device)
            squares = w * squares
        total = total + lam * squares.sum()
    return total if pressure is None else pressure * total
